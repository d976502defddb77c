"""Hierarchical VQ-VAE-2 (Razavi et al. 2019, section 3.1, figure 2a) with any number of levels, and the one-level
VQ-VAE it extends.

``factors`` lists the downsampling from the image to the bottom level, then from each level to the next coarser one:
``[4, 2]`` (the default) encodes an image of side S into a bottom map at S/4 and a top map at S/8; the paper's
three-level FFHQ-1024 model is ``[8, 2, 2]`` (bottom 128, middle 64, top 32). Levels are named top first: ``top``,
``bottom``; with three levels ``top``, ``middle``, ``bottom``; with more ``top``, ``middle1``, ..., ``bottom``.

The top features are quantised first. Each finer level is quantised after what the coarser levels already explain
is decoded into its resolution and concatenated with its features (the paper's "conditioned on the top"), so its codes
only carry what the coarser ones could not. The image decoder sees every level: the coarser code vectors upsampled to
the bottom's resolution, concatenated with the bottom's. Images are float tensors in [-1, 1].
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from steps.nn import registry
from steps.nn.blocks import (
    Autoencoder,
    AutoencoderConfig,
    AutoencoderOutput,
    Decoder,
    Encoder,
    SingleScaleConfig,
    log2_exact,
)
from steps.nn.config import FieldError, later
from steps.nn.quantize import EMAQuantizerConfig, Quantizer, QuantizerConfig


class Encoding(NamedTuple):
    """Per-level results of encoding a batch; levels are ordered top first (``model.levels``)."""

    codes: tuple[torch.Tensor, ...]  # each (B, H_l, W_l) int64
    quantized: tuple[torch.Tensor, ...]  # each (B, D_l, H_l, W_l), straight-through
    commit_loss: torch.Tensor  # scalar, summed over levels
    perplexity: tuple[torch.Tensor, ...]  # each scalar


def level_names(count: int) -> tuple[str, ...]:
    """Names of ``count`` >= 2 levels, top first: top, [middle | middle1, middle2, ...], bottom."""
    middles = ("middle",) if count == 3 else tuple(f"middle{i}" for i in range(1, count - 1))
    return ("top", *middles, "bottom")


@dataclass(frozen=True)
class VQVAE2Config(AutoencoderConfig):
    """VQ-VAE-2 hyper-parameters.

    Attributes:
        factors: the downsampling from the image to the bottom level, then from each level to the next coarser one
            (powers of two, at least two: one per level). Their product divides ``image_size``.
        quantizer: every level's codebook; a level may override its size and code dimension
            (``top_codebook_size``, ``bottom_embed_dim``, ...; ``middle_*`` applies to every level between).
    """

    quantizer: QuantizerConfig = field(default_factory=EMAQuantizerConfig)
    top_codebook_size: int | None = None
    bottom_codebook_size: int | None = None
    top_embed_dim: int | None = None
    bottom_embed_dim: int | None = None
    factors: tuple[int, ...] = later((4, 2))
    middle_codebook_size: int | None = later(None)
    middle_embed_dim: int | None = later(None)

    @property
    def image_multiple(self) -> int:
        return math.prod(self.factors)

    @property
    def levels(self) -> tuple[str, ...]:
        return level_names(len(self.factors))

    def validate(self) -> None:
        self.require("factors", len(self.factors) >= 2, "a list of at least two factors (one per level)")
        self.require("factors", all(f >= 2 and log2_exact(f) for f in self.factors), "powers of two >= 2")
        m = self.image_multiple
        if self.image_size % m:
            raise self.error(
                "factors", f"{list(self.factors)} multiply to {m}, which must divide image_size={self.image_size}"
            )
        super().validate()
        for level in ("top", "middle", "bottom"):
            self.quantizer_of(level)  # checks the level's overrides
        if len(self.factors) == 2:
            for name in ("middle_codebook_size", "middle_embed_dim"):
                self.require(name, getattr(self, name) is None, "unset: two levels have no middle level")

    def quantizer_of(self, level: str) -> QuantizerConfig:
        """The quantiser config of ``level``: ``quantizer`` with the level's overrides."""
        kind = level if level in ("top", "bottom") else "middle"
        size, dim = getattr(self, f"{kind}_codebook_size"), getattr(self, f"{kind}_embed_dim")
        try:
            return self.quantizer.resized(size, dim)
        except FieldError as exc:
            override = {"codebook_size": f"{kind}_codebook_size", "dim": f"{kind}_embed_dim"}.get(exc.field)
            raise self.error(override, exc.problem) if override else exc from None

    def scale(self, level: str) -> int:
        """How many image pixels one code of ``level`` spans along each side."""
        below = len(self.levels) - self.levels.index(level)  # the factors from the image up to this level
        return math.prod(self.factors[:below])

    @property
    def shapes(self) -> dict[str, tuple[int, int]]:
        """(H, W) of each level's code map."""
        return {lv: (self.image_size // self.scale(lv),) * 2 for lv in self.levels}

    @property
    def codebook_sizes(self) -> dict[str, int]:
        return {level: self.quantizer_of(level).codebook_size for level in self.levels}


@dataclass(frozen=True)
class VQVAEConfig(SingleScaleConfig):
    """One-level VQ-VAE: a single code map at ``image_size / downsample``."""

    quantizer: QuantizerConfig = field(default_factory=EMAQuantizerConfig)

    @property
    def levels(self) -> tuple[str, ...]:
        return ("top",)

    def quantizer_of(self, level: str) -> QuantizerConfig:
        return self.quantizer

    def scale(self, level: str) -> int:
        return self.downsample

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

    def decoder_modules(self) -> list[nn.Module]:  # pragma: no cover - abstract
        """The modules :meth:`decode` uses and :meth:`encode` does not, the image-making layer last: what
        ``tune_decoder`` retrains while the codes stay as they are."""
        raise NotImplementedError

    def decoder_parameter_names(self) -> set[str]:
        """Names (as in ``state_dict``) of the parameters of :meth:`decoder_modules`."""
        own = {id(p) for m in self.decoder_modules() for p in m.parameters()}
        return {name for name, p in self.named_parameters() if id(p) in own}

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
    """VQ-VAE-2 with ``len(config.factors)`` levels (module docstring). Its modules are named by level
    (``enc_<level>``, ``pre_quant_<level>``, ``dec_<level>``: the coarser levels decoded into the next finer one's
    resolution, ``upsample_<level>``: to the bottom's, for the image decoder), so a two-level model's are the names
    two-level checkpoints hold."""

    config_cls = VQVAE2Config

    def __init__(self, config: VQVAE2Config) -> None:
        super().__init__()
        self.config = config
        c, rb, rc, f = config.channels, config.res_blocks, config.res_channels, config.factors
        names = config.levels
        dims = {lv: config.quantizer_of(lv).dim for lv in names}
        # Built in this order (encoders bottom up, then each level top down) so a two-level model draws the same
        # initial weights as before levels were a setting.
        for j, lv in enumerate(reversed(names)):
            self.add_module(f"enc_{lv}", Encoder(config.in_channels if j == 0 else c, c, rb, rc, factor=f[j]))
        for i, lv in enumerate(names):
            width = c + (dims[lv] if i else 0)  # below the top: the level's features and what the coarser explain
            self.add_module(f"pre_quant_{lv}", nn.Conv2d(width, dims[lv], 1))
            if i + 1 < len(names):  # the coarser levels' stream (this level's code vectors, and below the top what
                finer = names[i + 1]  # explained it) decoded to the next finer level's resolution
                stream = dims[lv] * (2 if i else 1)
                self.add_module(
                    f"dec_{lv}", Decoder(stream, dims[finer], c, rb, rc, factor=config.scale(lv) // config.scale(finer))
                )
        for lv in names[:-1]:
            up = config.scale(lv) // config.scale(names[-1])
            self.add_module(
                f"upsample_{lv}", nn.ConvTranspose2d(dims[lv], dims[lv], 2 * up, stride=up, padding=up // 2)
            )
        self.dec = Decoder(sum(dims.values()), config.in_channels, c, rb, rc, factor=f[0])
        self.quantizers = nn.ModuleDict({lv: _quantizer(config.quantizer_of(lv)) for lv in names})

    def encode(self, x: torch.Tensor) -> Encoding:
        self._check_image(x)
        features, h = {}, x
        for lv in reversed(self.levels):  # bottom up: (B, C, S / scale, S / scale) per level
            h = features[lv] = getattr(self, f"enc_{lv}")(h)
        out, stream = [], None
        for i, lv in enumerate(self.levels):
            h = features[lv]
            if i:  # what the coarser levels already explain, decoded to this level: (B, D_l, H_l, W_l)
                explained = getattr(self, f"dec_{self.levels[i - 1]}")(stream)
                h = torch.cat([h, explained], dim=1)
            q = self.quantizers[lv](getattr(self, f"pre_quant_{lv}")(h))
            out.append(q)
            stream = q.quantized if i == 0 else torch.cat([q.quantized, explained], dim=1)
        commit = out[0].commit_loss
        for q in out[1:]:
            commit = commit + q.commit_loss
        return Encoding(
            codes=tuple(q.codes for q in out),
            quantized=tuple(q.quantized for q in out),
            commit_loss=commit,
            perplexity=tuple(q.perplexity for q in out),
        )

    def decode(self, quantized: tuple[torch.Tensor, ...]) -> torch.Tensor:
        *coarse, bottom = quantized
        ups = [getattr(self, f"upsample_{lv}")(q) for lv, q in zip(self.levels, coarse, strict=False)]
        return self.dec(torch.cat([*ups, bottom], dim=1))  # (B, C, S, S)

    def decoder_modules(self) -> list[nn.Module]:
        return [getattr(self, f"upsample_{lv}") for lv in self.levels[:-1]] + [self.dec]


class VQVAE(_VQModel):
    """One-level VQ-VAE (van den Oord et al. 2017); its single code map is called ``top``."""

    config_cls = VQVAEConfig

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

    def decoder_modules(self) -> list[nn.Module]:
        return [self.dec]
