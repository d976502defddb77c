"""Source ``digits``: scikit-learn's bundled handwritten digits, the embedded default (no ``path``, no download).

1797 images of 8x8 pixels (0..16, scaled to 0..255) with labels 0..9; ids ``digits-00000``, ``digits-00001``, ...
in the dataset's order. The pixels are so small that they travel in the items themselves: workers read no file.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from steps.io.pixels import from_gray
from steps.io.sources import Listing, Settings, Source


def list_digits(limit: int | None = None) -> Listing:
    """The first ``limit`` digits (all for None); each item's ``ref`` is its 64 pixels."""
    from sklearn.datasets import load_digits  # deferred: importing scikit-learn takes a second

    digits = load_digits()
    pixels = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)  # (N, 8, 8)
    n = len(pixels) if limit is None else min(limit, len(pixels))
    items = [
        {"id": f"digits-{i:05d}", "label": int(digits.target[i]), "ref": pixels[i].ravel().tolist()} for i in range(n)
    ]
    return Listing(items, classes=[str(c) for c in range(10)])


class Digits(Source):
    needs_path = False
    path_hint = " (the digits are bundled; did you mean image_folder?)"

    def list(self, cfg: Settings) -> Listing:
        return list_digits(cfg.limit)

    def load_one(self, ref: Any, cfg: Settings, prefetched: Any) -> np.ndarray:
        return from_gray(np.asarray(ref, np.uint8).reshape(8, 8), cfg.image_size, cfg.channels)
