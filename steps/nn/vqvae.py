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

from steps.nn.blocks import Autoencoder, ConfigBase, Decoder, Encoder, check_positive, log2_exact
from steps.nn.quantize import QuantizerConfig, VectorQuantizerEMA


class Encoding(NamedTuple):
    """Per-level results of encoding a batch; levels are ordered top first (``model.levels``)."""

    codes: tuple[torch.Tensor, ...]  # each (B, H_l, W_l) int64
    quantized: tuple[torch.Tensor, ...]  # each (B, D_l, H_l, W_l), straight-through
    commit_loss: torch.Tensor  # scalar, summed over levels
    perplexity: tuple[torch.Tensor, ...]  # each scalar


@dataclass
class AutoencoderOutput:
    """What a training step needs from any autoencoder of this package."""

    recon: torch.Tensor  # (B, C, S, S)
    recon_loss: torch.Tensor  # scalar MSE
    aux_loss: torch.Tensor  # scalar: commitment loss (VQ) or weighted KL (VAE)
    stats: dict[str, torch.Tensor] = field(default_factory=dict)  # scalars to log, e.g. perplexity_top

    @property
    def loss(self) -> torch.Tensor:
        return self.recon_loss + self.aux_loss


@dataclass(frozen=True)
class _VQConfigFields(ConfigBase):
    """Fields shared by the one- and two-level models."""

    image_size: int = 32
    in_channels: int = 3
    channels: int = 128
    res_blocks: int = 2
    res_channels: int = 32
    codebook_size: int = 512
    embed_dim: int = 64
    beta: float = 0.25
    decay: float = 0.99
    eps: float = 1e-5
    restart_after: int = 20
    kmeans_init: bool = False

    def _validate(self, owner: str, multiple: int) -> None:
        check_positive(
            owner,
            in_channels=self.in_channels,
            channels=self.channels,
            res_channels=self.res_channels,
            embed_dim=self.embed_dim,
        )
        if self.res_blocks < 0:
            raise ValueError(f"{owner}.res_blocks must be >= 0, got {self.res_blocks}")
        if not 32 <= self.image_size <= 256 or self.image_size % multiple:
            raise ValueError(
                f"{owner}.image_size must be in [32, 256] and a multiple of {multiple}, got {self.image_size}"
            )

    def quantizer(self, codebook_size: int, dim: int) -> QuantizerConfig:
        return QuantizerConfig(
            codebook_size=codebook_size,
            dim=dim,
            beta=self.beta,
            decay=self.decay,
            eps=self.eps,
            restart_after=self.restart_after,
            kmeans_init=self.kmeans_init,
        )


@dataclass(frozen=True)
class VQVAE2Config(_VQConfigFields):
    """VQ-VAE-2 hyper-parameters. ``codebook_size``/``embed_dim`` apply to both levels unless a level overrides."""

    top_codebook_size: int | None = None
    bottom_codebook_size: int | None = None
    top_embed_dim: int | None = None
    bottom_embed_dim: int | None = None

    def __post_init__(self) -> None:
        self._validate("VQVAE2Config", 8)
        for name in ("top", "bottom"):
            self.quantizer(*self.level(name))  # validates codebook sizes, dims, beta, decay, ...

    def level(self, name: str) -> tuple[int, int]:
        """(codebook_size, embed_dim) of level ``name``."""
        size = getattr(self, f"{name}_codebook_size") or self.codebook_size
        dim = getattr(self, f"{name}_embed_dim") or self.embed_dim
        return size, dim

    @property
    def shapes(self) -> dict[str, tuple[int, int]]:
        return {"top": (self.image_size // 8,) * 2, "bottom": (self.image_size // 4,) * 2}


@dataclass(frozen=True)
class VQVAEConfig(_VQConfigFields):
    """One-level VQ-VAE: a single code map at ``image_size / downsample``."""

    downsample: int = 4

    def __post_init__(self) -> None:
        log2_exact("VQVAEConfig", "downsample", self.downsample)
        self._validate("VQVAEConfig", self.downsample)
        self.quantizer(self.codebook_size, self.embed_dim)

    def level(self, name: str) -> tuple[int, int]:
        return self.codebook_size, self.embed_dim

    @property
    def shapes(self) -> dict[str, tuple[int, int]]:
        return {"top": (self.image_size // self.downsample,) * 2}


class _VQModel(Autoencoder):
    """Shared forward/encode/decode plumbing; subclasses define the levels."""

    levels: tuple[str, ...]
    quantizers: nn.ModuleDict

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

    kind = "vqvae2"
    config_cls = VQVAE2Config
    levels = ("top", "bottom")

    def __init__(self, config: VQVAE2Config) -> None:
        super().__init__()
        self.config = config
        c, rb, rc = config.channels, config.res_blocks, config.res_channels
        (k_t, d_t), (k_b, d_b) = config.level("top"), config.level("bottom")
        self.enc_bottom = Encoder(config.in_channels, c, rb, rc, factor=4)
        self.enc_top = Encoder(c, c, rb, rc, factor=2)
        self.pre_quant_top = nn.Conv2d(c, d_t, 1)
        self.dec_top = Decoder(d_t, d_b, c, rb, rc, factor=2)
        self.pre_quant_bottom = nn.Conv2d(c + d_b, d_b, 1)
        self.upsample_top = nn.ConvTranspose2d(d_t, d_t, 4, stride=2, padding=1)
        self.dec = Decoder(d_t + d_b, config.in_channels, c, rb, rc, factor=4)
        self.quantizers = nn.ModuleDict(
            {
                "top": VectorQuantizerEMA(config.quantizer(k_t, d_t)),
                "bottom": VectorQuantizerEMA(config.quantizer(k_b, d_b)),
            }
        )

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

    kind = "vqvae"
    config_cls = VQVAEConfig
    levels = ("top",)

    def __init__(self, config: VQVAEConfig) -> None:
        super().__init__()
        self.config = config
        c, rb, rc = config.channels, config.res_blocks, config.res_channels
        self.enc = Encoder(config.in_channels, c, rb, rc, factor=config.downsample)
        self.pre_quant = nn.Conv2d(c, config.embed_dim, 1)
        self.dec = Decoder(config.embed_dim, config.in_channels, c, rb, rc, factor=config.downsample)
        self.quantizers = nn.ModuleDict(
            {"top": VectorQuantizerEMA(config.quantizer(config.codebook_size, config.embed_dim))}
        )

    def encode(self, x: torch.Tensor) -> Encoding:
        self._check_image(x)
        q = self.quantizers["top"](self.pre_quant(self.enc(x)))
        return Encoding((q.codes,), (q.quantized,), q.commit_loss, (q.perplexity,))

    def decode(self, quantized: tuple[torch.Tensor, ...]) -> torch.Tensor:
        (q,) = quantized
        return self.dec(q)
