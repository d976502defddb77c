"""A new prior architecture and a new quantizer plug in through the registry alone (docs/architecture.md).

Both are defined here and entered into the registry for the test; nothing else in the project changes, yet configs
build them by kind, checkpoints round-trip them, Hydra gets their typed schema nodes, train_prior derives their full
configs from a code dataset, the compatibility check accepts them and the generator draws images from them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from steps.nn import registry
from steps.nn.config import FieldError
from steps.nn.draw import SamplingControls
from steps.nn.prior import NaiveSampler, Prior, PriorConfig
from steps.nn.quantize import Quantizer, QuantizerConfig, QuantizerOutput


# ------------------------------------------------------------------------------------------------ a toy prior
@dataclass(frozen=True)
class UnigramConfig(PriorConfig):
    """A prior that ignores context: one learned distribution per position (causal by construction)."""

    temperature_scale: float = 1.0


class Unigram(Prior):
    config_cls = UnigramConfig

    def __init__(self, config: UnigramConfig) -> None:
        super().__init__()
        self.config = config
        self.logits = nn.Parameter(torch.randn(config.num_codes, *config.shape))

    def forward(self, codes, labels=None, cond=None):
        self.check_inputs(codes, labels, cond)
        return self.logits.expand(codes.shape[0], -1, -1, -1) * self.config.temperature_scale  # (B, K, H, W)


# ------------------------------------------------------------------------------------------------ a toy quantizer
@dataclass(frozen=True)
class RoundingConfig(QuantizerConfig):
    """Finite scalar quantisation in miniature: each of ``dim`` channels rounded to ``levels`` values."""

    levels: int = 3
    dim: int = 2

    @property
    def codebook_size(self) -> int:
        return self.levels**self.dim

    def resized(self, codebook_size: int | None = None, dim: int | None = None) -> RoundingConfig:
        if codebook_size:
            raise FieldError(type(self).__name__, "codebook_size", "follows from levels and dim; set those")
        return replace(self, dim=dim or self.dim)


class Rounding(Quantizer):
    config_cls = RoundingConfig

    def __init__(self, config: RoundingConfig) -> None:
        super().__init__()
        self.config = config
        self.register_buffer("usage", torch.zeros(config.codebook_size, dtype=torch.long), persistent=False)

    @property
    def _half(self) -> float:
        return (self.config.levels - 1) / 2

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        q = torch.round(torch.tanh(z) * self._half)  # (B, D, H, W) in [-half, half]
        digits = (q + self._half).long()
        radix = self.config.levels ** torch.arange(self.config.dim, device=z.device)
        codes = (digits * radix[None, :, None, None]).sum(1)  # (B, H, W)
        quantized = z + (q / self._half - z).detach()  # straight-through
        counts = torch.bincount(codes.flatten(), minlength=self.config.codebook_size)
        self.usage += counts
        probs = counts.float() / counts.sum()
        perplexity = torch.exp(-(probs * torch.log(probs.clamp_min(1e-10))).sum())
        return QuantizerOutput(quantized, codes, F.mse_loss(z, quantized.detach()) * 0.0, perplexity)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        radix = self.config.levels ** torch.arange(self.config.dim, device=codes.device)
        digits = (codes[:, None] // radix[None, :, None, None]) % self.config.levels  # (B, D, H, W)
        return (digits.float() - self._half) / self._half

    def reset_usage(self) -> None:
        self.usage.zero_()

    def usage_fraction(self) -> float:
        return float((self.usage > 0).float().mean())

    def usage_perplexity(self) -> float:
        p = self.usage.double() / max(int(self.usage.sum()), 1)
        return float(torch.exp(-(p * torch.log(p.clamp_min(1e-30))).sum()))


@dataclass(frozen=True)
class LocalKind(registry.Kind):
    """A registry entry whose class lives in this test module (the real entries name an importable module)."""

    cls: type = object

    @property
    def model(self) -> type:
        return self.cls


@pytest.fixture
def plugged(monkeypatch):
    kinds = dict(registry.KINDS)
    kinds["unigram"] = LocalKind("unigram", "prior", "", cls=Unigram)
    kinds["rounding"] = LocalKind("rounding", "quantizer", "", cls=Rounding)
    monkeypatch.setattr(registry, "KINDS", kinds)


def test_configs_name_the_new_kinds_and_hydra_gets_their_schemas(plugged):
    from hydra.core.config_store import ConfigStore

    from pipeline.config import build, register
    from steps.train_prior import TrainPriorConfig

    cfg = build(TrainPriorConfig, {"prior": {"top": {"kind": "unigram", "temperature_scale": 2.0}}})
    assert isinstance(cfg.prior.top, UnigramConfig) and cfg.prior.top.temperature_scale == 2.0
    assert cfg.to_dict()["prior"]["top"]["kind"] == "unigram"
    register()
    repo = ConfigStore.instance().repo
    assert "unigram_schema.yaml" in repo["prior"] and "rounding_schema.yaml" in repo["model"]["quantizer"]
    assert registry.kinds("prior")[-1] == "unigram" and registry.default_kind("prior") == "pixelcnn"


def test_a_vq_model_with_the_new_quantizer_encodes_decodes_and_round_trips(plugged, tmp_path, artifacts):
    from steps.artifacts.autoencoder import Autoencoder
    from steps.nn.vqvae import VQVAE2Config

    cfg = VQVAE2Config(image_size=32, in_channels=1, channels=16, res_channels=8, res_blocks=1,
                       quantizer={"kind": "rounding", "levels": 3, "dim": 4})  # fmt: skip
    model = registry.build(cfg).eval()
    assert isinstance(model.quantizers["top"], Rounding) and cfg.codebook_sizes == {"top": 81, "bottom": 81}
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    with torch.no_grad():
        enc = model.encode(x)
        torch.testing.assert_close(model.decode_codes(*enc.codes), model.decode(enc.quantized))
    autoencoder = Autoencoder.open(artifacts.autoencoder(tmp_path / "vq", model))
    assert autoencoder.codebook_sizes == {"top": 81, "bottom": 81}
    loaded = autoencoder.load()
    assert loaded.config == cfg and isinstance(loaded.quantizers["bottom"], Rounding)
    with pytest.raises(FieldError, match="top_codebook_size follows from levels and dim"):
        replace(cfg, top_codebook_size=16)


def test_the_new_prior_trains_checks_and_generates_without_other_changes(plugged, tmp_path, artifacts, tiny):
    from steps.artifacts.autoencoder import Autoencoder
    from steps.artifacts.code_format import CodeMeta
    from steps.artifacts.compat import check_compatible
    from steps.artifacts.priors import Priors
    from steps.generation.generator import ImageGenerator, sample_seed
    from steps.train_prior import prior_config

    autoencoder = Autoencoder.open(artifacts.autoencoder(tmp_path / "vq", artifacts.small_vqvae2()))
    meta = CodeMeta.of(autoencoder, num_classes=10)
    arch = UnigramConfig(temperature_scale=0.5)
    cfg = tiny.train_prior("train_prior.class_conditional=true")
    cfg = replace(cfg, prior=replace(cfg.prior, top=arch, bottom=arch))
    configs = {lv: prior_config(cfg, meta, lv) for lv in meta.levels}  # what train_prior trains
    assert configs["bottom"].cond_shape == (4, 4) and configs["bottom"].num_classes == 10
    priors = Priors.open(artifacts.priors(tmp_path / "priors", autoencoder.digest, **configs))
    assert check_compatible(autoencoder, priors=priors) == 10
    assert isinstance(registry.sampler(priors.load("top")), NaiveSampler)  # no fast sampler registered

    generator = ImageGenerator(autoencoder, priors)
    images, codes = generator.draw(
        [sample_seed(0, i) for i in range(3)], [1, 2, 3], controls=SamplingControls(temperature=0.8)
    )
    assert images.shape == (3, 1, 32, 32) and codes["bottom"].shape == (3, 8, 8)
    again, _ = generator.draw(
        [sample_seed(0, i) for i in range(3)], [1, 2, 3], controls=SamplingControls(temperature=0.8)
    )
    assert torch.equal(images, again) and math.isfinite(float(images.abs().sum()))
