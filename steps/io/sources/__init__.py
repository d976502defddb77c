"""The one registry of the shard step's data sources: source name -> the ``module:Class`` that reads it.

Every other place asks this table (which names ``data.source`` may take, whether a source needs ``data.path``, how
to list and load one); nothing else names sources. Adding a source is one module in this package (a
:class:`Source` subclass), one line in :data:`SOURCES` and one ``conf/data/<source>.yaml`` (docs/architecture.md).
Source modules are imported on first use, by name, so one with a heavy dependency costs nothing until it is asked for.

A source works in two places. Listing (:meth:`Source.list`) runs on the driver and returns small picklable *items*
``{"id", "label", "ref"}`` in a deterministic order; loading (:meth:`Source.load`) runs on Ray Data workers and turns
a chunk of items into pixels. No Ray here, so every piece is unit-testable in plain Python.

The sources the project ships (each module's docstring says what it reads, its ids and its labels):

- ``digits`` (:mod:`.digits`): scikit-learn's bundled 8x8 digits; no ``path``;
- ``image_folder`` (:mod:`.image_folder`): image files under a folder, class sub-folders as labels;
- ``parquet`` (:mod:`.parquet`): Hugging-Face-style Parquet tables of encoded images;
- ``idx`` (:mod:`.idx`): MNIST / Fashion-MNIST idx files.

Shared file helpers are in :mod:`.common`; image decoding in
:mod:`steps.io.pixels`.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from steps.io import reading

Item = dict[str, Any]  # {"id": str, "label": int | None, "ref": source-specific, JSON-serialisable}
Loaded = tuple[Item, np.ndarray | None, str | None, str]  # (item, pixels or None, reason when unreadable, where)

SOURCES: dict[str, str] = {
    "digits": "steps.io.sources.digits:Digits",
    "image_folder": "steps.io.sources.image_folder:ImageFolder",
    "parquet": "steps.io.sources.parquet:Parquet",
    "idx": "steps.io.sources.idx:Idx",
}


class UnknownSourceError(ValueError):
    """A source name that is not in :data:`SOURCES`."""


class Settings(Protocol):
    """What a source reads of the shard step's settings (``steps.shard.ShardConfig`` is one; ``path`` as given)."""

    source: str
    path: str | None
    limit: int | None
    image_size: int
    channels: int
    image_column: str
    label_column: str | None
    id_column: str | None
    read_timeout_s: float
    max_file_mb: int


@dataclass
class Listing:
    """What the driver found: the items in deterministic order, plus facts for the manifest."""

    items: list[Item]
    classes: list[str] | None = None
    ignored_files: int = 0
    unreadable: list[dict] = field(default_factory=list)  # {"path", "reason"}: entries found but never opened
    extra: dict[str, Any] = field(default_factory=dict)


class Source:
    """One kind of input. Subclasses implement :meth:`list` and :meth:`load_one` (and :meth:`prefetch` or
    :meth:`where` when a chunk's items share a read, or are best named otherwise than by id). Instances are
    stateless; :func:`get` makes one per name and the registry gives it its ``name``."""

    needs_path: bool = True  # data.path must be set (False: it must be unset)
    path_hint: str = ""  # appended to the "path must be unset" error of a source without a path

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"

    def list(self, cfg: Settings) -> Listing:
        """The items of the source ``cfg`` describes (``cfg.limit`` of them at most), on the driver.

        Raises:
            ValueError: an empty or malformed source. FileNotFoundError: ``cfg.path`` does not exist.
        """
        raise NotImplementedError

    def prefetch(self, items: Sequence[Item], cfg: Settings, deadline: reading.Deadline) -> Any:
        """What a chunk's items share, read once before them (each read through ``deadline``); default None."""
        return None

    def load_one(self, ref: Any, cfg: Settings, prefetched: Any) -> np.ndarray:
        """The uint8 pixels (S, S) or (S, S, 3) of one item's ``ref``; raises for an unreadable one."""
        raise NotImplementedError

    def where(self, item: Item) -> str:
        """How the manifest names an item it skipped (valid UTF-8): its id, unless the source knows better."""
        return item["id"]

    def load(self, items: Sequence[Item], cfg: Settings) -> Iterator[Loaded]:
        """(item, pixels or None, reason when unreadable, where) per item, in order; never raises for one bad image.

        Reading and decoding one item (and each read of :meth:`prefetch`) waits at most ``cfg.read_timeout_s``
        (0: no limit); an item that overruns is unreadable with that reason, and the next one is read on a fresh
        thread.
        """
        with reading.Deadline(cfg.read_timeout_s) as deadline:
            prefetched = self.prefetch(items, cfg, deadline)
            for it in items:
                where = self.where(it)
                try:
                    pixels = deadline.call(self.load_one, it["ref"], cfg, prefetched)
                except Exception as e:  # any read or decoder failure is a bad file; the caller skips or fails
                    yield it, None, f"{type(e).__name__}: {e}", where
                    continue
                yield it, pixels, None, where


# ------------------------------------------------------------------------------------------------ the registry
def get(name: str) -> Source:
    """The source called ``name`` (its module imported on first use)."""
    target = SOURCES.get(name)
    if target is None:
        raise UnknownSourceError(f"unknown data source {name!r}; known: {list(names())} (steps/io/sources)")
    return _instance(name, target)


def names() -> tuple[str, ...]:
    """The source names, in registry order."""
    return tuple(SOURCES)


@functools.cache
def _instance(name: str, target: str) -> Source:
    module, _, cls_name = target.partition(":")
    cls = getattr(importlib.import_module(module), cls_name)
    if not (isinstance(cls, type) and issubclass(cls, Source)):
        raise TypeError(f"data source {name!r}: {target} is not a steps.io.sources.Source subclass")
    return cls(name)


# ------------------------------------------------------------------------------------------------ split
def split_of(image_id: str, val_fraction: float, salt: str = "") -> str:
    """ "val" when sha256(salt, id) maps below ``val_fraction`` in [0, 1), else "train": order-independent."""
    digest = hashlib.sha256(f"{salt}\0{image_id}".encode("utf-8", "surrogateescape")).digest()
    return "val" if int.from_bytes(digest[:8], "big") / 2**64 < val_fraction else "train"
