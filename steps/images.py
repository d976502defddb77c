"""The image-shard contract and the conversions every step shares.

Image shards are Parquet files under ``<shard out>/<split>/`` with columns ``id: string``, ``label: int32``
(nullable) and ``image: binary`` (PNG bytes, already ``image_size`` square with ``channels`` channels). The schema
metadata key ``vqvae2.images`` holds ``{"image_size": S, "channels": C}`` so a reader can check what it got
without decoding a single image.

Models see float tensors (B, C, S, S) in [-1, 1]; files hold uint8.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
from PIL import Image

if TYPE_CHECKING:  # torch costs seconds to import in every Ray Data worker that only handles PNGs
    import torch

IMAGE_META_KEY = b"vqvae2.images"
SPLITS = ("train", "val")


def image_schema(image_size: int, channels: int, extra: dict | None = None) -> pa.Schema:
    meta = {"image_size": image_size, "channels": channels, **(extra or {})}
    return pa.schema(
        [("id", pa.string()), ("label", pa.int32()), ("image", pa.binary())],
        metadata={IMAGE_META_KEY: json.dumps(meta).encode()},
    )


def image_meta(schema: pa.Schema, where: str = "image shards") -> dict:
    """The image metadata of a shard schema, or a ValueError naming ``where``."""
    raw = (schema.metadata or {}).get(IMAGE_META_KEY)
    if raw is None:
        raise ValueError(f"{where}: not image shards of this pipeline (schema metadata {IMAGE_META_KEY!r} missing)")
    return json.loads(raw)


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


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Model output (B, C, S, S) in [-1, 1] -> uint8 (B, S, S) for C == 1 or (B, S, S, 3)."""
    arr = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().cpu().numpy()
    return arr[:, 0] if arr.shape[1] == 1 else arr.transpose(0, 2, 3, 1)


def grid_png(x: torch.Tensor, nrow: int | None = None, pad: int = 2) -> bytes:
    """Tile a batch (B, C, S, S) in [-1, 1] into one PNG, ``nrow`` images per row (default: square-ish)."""
    imgs = to_uint8(x)
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
