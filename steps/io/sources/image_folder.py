"""Source ``image_folder``: the image files under a folder (local or any pyarrow filesystem URI).

Files with an image extension (:data:`IMAGE_EXTENSIONS`, any case) anywhere under the root, hidden names left out,
in sorted order; ids are their posix paths relative to the root (undecodable bytes of a name written as ``\\xNN``).
The first sub-folder's name is a file's class: sorted class names -> labels 0..n-1; images directly in the root have
no label. Entries that are not regular files are skipped with a reason at listing, never opened; other files are
counted as ignored. A worker reads each file (at most ``data.max_file_mb``) and decodes it with
:func:`steps.io.pixels.decode_image`.
"""

from __future__ import annotations

import posixpath
from typing import Any

import numpy as np
import pyarrow.fs as pafs

from steps.io import storage
from steps.io.pixels import decode_image
from steps.io.sources import Item, Listing, Settings, Source
from steps.io.sources.common import path_kind, printable, read_file, under, walk_files

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})


def list_image_folder(root: str, limit: int | None = None) -> Listing:
    """The images under ``root`` (the first ``limit`` of them; classes and counts are the whole folder's)."""
    if path_kind(root) != pafs.FileType.Directory:
        raise ValueError(f"shard.path {root!r} must be a folder for this source")
    images, unreadable, ignored = walk_files(root, lambda r: posixpath.splitext(r)[1].lower() in IMAGE_EXTENSIONS)
    if not images:
        exts = " ".join(sorted(IMAGE_EXTENSIONS))
        raise ValueError(f"nothing to shard in {root}: no image files ({exts}) found")
    classes = sorted({r.split("/", 1)[0] for r in images if "/" in r})
    index = {c: i for i, c in enumerate(classes)}
    items = [
        {
            "id": printable(r),
            "label": index[r.split("/", 1)[0]] if "/" in r else None,
            "ref": under(root, r),
        }
        for r in images
    ]
    return Listing(items[:limit], classes=[printable(c) for c in classes], ignored_files=ignored, unreadable=unreadable)


class ImageFolder(Source):
    def list(self, cfg: Settings) -> Listing:
        return list_image_folder(storage.absolute(cfg.path), cfg.limit)

    def load_one(self, ref: Any, cfg: Settings, prefetched: Any) -> np.ndarray:
        return decode_image(read_file(ref, cfg.max_file_mb << 20), cfg.image_size, cfg.channels)

    def where(self, item: Item) -> str:
        return printable(item["ref"])  # the manifest is UTF-8 JSON: no undecodable bytes of a file name
