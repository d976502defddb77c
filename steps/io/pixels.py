"""Pixel conversions every step shares: PNG bytes <-> uint8 arrays <-> model tensors, and image grids.

Models see float tensors (B, C, S, S) in [-1, 1]; files hold uint8 PNGs. :func:`decode_image` turns any source image
(any mode, bit depth, orientation, size) into a square uint8 array and refuses decompression bombs by name.
"""

from __future__ import annotations

import contextlib
import io
import math
import re
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps

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


# ------------------------------------------------------------------------------------------ untrusted images
SERVED_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF")  # what the served models read


class ImageRejected(ValueError):
    """An untrusted image refused before its pixels are decoded; the message names the limit it broke."""


def decode_served(data: object, size: int, channels: int, max_bytes: int, what: str = "image") -> np.ndarray:
    """The bytes of an untrusted image file (a request to a served model) -> uint8 (C, size, size).

    Checked before any pixel is decoded: at most ``max_bytes`` bytes, one of :data:`SERVED_FORMATS`, and exactly
    ``size`` x ``size`` pixels by its header, so decoding costs at most the model's own image size whatever the file
    claims (a 140 KB PNG can claim a 12,000 x 12,000 canvas). Any mode is converted to ``channels``. With
    ``channels=0`` only the checks run (nothing is decoded; returns an empty array).

    Raises:
        ImageRejected: ``what`` and the limit it broke (bytes, format, size), or a damaged or truncated file.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ImageRejected(f"{what}: expected the bytes of an image file, got {type(data).__name__}")
    if len(data) > max_bytes:
        raise ImageRejected(f"{what}: {len(data)} bytes, over the limit of {max_bytes} bytes per image")
    try:
        with warnings.catch_warnings():  # the size is checked below, against the model's, not Pillow's loose limit
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(bytes(data)))  # reads the header only
    except Image.DecompressionBombError as exc:
        claimed = re.search(r"\((\d+) pixels\)", str(exc))
        pixels = f"{claimed.group(1)} pixels" if claimed else "a canvas too large for Pillow"
        raise ImageRejected(f"{what}: {pixels} by its header, but the model takes {size}x{size} images") from None
    except (Image.UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise ImageRejected(f"{what}: not an image file ({', '.join(SERVED_FORMATS)} are read)") from None
    with img:
        if img.format not in SERVED_FORMATS:
            raise ImageRejected(f"{what}: a {img.format} file; {', '.join(SERVED_FORMATS)} are read")
        if img.size != (size, size):
            w, h = img.size
            raise ImageRejected(f"{what}: {w}x{h} pixels by its header, but the model takes {size}x{size} images")
        if not channels:
            return np.zeros(0, np.uint8)
        try:
            img.load()
            arr = np.asarray(img.convert("L" if channels == 1 else "RGB"))
        except (OSError, ValueError, SyntaxError) as exc:
            raise ImageRejected(f"{what}: a damaged or truncated {img.format} file ({exc})") from None
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


MAX_PIXELS = 64 * 1024 * 1024  # larger images are refused as decompression bombs


# ------------------------------------------------------------------------------------------ decoding source images
def _rescale_to_uint8(arr: np.ndarray, mode: str) -> np.ndarray:
    """16/32-bit integer or float greyscale -> uint8, keeping the full range of the source bit depth."""
    arr = arr.astype(np.float64)
    top = float(arr.max()) if arr.size else 0.0
    if mode == "F":
        scale = 255.0 if top <= 1.0 else 1.0
    elif mode.startswith("I;16") or 255 < top <= 65535:
        scale = 255.0 / 65535.0
    else:
        scale = 1.0 if top <= 255 else 255.0 / top
    return np.clip(np.rint(arr * scale), 0, 255).astype(np.uint8)


def to_channels(img: Image.Image, channels: int) -> Image.Image:
    """Any Pillow mode -> "L" (channels=1) or "RGB" (channels=3); transparency is composited on white."""
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif img.mode == "PA":
        img = img.convert("RGBA")
    elif img.mode in ("LAB", "HSV"):  # Pillow converts these to RGB only, not straight to L
        img = img.convert("RGB")
    elif img.mode == "La":  # premultiplied alpha: Pillow converts it to LA only
        img = img.convert("LA")
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        img = Image.fromarray(_rescale_to_uint8(np.asarray(img), img.mode))
    if img.mode in ("LA", "La", "RGBA", "RGBa"):
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    target = "L" if channels == 1 else "RGB"
    return img if img.mode == target else img.convert(target)  # CMYK, YCbCr, 1, L <-> RGB


def fit_square(img: Image.Image, size: int) -> Image.Image:
    """Scale the short side to ``size`` and centre-crop (one resize over the centred square box)."""
    w, h = img.size
    side = min(w, h)
    box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
    if side > size:
        return img.resize((size, size), Image.Resampling.LANCZOS, box=box, reducing_gap=3.0)
    return img.resize((size, size), Image.Resampling.BICUBIC, box=box)


def _bomb(pixels: int, size: str = "") -> Image.DecompressionBombError:
    dims = f"{size} = " if size else ""
    return Image.DecompressionBombError(
        f"decompression bomb: the header claims {dims}{pixels} pixels, over the limit of {MAX_PIXELS}; not decoded"
    )


def decode_image(data: bytes, size: int, channels: int) -> np.ndarray:
    """Encoded image bytes -> uint8 (size, size) or (size, size, 3).

    Every failure says what is wrong, for the shard manifest: ``ValueError`` for an empty file,
    ``Image.UnidentifiedImageError`` for bytes no Pillow plugin recognises, ``Image.DecompressionBombError`` for a
    header that claims more than :data:`MAX_PIXELS` (refused before any pixel is decoded), ``OSError`` for truncated
    or corrupt pixel data; callers decide whether that skips or fails.
    """
    if not data:
        raise ValueError("empty file (0 bytes)")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
        except Image.UnidentifiedImageError:
            raise Image.UnidentifiedImageError(
                f"not an image: no format Pillow can read recognises these {len(data)} bytes"
            ) from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:  # Pillow's own, looser limit
            found = re.search(r"\((\d+) pixels\)", str(e))
            if found is None:
                raise Image.DecompressionBombError(f"decompression bomb: {e}") from None
            raise _bomb(int(found.group(1))) from None
        with img:
            w, h = img.size
            if w * h > MAX_PIXELS:
                raise _bomb(w * h, f"{w}x{h}")
            if img.format == "JPEG":
                img.draft(None, (2 * size, 2 * size))  # decode big JPEGs at a reduced scale: far faster
            try:
                img.load()
            except OSError as e:
                what = "truncated" if "truncated" in str(e) else "corrupt"
                raise OSError(f"{what} {img.format} file ({w}x{h} in the header): {e}") from None
            with contextlib.suppress(Exception):  # a broken EXIF block should not lose an otherwise good image
                ImageOps.exif_transpose(img, in_place=True)
            out = fit_square(to_channels(img, channels), size)
    return np.asarray(out, dtype=np.uint8)


def from_gray(pixels: np.ndarray, size: int, channels: int) -> np.ndarray:
    return np.asarray(
        fit_square(to_channels(Image.fromarray(np.ascontiguousarray(pixels, np.uint8)), channels), size), dtype=np.uint8
    )
