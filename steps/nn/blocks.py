"""Convolutional building blocks and the common surface of the autoencoders (VQ-VAE-2, Razavi et al. 2019, fig. 2a).

An encoder halves the spatial side with each strided 4x4 convolution and ends in a residual stack; a decoder mirrors
it with transposed convolutions. Both follow the reference VQ-VAE architecture (van den Oord et al. 2017, section 4.1):
ReLU residual blocks of a 3x3 then a 1x1 convolution.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from steps.nn.config import ConfigBase

MIN_IMAGE, MAX_IMAGE = 32, 1024  # image sides the autoencoders take (1024: the paper's FFHQ model)


def log2_exact(value: int) -> int | None:
    """log2 of a power of two, else None."""
    return int(math.log2(value)) if value >= 1 and not value & (value - 1) else None


@dataclass(frozen=True)
class AutoencoderConfig(ConfigBase):
    """Base of the autoencoder configs (the role ``autoencoder`` of :mod:`steps.nn.registry`): the image and the
    width of the convolutional stacks, which every autoencoder of this package has."""

    role: ClassVar[str] = "autoencoder"

    image_size: int = 32
    in_channels: int = 3
    channels: int = 128
    res_blocks: int = 2
    res_channels: int = 32

    @property
    def image_multiple(self) -> int:
        """The image side must be a multiple of this (the total downsampling)."""
        return 1

    @property
    def levels(self) -> tuple[str, ...]:
        """The code maps it makes, top first; () for a model without codes."""
        return ()

    def validate(self) -> None:
        self.require_min(1, "in_channels", "channels", "res_channels")
        self.require_min(0, "res_blocks")
        m = self.image_multiple
        self.require(
            "image_size",
            MIN_IMAGE <= self.image_size <= MAX_IMAGE and self.image_size % m == 0,
            f"in [{MIN_IMAGE}, {MAX_IMAGE}] and a multiple of {m}",
        )


@dataclass(frozen=True)
class SingleScaleConfig(AutoencoderConfig):
    """An autoencoder with one latent map at ``image_size / downsample`` (the one-level VQ-VAE, the VAE)."""

    downsample: int = 4

    @property
    def image_multiple(self) -> int:
        return self.downsample

    def validate(self) -> None:
        self.require("downsample", log2_exact(self.downsample) is not None, "a power of two")
        super().validate()


class ResBlock(nn.Module):
    """x + conv1x1(relu(conv3x3(relu(x))))."""

    def __init__(self, channels: int, res_channels: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.ReLU(),
            nn.Conv2d(channels, res_channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(res_channels, channels, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(x)


class Encoder(nn.Module):
    """Downsample by ``factor`` (a power of two) with strided convolutions, then a residual stack."""

    def __init__(self, in_ch: int, channels: int, res_blocks: int, res_channels: int, factor: int) -> None:
        super().__init__()
        steps = log2_exact(factor)
        if steps is None:
            raise ValueError(f"Encoder factor must be a power of two, got {factor}")
        layers: list[nn.Module] = []
        ch = in_ch
        for i in range(steps):
            out = channels if i == steps - 1 else max(channels // 2, 1)
            layers += [nn.Conv2d(ch, out, 4, stride=2, padding=1), nn.ReLU()]
            ch = out
        layers.append(nn.Conv2d(ch, channels, 3, padding=1))
        layers += [ResBlock(channels, res_channels) for _ in range(res_blocks)]
        layers.append(nn.ReLU())
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Decoder(nn.Module):
    """A residual stack, then upsample by ``factor`` (a power of two) with transposed convolutions."""

    def __init__(self, in_ch: int, out_ch: int, channels: int, res_blocks: int, res_channels: int, factor: int) -> None:
        super().__init__()
        steps = log2_exact(factor)
        if steps is None:
            raise ValueError(f"Decoder factor must be a power of two, got {factor}")
        layers: list[nn.Module] = [nn.Conv2d(in_ch, channels, 3, padding=1)]
        layers += [ResBlock(channels, res_channels) for _ in range(res_blocks)]
        layers.append(nn.ReLU())
        ch = channels
        for i in range(steps):
            last = i == steps - 1
            out = out_ch if last else max(channels // 2, 1)
            layers.append(nn.ConvTranspose2d(ch, out, 4, stride=2, padding=1))
            if not last:
                layers.append(nn.ReLU())
            ch = out
        if steps == 0:
            layers.append(nn.Conv2d(ch, out_ch, 3, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


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


class Autoencoder(nn.Module):
    """Common surface of the autoencoders (the role ``autoencoder``).

    ``levels`` names the code maps, top first (empty for a model without codes; its config says which); a model with
    levels implements ``encode(x) -> Encoding`` and ``decode_codes(*codes)``. Every autoencoder returns an
    ``AutoencoderOutput`` from ``forward`` and decodes what ``encode`` gives it.
    """

    config_cls: ClassVar[type[AutoencoderConfig]]
    config: AutoencoderConfig

    @property
    def levels(self) -> tuple[str, ...]:
        return self.config.levels

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
