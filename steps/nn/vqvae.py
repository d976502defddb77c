"""Hierarchical VQ-VAE-2 (Razavi et al. 2019, section 3.1, figure 2a) and the one-level VQ-VAE it extends.

VQ-VAE-2 encodes an image of side S into a bottom feature map at S/4, encodes that further into a top map at S/8 and
quantises the top. The quantised top is decoded back to S/4 and concatenated with the bottom features before the
bottom quantiser, so the bottom codes only carry what the top codes could not (the paper's "conditioned on the top").
The image decoder sees both the upsampled top and the bottom code vectors. Images are float tensors in [-1, 1].
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from steps.nn import registry
from steps.nn.blocks import Autoencoder, AutoencoderConfig, AutoencoderOutput, Decoder, Encoder, SingleScaleConfig
from steps.nn.config import FieldError
from steps.nn.quantize import EMAQuantizerConfig, Quantizer, QuantizerConfig


class Encoding(NamedTuple):
    """Per-level results of encoding a batch; levels are ordered top first (``model.levels``)."""

    codes: tuple[torch.Tensor, ...]  # each (B, H_l, W_l) int64
    quantized: tuple[torch.Tensor, ...]  # each (B, D_l, H_l, W_l), straight-through
    commit_loss: torch.Tensor  # scalar, summed over levels
    perplexity: tuple[torch.Tensor, ...]  # each scalar


@dataclass(frozen=True)
class VQVAE2Config(AutoencoderConfig):
    """VQ-VAE-2 hyper-parameters. ``quantizer`` configures both levels' codebooks; a level may override its codebook
    size and code dimension (``top_codebook_size``, ``bottom_embed_dim``, ...)."""

    quantizer: QuantizerConfig = field(default_factory=EMAQuantizerConfig)
    top_codebook_size: int | None = None
    bottom_codebook_size: int | None = None
    top_embed_dim: int | None = None
    bottom_embed_dim: int | None = None

    @property
    def image_multiple(self) -> int:
        return 8

    def validate(self) -> None:
        super().validate()
        for level in ("top", "bottom"):
            self.quantizer_of(level)  # checks the level's overrides

    def quantizer_of(self, level: str) -> QuantizerConfig:
        """The quantiser config of ``level``: ``quantizer`` with the level's overrides."""
        size, dim = getattr(self, f"{level}_codebook_size"), getattr(self, f"{level}_embed_dim")
        try:
            return self.quantizer.resized(size, dim)
        except FieldError as exc:
            override = {"codebook_size": f"{level}_codebook_size", "dim": f"{level}_embed_dim"}.get(exc.field)
            raise self.error(override, exc.problem) if override else exc from None

    @property
    def shapes(self) -> dict[str, tuple[int, int]]:
        """(H, W) of each level's code map."""
        return {"top": (self.image_size // 8,) * 2, "bottom": (self.image_size // 4,) * 2}

    @property
    def codebook_sizes(self) -> dict[str, int]:
        return {level: self.quantizer_of(level).codebook_size for level in ("top", "bottom")}


@dataclass(frozen=True)
class VQVAEConfig(SingleScaleConfig):
    """One-level VQ-VAE: a single code map at ``image_size / downsample``."""

    quantizer: QuantizerConfig = field(default_factory=EMAQuantizerConfig)

    def quantizer_of(self, level: str) -> QuantizerConfig:
        return self.quantizer

    @property
    def shapes(self) -> dict[str, tuple[int, int]]:
        return {"top": (self.image_size // self.downsample,) * 2}

    @property
    def codebook_sizes(self) -> dict[str, int]:
        return {"top": self.quantizer.codebook_size}


def _quantizer(config: QuantizerConfig) -> Quantizer:
    """The quantiser module of ``config``'s kind (the registry's ``quantizer`` role)."""
    return registry.build(config)


class _VQModel(Autoencoder):
    """Shared forward/encode/decode plumbing; subclasses define the levels."""

    quantizers: nn.ModuleDict  # level -> Quantizer

    def forward(self, x: torch.Tensor) -> AutoencoderOutput:
        enc = self.encode(x)
        recon = self.decode(enc.quantized)
        stats = {f"perplexity_{n}": p.detach() for n, p in zip(self.levels, enc.perplexity, strict=True)}
        stats["commit_loss"] = enc.commit_loss.detach()
        return AutoencoderOutput(recon, F.mse_loss(recon, x), enc.commit_loss, stats)

    def encode(self, x: torch.Tensor) -> Encoding:  # pragma: no cover - abstract
        raise NotImplementedError

    def decode(self, quantized: tuple[torch.Tensor, ...]) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def decode_codes(self, *codes: torch.Tensor) -> torch.Tensor:
        """Decode integer code maps, one per level, top first: (B, H_l, W_l) each -> (B, C, S, S)."""
        if len(codes) != len(self.levels):
            raise ValueError(f"{type(self).__name__}.decode_codes expects {len(self.levels)} code maps {self.levels}")
        for name, c in zip(self.levels, codes, strict=True):
            want = self.config.shapes[name]
            if c.dim() != 3 or tuple(c.shape[1:]) != want:
                raise ValueError(f"{name} codes must have shape (B, {want[0]}, {want[1]}), got {tuple(c.shape)}")
        return self.decode(tuple(self.quantizers[n].lookup(c) for n, c in zip(self.levels, codes, strict=True)))

    def _check_image(self, x: torch.Tensor) -> None:
        c, s = self.config.in_channels, self.config.image_size
        if x.dim() != 4 or tuple(x.shape[1:]) != (c, s, s):
            raise ValueError(f"expected images of shape (B, {c}, {s}, {s}), got {tuple(x.shape)}")


class VQVAE2(_VQModel):
    """Two-level VQ-VAE: top codes at 1/8 of the image side, bottom codes at 1/4."""

    config_cls = VQVAE2Config
    levels = ("top", "bottom")

    def __init__(self, config: VQVAE2Config) -> None:
        super().__init__()
        self.config = config
        c, rb, rc = config.channels, config.res_blocks, config.res_channels
        d_t, d_b = config.quantizer_of("top").dim, config.quantizer_of("bottom").dim
        self.enc_bottom = Encoder(config.in_channels, c, rb, rc, factor=4)
        self.enc_top = Encoder(c, c, rb, rc, factor=2)
        self.pre_quant_top = nn.Conv2d(c, d_t, 1)
        self.dec_top = Decoder(d_t, d_b, c, rb, rc, factor=2)
        self.pre_quant_bottom = nn.Conv2d(c + d_b, d_b, 1)
        self.upsample_top = nn.ConvTranspose2d(d_t, d_t, 4, stride=2, padding=1)
        self.dec = Decoder(d_t + d_b, config.in_channels, c, rb, rc, factor=4)
        self.quantizers = nn.ModuleDict({lv: _quantizer(config.quantizer_of(lv)) for lv in self.levels})

    def encode(self, x: torch.Tensor) -> Encoding:
        self._check_image(x)
        h_b = self.enc_bottom(x)  # (B, C, S/4, S/4)
        h_t = self.enc_top(h_b)  # (B, C, S/8, S/8)
        q_t = self.quantizers["top"](self.pre_quant_top(h_t))
        cond = self.dec_top(q_t.quantized)  # (B, D_b, S/4, S/4): what the top codes already explain
        q_b = self.quantizers["bottom"](self.pre_quant_bottom(torch.cat([h_b, cond], dim=1)))
        return Encoding(
            codes=(q_t.codes, q_b.codes),
            quantized=(q_t.quantized, q_b.quantized),
            commit_loss=q_t.commit_loss + q_b.commit_loss,
            perplexity=(q_t.perplexity, q_b.perplexity),
        )

    def decode(self, quantized: tuple[torch.Tensor, ...]) -> torch.Tensor:
        q_t, q_b = quantized
        up = self.upsample_top(q_t)  # (B, D_t, S/4, S/4)
        return self.dec(torch.cat([up, q_b], dim=1))  # (B, C, S, S)


class VQVAE(_VQModel):
    """One-level VQ-VAE (van den Oord et al. 2017); its single code map is called ``top``."""

    config_cls = VQVAEConfig
    levels = ("top",)

    def __init__(self, config: VQVAEConfig) -> None:
        super().__init__()
        self.config = config
        c, rb, rc, d = config.channels, config.res_blocks, config.res_channels, config.quantizer.dim
        self.enc = Encoder(config.in_channels, c, rb, rc, factor=config.downsample)
        self.pre_quant = nn.Conv2d(c, d, 1)
        self.dec = Decoder(d, config.in_channels, c, rb, rc, factor=config.downsample)
        self.quantizers = nn.ModuleDict({"top": _quantizer(config.quantizer)})

    def encode(self, x: torch.Tensor) -> Encoding:
        self._check_image(x)
        q = self.quantizers["top"](self.pre_quant(self.enc(x)))
        return Encoding((q.codes,), (q.quantized,), q.commit_loss, (q.perplexity,))

    def decode(self, quantized: tuple[torch.Tensor, ...]) -> torch.Tensor:
        (q,) = quantized
        return self.dec(q)
