"""Convolutional building blocks shared by the autoencoders (VQ-VAE-2, Razavi et al. 2019, figure 2a).

An encoder halves the spatial side with each strided 4x4 convolution and ends in a residual stack; a decoder mirrors
it with transposed convolutions. Both follow the reference VQ-VAE architecture (van den Oord et al. 2017, section 4.1):
ReLU residual blocks of a 3x3 then a 1x1 convolution.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar, TypeVar

import torch
from torch import nn

T = TypeVar("T", bound="ConfigBase")


@dataclass(frozen=True)
class ConfigBase:
    """A frozen config that round-trips through the plain dicts stored in checkpoints (tuples become lists)."""

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any]) -> T:
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown field(s) {unknown}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def check_positive(owner: str, **values: int | float) -> None:
    """Raise ValueError naming ``owner.field`` for the first value that is not > 0."""
    for name, value in values.items():
        if value <= 0:
            raise ValueError(f"{owner}.{name} must be > 0, got {value}")


def log2_exact(owner: str, name: str, value: int) -> int:
    """log2 of a power of two, or a ValueError naming the field."""
    if value < 1 or value & (value - 1):
        raise ValueError(f"{owner}.{name} must be a power of two, got {value}")
    return int(math.log2(value))


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
        steps = log2_exact("Encoder", "factor", factor)
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
        steps = log2_exact("Decoder", "factor", factor)
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


class Autoencoder(nn.Module):
    """Common surface of the autoencoders: a ``kind`` name, a ``config`` and the checkpoint constructor."""

    kind: ClassVar[str]
    config_cls: ClassVar[type[ConfigBase]]
    config: ConfigBase

    @classmethod
    def from_config_dict(cls, data: dict[str, Any]) -> Autoencoder:
        return cls(cls.config_cls.from_dict(data))

    @classmethod
    def from_checkpoint(cls, source: Any) -> Autoencoder:
        """Rebuild a model of this class from a checkpoint path, bytes or payload; no external config needed."""
        from steps.nn.checkpoint import load_model  # deferred: checkpoint imports every model module

        model, _ = load_model(source, expect=cls.kind)
        return model

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
