"""Source ``idx``: MNIST / Fashion-MNIST idx files, raw or gzipped (local paths).

``data.path`` is a folder holding ``train-images-idx3-ubyte[.gz]`` and/or ``t10k-images-idx3-ubyte[.gz]`` (read in
that order), or one images file. Ids are ``{train|t10k}-{index:05d}`` (for a single file, the prefix of its name
before ``-images``). Labels come from the labels file found next to each images file by name
(``*-labels-idx1-ubyte[.gz]``), else the images have none. The driver reads each file whole (so a truncated one
fails at listing, not on a worker) but keeps only the header and labels; a worker reads an images file once and
keeps the last two it read.
"""

from __future__ import annotations

import functools
import gzip
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from steps.io import storage
from steps.io.pixels import from_gray
from steps.io.sources import Item, Listing, Settings, Source
from steps.io.sources.common import read_file

IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC = 2051, 2049


def read_idx(path: str, header_only: bool = False) -> tuple[int, tuple[int, ...], np.ndarray | None]:
    """(magic, shape, data) of an MNIST idx file, gzipped or raw; ``data`` is None when ``header_only`` (the file is
    still read whole, so a truncated one fails on the driver rather than on a worker)."""
    raw = read_file(path, max_bytes=1 << 40)  # one file holds the whole dataset: no per-image limit
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4:
        raise ValueError(f"{path}: not an idx file (only {len(raw)} bytes)")
    magic = int.from_bytes(raw[:4], "big")
    ndim = {IDX_IMAGES_MAGIC: 3, IDX_LABELS_MAGIC: 1}.get(magic)
    if ndim is None:
        raise ValueError(
            f"{path}: not an idx file: magic number {magic}, expected {IDX_IMAGES_MAGIC} or {IDX_LABELS_MAGIC}"
        )
    shape = tuple(int(v) for v in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    offset = 4 + 4 * ndim
    if len(raw) - offset < int(np.prod(shape)):
        raise ValueError(f"{path}: truncated idx file: header says {shape}, found {len(raw) - offset} data bytes")
    data = None if header_only else np.frombuffer(raw, np.uint8, count=int(np.prod(shape)), offset=offset)
    return magic, shape, None if data is None else data.reshape(shape)


def _find_file(folder: str, names: Sequence[str]) -> str | None:
    return next((p for p in (os.path.join(folder, name) for name in names) if os.path.isfile(p)), None)


def list_idx(path: str, limit: int | None = None) -> Listing:
    """Images files (``train`` then ``t10k``) of a folder, or one images file; labels files are found by name."""
    if os.path.isdir(path):
        found = [
            (p, _find_file(path, [f"{p}-images-idx3-ubyte", f"{p}-images-idx3-ubyte.gz"])) for p in ("train", "t10k")
        ]
        pairs = [(prefix, f) for prefix, f in found if f is not None]
        if not pairs:
            raise ValueError(
                f"nothing to shard in {path}: no train-images-idx3-ubyte[.gz] or t10k-images-idx3-ubyte[.gz]"
            )
    elif os.path.isfile(path):
        name = os.path.basename(path)
        pairs = [(name.split("-images", 1)[0] if "-images" in name else name.split(".", 1)[0], path)]
    else:
        raise FileNotFoundError(f"shard.path {path!r} does not exist")
    items: list[Item] = []
    for prefix, images_file in pairs:
        magic, shape, _ = read_idx(images_file, header_only=True)
        if magic != IDX_IMAGES_MAGIC:
            raise ValueError(f"{images_file}: magic number {magic} is not an idx images file ({IDX_IMAGES_MAGIC})")
        name = os.path.basename(images_file).replace("images", "labels").replace("idx3", "idx1")
        base = name.removesuffix(".gz")
        labels_file = _find_file(os.path.dirname(images_file), [base, base + ".gz"])
        labels = None
        if labels_file is not None:
            magic, lshape, labels = read_idx(labels_file)
            if magic != IDX_LABELS_MAGIC:
                raise ValueError(f"{labels_file}: magic number {magic} is not an idx labels file ({IDX_LABELS_MAGIC})")
            if lshape[0] != shape[0]:
                raise ValueError(f"{labels_file}: {lshape[0]} labels for {shape[0]} images in {images_file}")
        n = shape[0] if limit is None else min(shape[0], limit - len(items))
        items.extend(
            {"id": f"{prefix}-{i:05d}", "label": None if labels is None else int(labels[i]), "ref": [images_file, i]}
            for i in range(n)
        )
    if not items:
        raise ValueError(f"nothing to shard in {path}: the idx files hold no images")
    return Listing(items)


@functools.lru_cache(maxsize=2)
def _idx_images(path: str) -> np.ndarray:
    return read_idx(path)[2]


class Idx(Source):
    def list(self, cfg: Settings) -> Listing:
        return list_idx(storage.absolute(cfg.path), cfg.limit)

    def load_one(self, ref: Any, cfg: Settings, prefetched: Any) -> np.ndarray:
        return from_gray(_idx_images(ref[0])[ref[1]], cfg.image_size, cfg.channels)
