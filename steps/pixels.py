"""Pixel conversions every step shares: PNG bytes <-> uint8 arrays <-> model tensors, and image grids.

Models see float tensors (B, C, S, S) in [-1, 1]; files hold uint8 PNGs.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:  # torch costs seconds to import in every Ray Data worker that only handles PNGs
    import torch


def encode_png(pixels: np.ndarray) -> bytes:
    """uint8 (H, W) or (H, W, 3) -> PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", optimize=False, compress_level=1)
    return buf.getvalue()


def decode_png(data: bytes, channels: int) -> np.ndarray:
    """PNG bytes -> uint8 (C, H, W)."""
    with Image.open(io.BytesIO(data)) as img:
        arr = np.asarray(img.convert("L" if channels == 1 else "RGB"))
    return arr[None] if channels == 1 else arr.transpose(2, 0, 1)


def decode_batch(images: Sequence[bytes], channels: int) -> np.ndarray:
    """A column of PNG bytes -> float32 (B, C, S, S) in [-1, 1]."""
    arr = np.stack([decode_png(b, channels) for b in images]).astype(np.float32)
    return arr / 127.5 - 1.0


def to_float(images: np.ndarray) -> torch.Tensor:
    """uint8 (B, C, S, S) -> float32 (B, C, S, S) in [-1, 1] (on the CPU)."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(images)).float() / 127.5 - 1.0


def to_uint8_chw(x: torch.Tensor) -> np.ndarray:
    """Model output (B, C, S, S) in [-1, 1] -> uint8 (B, C, S, S) (values clamped to the image range)."""
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().cpu().numpy()


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Model output (B, C, S, S) in [-1, 1] -> uint8 (B, S, S) for C == 1 or (B, S, S, 3): what PNGs hold."""
    return hwc(to_uint8_chw(x))


def hwc(pixels: np.ndarray) -> np.ndarray:
    """uint8 (B, C, S, S) -> (B, S, S) for C == 1 or (B, S, S, 3)."""
    return pixels[:, 0] if pixels.shape[1] == 1 else pixels.transpose(0, 2, 3, 1)


def chw(pixels: np.ndarray) -> np.ndarray:
    """uint8 (B, S, S) or (B, S, S, 3) -> (B, C, S, S); the inverse of :func:`hwc`."""
    return pixels[:, None] if pixels.ndim == 3 else pixels.transpose(0, 3, 1, 2)


def grid_png(x: torch.Tensor | np.ndarray, nrow: int | None = None, pad: int = 2) -> bytes:
    """Tile a batch into one PNG, ``nrow`` images per row (default: square-ish): a float tensor (B, C, S, S) in
    [-1, 1], or uint8 pixels (B, C, S, S)."""
    imgs = hwc(x) if isinstance(x, np.ndarray) else to_uint8(x)
    if imgs.ndim == 3:
        imgs = imgs[..., None]
    b, s, _, c = imgs.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(b)))
    rows = math.ceil(b / nrow)
    canvas = np.full((rows * (s + pad) + pad, nrow * (s + pad) + pad, c), 255, dtype=np.uint8)
    for i in range(b):
        r, col = divmod(i, nrow)
        y, x0 = pad + r * (s + pad), pad + col * (s + pad)
        canvas[y : y + s, x0 : x0 + s] = imgs[i]
    return encode_png(canvas[..., 0] if c == 1 else canvas)
