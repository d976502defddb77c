"""Finite scalar quantisation (FSQ, Mentzer et al. 2023, "Finite Scalar Quantization: VQ-VAE Made Simple").

Instead of a learnt codebook, each of the ``d = len(levels)`` channels of the encoder output is bounded to
``levels[i]`` values and rounded:

    z_i -> round(bound(z_i)) / (levels[i] // 2),   bound(z) = tanh(z + shift) * (L - 1) (1 + eps) / 2 - offset

(section 3, and appendix A.1 of the paper: an even ``L`` is shifted by half a step so that its ``L`` values are
symmetric about zero). The gradient passes straight through the rounding. The codebook is implicit: the grid of
``prod(levels)`` points, every one of which the encoder can reach, so there is no codebook collapse, no commitment
loss, no EMA state and nothing to keep in sync between ranks. A code's index is the mixed-radix number of its
per-channel digits (channel 0 the least significant).

In a VQ model the code dimension is ``len(levels)``: the model's projection into the quantiser and out of it are its
own 1x1 convolutions (``pre_quant_<level>`` and the decoder's first layer), which is exactly the paper's setup.
A level's codebook size override (``model.top_codebook_size``) picks the levels by :func:`levels_for`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

from steps.nn.quantize import MAX_CODEBOOK, Quantizer, QuantizerConfig, QuantizerOutput, sync_ranks

MIN_LEVEL, MAX_LEVEL = 3, 8  # values per channel: fewer than 3 wastes a channel, more than 8 the paper never needed


def levels_for(codebook_size: int) -> tuple[int, ...]:
    """FSQ levels with ``prod(levels) == codebook_size``: the fewest channels, each of 3 to 8 values, as even as
    possible, largest first (``levels_for(64) == (8, 8)``, ``levels_for(1000) == (8, 5, 5, 5)``, the paper's choice
    for 2^10 codes). Raises ValueError for a size with no such factorisation (a prime above 8, for example)."""

    def splits(n: int, most: int) -> list[tuple[int, ...]]:
        if n == 1:
            return [()]
        return [(f, *rest) for f in range(min(most, n), MIN_LEVEL - 1, -1) if n % f == 0 for rest in splits(n // f, f)]

    found = splits(codebook_size, MAX_LEVEL) if codebook_size >= MIN_LEVEL else []
    if not found:
        raise ValueError(
            f"must be a product of factors from {MIN_LEVEL} to {MAX_LEVEL} for FSQ (e.g. 64, 125, 240, 512, 1000), "
            f"got {codebook_size}"
        )
    return min(found, key=lambda ls: (len(ls), max(ls) - min(ls)))


@dataclass(frozen=True)
class FSQConfig(QuantizerConfig):
    """Hyper-parameters of finite scalar quantisation (kind ``fsq``).

    Attributes:
        levels: values per code channel (each 3 to 8 in practice, at least 2); the code dimension is their number and
            the codebook size their product (at most 32768: codes are stored as int16 downstream). The paper's
            recommendations: (8, 6, 5) for 240 codes, (8, 5, 5, 5) for 1000, (7, 5, 5, 5, 5) for 4375.
        eps: widens the tanh bound slightly, so that the outermost values are reached (the paper's 1e-3).
    """

    levels: tuple[int, ...] = (8, 5, 5, 5)
    eps: float = 1e-3

    @property
    def codebook_size(self) -> int:
        return math.prod(self.levels)

    @property
    def dim(self) -> int:
        return len(self.levels)

    def validate(self) -> None:
        self.require("levels", len(self.levels) >= 1 and all(lv >= 2 for lv in self.levels), "values >= 2")
        self.require("levels", self.codebook_size <= MAX_CODEBOOK, f"a product of at most {MAX_CODEBOOK}")
        self.require("eps", 0 <= self.eps < 1, "in [0, 1)")

    def resized(self, codebook_size: int | None = None, dim: int | None = None) -> FSQConfig:
        if dim is not None and dim != self.dim:
            raise self.error("dim", f"is len(levels)={self.dim} for FSQ; leave it unset, got {dim}")
        if codebook_size is None or codebook_size == self.codebook_size:
            return self
        try:
            return replace(self, levels=levels_for(codebook_size))
        except ValueError as exc:
            raise self.error("codebook_size", str(exc)) from None


class FSQuantizer(Quantizer):
    """Finite scalar quantiser (kind ``fsq``): an implicit codebook of ``prod(levels)`` grid points.

    Args:
        config: the levels.
        sync: all-reduce the per-batch code histogram (for the reported perplexity) across ranks. ``None``: whenever
            ``torch.distributed`` is initialised at call time. Nothing else needs syncing: FSQ has no codebook state.
    """

    config_cls = FSQConfig

    def __init__(self, config: FSQConfig, sync: bool | None = None) -> None:
        super().__init__()
        self.config = config
        self.sync = sync
        levels = torch.tensor(config.levels, dtype=torch.long)
        self.register_buffer("_levels", levels, persistent=False)
        self.register_buffer("_basis", torch.cumprod(torch.cat([levels.new_ones(1), levels[:-1]]), 0), persistent=False)
        self.register_buffer("usage", torch.zeros(config.codebook_size, dtype=torch.long), persistent=False)

    # ----------------------------------------------------------------------------------------------- the grid
    def _half_width(self) -> torch.Tensor:
        return (self._levels // 2).float()  # (d,)

    def _bound(self, z: torch.Tensor) -> torch.Tensor:
        """``z`` (N, d) squashed into each channel's range, so that rounding gives exactly ``levels[i]`` values."""
        levels = self._levels.float()
        half_l = (levels - 1) * (1 + self.config.eps) / 2
        offset = torch.where(self._levels % 2 == 0, 0.5, 0.0)
        shift = torch.atanh(offset / half_l)
        return torch.tanh(z + shift) * half_l - offset

    def _indices(self, digits: torch.Tensor) -> torch.Tensor:
        """Per-channel digits (N, d) in [0, levels[i]) -> code indices (N,)."""
        return (digits * self._basis).sum(dim=1)

    def _values(self, codes: torch.Tensor) -> torch.Tensor:
        """Code indices (...) -> grid points (..., d) in [-1, 1]."""
        digits = (codes.long()[..., None] // self._basis) % self._levels
        return (digits.float() - self._half_width()) / self._half_width()

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """Grid points of an integer code map: (B, H, W) -> (B, d, H, W)."""
        if codes.min() < 0 or codes.max() >= self.config.codebook_size:
            raise ValueError(
                f"code values must be in [0, {self.config.codebook_size}), got [{int(codes.min())}, {int(codes.max())}]"
            )
        return self._values(codes).permute(0, 3, 1, 2).contiguous()

    # ----------------------------------------------------------------------------------------------- forward
    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """Quantise ``z`` (B, d, H, W) to the grid; the gradient passes straight through the rounding."""
        d = self.config.dim
        if z.dim() != 4 or z.shape[1] != d:
            raise ValueError(f"expected input of shape (B, {d}, H, W), got {tuple(z.shape)}")
        with torch.autocast(device_type=z.device.type, enabled=False):
            z = z.float()
            b, _, h, w = z.shape
            bounded = self._bound(z.permute(0, 2, 3, 1).reshape(-1, d))  # (N, d)
            rounded = bounded + (bounded.round() - bounded).detach()  # straight-through
            half = self._half_width()
            codes = self._indices((rounded.detach() + half).long())  # (N,)
            counts = torch.bincount(codes, minlength=self.config.codebook_size).float()
            if self.training and sync_ranks(self.sync):
                dist.all_reduce(counts)
            self.usage += counts.long()
            quantized = (rounded / half).view(b, h, w, d).permute(0, 3, 1, 2)  # (B, d, H, W) in [-1, 1]
            probs = counts / counts.sum().clamp_min(1.0)
            perplexity = torch.exp(-(probs * torch.log(probs.clamp_min(1e-10))).sum())
        return QuantizerOutput(quantized, codes.view(b, h, w), z.new_zeros(()), perplexity)

    def extra_repr(self) -> str:
        return f"levels={list(self.config.levels)}, codebook_size={self.config.codebook_size}"
