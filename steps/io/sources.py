"""Reading the shard step's four sources, and turning any image into a square uint8 array.

Listing (``list_*``) runs on the driver and yields small picklable *items* ``{"id", "label", "ref"}`` in a
deterministic order; loading (:func:`load_items`) runs on Ray Data workers and turns items into pixels. No Ray here,
so every piece is unit-testable in plain Python.

Sources and their ids:

- ``digits``: scikit-learn's bundled 8x8 digits (1797 images, labels 0..9), ids ``digits-00000``.
- ``image_folder``: files under a root, ids are posix paths relative to the root; a class sub-folder's name becomes
  its label (sorted names -> 0..n-1), images directly in the root have no label.
- ``parquet``: a file or a folder of them, Hugging-Face style: the image column holds encoded bytes or a struct
  ``{bytes, path}``; ids come from ``id_column`` or are ``{file stem}-{row}``.
- ``idx``: MNIST / Fashion-MNIST idx files (optionally gzipped), ids ``{train|t10k}-{index:05d}``.
"""

from __future__ import annotations

import bisect
import functools
import gzip
import hashlib
import os
import posixpath
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from steps.io import reading
from steps.io.pixels import MAX_PIXELS, decode_image, fit_square, from_gray, to_channels
from steps.io.storage import filesystem, is_local, read_bytes

__all__ = ["MAX_PIXELS", "decode_image", "fit_square", "to_channels"]  # image decoding lives in steps.io.pixels

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
MAX_FILE_BYTES = 64 * 1024 * 1024  # data.max_file_mb's default
IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC = 2051, 2049

Item = dict[str, Any]  # {"id": str, "label": int | None, "ref": source-specific, JSON-serialisable}


@dataclass
class Listing:
    """What the driver found: the items in deterministic order, plus facts for the manifest."""

    items: list[Item]
    classes: list[str] | None = None
    ignored_files: int = 0
    unreadable: list[dict] = field(default_factory=list)  # {"path", "reason"}: entries found but never opened
    extra: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------ split
def split_of(image_id: str, val_fraction: float, salt: str = "") -> str:
    """ "val" when sha256(salt, id) maps below ``val_fraction`` in [0, 1), else "train": order-independent."""
    digest = hashlib.sha256(f"{salt}\0{image_id}".encode("utf-8", "surrogateescape")).digest()
    return "val" if int.from_bytes(digest[:8], "big") / 2**64 < val_fraction else "train"


# ------------------------------------------------------------------------------------------------ listing
def walk_files(root: str, wanted: Callable[[str], bool] = lambda rel: True) -> tuple[list[str], list[dict], int]:
    """``(files, skipped, ignored)`` under ``root`` (see :func:`steps.io.reading.walk`); hidden names are left out.

    Local folders follow symlinks but visit each real directory once, so a link loop cannot hang the walk; entries
    that are not regular files (FIFOs, sockets, devices, broken links) are skipped with a reason, never opened.
    """
    if not is_local(root):
        fs, base = filesystem(root)
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=True))
        rels = [posixpath.relpath(i.path, base) for i in infos if i.type == pafs.FileType.File]
        rels = sorted(r for r in rels if not any(p.startswith(".") for p in r.split("/")))
        return [r for r in rels if wanted(r)], [], sum(1 for r in rels if not wanted(r))
    root = root.removeprefix("file://")
    files, skipped, ignored = reading.walk(root, wanted)
    return files, [{"path": _printable(_under(root, p)), "reason": why} for p, why in skipped], ignored


def _printable(name: str) -> str:
    """A file name that may hold undecodable bytes (surrogate escapes) as a valid UTF-8 string."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _read(uri: str, max_bytes: int = MAX_FILE_BYTES) -> bytes:
    if "://" in uri:
        return read_bytes(uri)
    return reading.read_regular(uri, max_bytes)  # a plain path: file names need not be valid UTF-8


def _kind(path: str) -> pafs.FileType:
    """What is at ``path`` (a file or a folder), or FileNotFoundError naming the setting."""
    fs, p = filesystem(path)
    kind = fs.get_file_info(p).type
    if kind == pafs.FileType.NotFound:
        raise FileNotFoundError(f"shard.path {path!r} does not exist")
    if kind not in (pafs.FileType.File, pafs.FileType.Directory):  # a FIFO or a device: opening it could hang
        raise ValueError(f"shard.path {path!r} is {reading.problem(p) or 'neither a file nor a folder'}")
    return kind


def _under(root: str, rel: str) -> str:
    """``rel`` (a "/"-separated path from :func:`walk_files`) under ``root``."""
    return posixpath.join(root, rel) if "://" in root else os.path.join(root, *rel.split("/"))


def list_digits(limit: int | None = None) -> Listing:
    """scikit-learn's bundled digits; the 8x8 pixels (0..16 scaled to 0..255) travel in the item itself."""
    from sklearn.datasets import load_digits  # deferred: importing scikit-learn takes a second

    digits = load_digits()
    pixels = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)  # (N, 8, 8)
    n = len(pixels) if limit is None else min(limit, len(pixels))
    items = [
        {"id": f"digits-{i:05d}", "label": int(digits.target[i]), "ref": pixels[i].ravel().tolist()} for i in range(n)
    ]
    return Listing(items, classes=[str(c) for c in range(10)])


def list_image_folder(root: str) -> Listing:
    if _kind(root) != pafs.FileType.Directory:
        raise ValueError(f"shard.path {root!r} must be a folder for this source")
    images, unreadable, ignored = walk_files(root, lambda r: posixpath.splitext(r)[1].lower() in IMAGE_EXTENSIONS)
    if not images:
        exts = " ".join(sorted(IMAGE_EXTENSIONS))
        raise ValueError(f"nothing to shard in {root}: no image files ({exts}) found")
    classes = sorted({r.split("/", 1)[0] for r in images if "/" in r})
    index = {c: i for i, c in enumerate(classes)}
    items = [
        {
            "id": _printable(r),
            "label": index[r.split("/", 1)[0]] if "/" in r else None,
            "ref": _under(root, r),
        }
        for r in images
    ]
    return Listing(items, classes=[_printable(c) for c in classes], ignored_files=ignored, unreadable=unreadable)


def _parquet_files(path: str) -> list[tuple[str, str]]:
    """(uri, stem) per Parquet file: stem is the path relative to the folder without the suffix."""
    if _kind(path) == pafs.FileType.File:
        return [(path, posixpath.splitext(posixpath.basename(filesystem(path)[1]))[0])]
    rels = walk_files(path, lambda r: r.lower().endswith(".parquet"))[0]
    return [(_under(path, r), r[: -len(".parquet")]) for r in rels]


def _open_parquet(uri: str) -> pq.ParquetFile:
    fs, p = filesystem(uri)
    return pq.ParquetFile(p, filesystem=fs)


def list_parquet(
    path: str, image_column: str, label_column: str | None, id_column: str | None, limit: int | None
) -> Listing:
    files = _parquet_files(path)
    items: list[Item] = []
    raw_labels: list[Any] = []
    for uri, stem in files:
        if limit is not None and len(items) >= limit:
            break
        try:
            pf = _open_parquet(uri)
        except (pa.ArrowException, OSError) as e:
            raise ValueError(f"{uri}: not a readable Parquet file: {e}") from e
        schema = pf.schema_arrow
        if image_column not in schema.names:
            raise ValueError(
                f"{uri}: no image column {image_column!r} (columns: {schema.names}); set shard.image_column"
            )
        kind = schema.field(image_column).type
        is_bytes = pa.types.is_binary(kind) or pa.types.is_large_binary(kind)
        if not (is_bytes or (pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0)):
            raise ValueError(
                f"{uri}: image column {image_column!r} has type {kind}; expected binary or struct{{bytes, path}}"
            )
        if id_column is not None and id_column not in schema.names:
            raise ValueError(f"{uri}: no id column {id_column!r} (columns: {schema.names}); set shard.id_column")
        has_label = label_column is not None and label_column in schema.names
        columns = [c for c in (id_column, label_column if has_label else None) if c is not None]
        table = pf.read(columns=columns) if columns else None
        n = pf.metadata.num_rows if limit is None else min(pf.metadata.num_rows, limit - len(items))
        ids = [f"{stem}-{row}" for row in range(n)]
        if id_column is not None:
            ids = [str(v) if v is not None else None for v in table.column(id_column).slice(0, n).to_pylist()]
            if None in ids:
                raise ValueError(f"{uri}: id column {id_column!r} has nulls")
        if has_label:
            col = table.column(label_column).slice(0, n)
            if pa.types.is_dictionary(col.type):
                col = col.cast(col.type.value_type)
            if not (
                pa.types.is_integer(col.type) or pa.types.is_string(col.type) or pa.types.is_large_string(col.type)
            ):
                raise ValueError(
                    f"{uri}: label column {label_column!r} has type {col.type}; expected integer or string"
                )
            raw_labels.extend(col.to_pylist())
        else:
            raw_labels.extend([None] * n)
        items.extend({"id": ids[row], "label": None, "ref": [uri, row]} for row in range(n))
    if not items:
        raise ValueError(f"nothing to shard in {path}: no Parquet rows found")
    seen: set[str] = set()
    for it in items:
        if it["id"] in seen:
            raise ValueError(f"{path}: duplicate image id {it['id']!r}; ids must be unique (see shard.id_column)")
        seen.add(it["id"])
    # String labels become class indices in sorted order (like folder names); negative ints mean "no label" (HF).
    classes = sorted({v for v in raw_labels if isinstance(v, str)}) or None
    index = {c: i for i, c in enumerate(classes or [])}
    for it, v in zip(items, raw_labels, strict=True):
        it["label"] = index[v] if isinstance(v, str) else (int(v) if v is not None and v >= 0 else None)
    return Listing(items, classes=classes, extra={"source_files": len(files)})


def read_idx(path: str, header_only: bool = False) -> tuple[int, tuple[int, ...], np.ndarray | None]:
    """(magic, shape, data) of an MNIST idx file, gzipped or raw; ``data`` is None when ``header_only`` (the file is
    still read whole, so a truncated one fails on the driver rather than on a worker)."""
    raw = _read(path, max_bytes=1 << 40)  # one file holds the whole dataset: no per-image limit
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


# ------------------------------------------------------------------------------------------------ loading
@functools.lru_cache(maxsize=2)
def _idx_images(path: str) -> np.ndarray:
    return read_idx(path)[2]


def _parquet_images(uri: str, rows: list[int], image_column: str) -> list[Any]:
    """The image cells at ``rows`` of one file, reading only the row groups that hold them."""
    pf = _open_parquet(uri)
    sizes = [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)]
    starts = np.concatenate([[0], np.cumsum(sizes)]).tolist()
    groups = sorted({bisect.bisect_right(starts, r) - 1 for r in rows})
    column = pf.read_row_groups(groups, columns=[image_column]).column(image_column)
    first = dict(zip(groups, np.cumsum([0] + [sizes[g] for g in groups[:-1]]).tolist(), strict=True))  # in `column`
    return [column[first[g] + r - starts[g]].as_py() for r in rows for g in [bisect.bisect_right(starts, r) - 1]]


def _image_bytes(cell: Any, parquet_uri: str) -> bytes:
    """Bytes of a binary cell or an HF ``{bytes, path}`` struct (a relative path is next to the Parquet file)."""
    if isinstance(cell, dict):
        if cell.get("bytes"):
            return cell["bytes"]
        if cell.get("path"):
            p = cell["path"]
            return _read(p if os.path.isabs(p) or "://" in p else posixpath.join(posixpath.dirname(parquet_uri), p))
        return b""
    return cell or b""


def load_items(
    source: str,
    items: list[Item],
    size: int,
    channels: int,
    image_column: str = "image",
    read_timeout_s: float = 0.0,
    max_bytes: int = MAX_FILE_BYTES,
) -> Iterator[tuple[Item, np.ndarray | None, str | None, str]]:
    """(item, pixels or None, reason when unreadable, where) per item, in order; never raises for one bad image.

    Reading and decoding one item (for Parquet: reading one file's image cells) waits at most ``read_timeout_s``
    (0: no limit); an item that overruns is unreadable with that reason, and the next one is read on a fresh thread.
    """
    with reading.Deadline(read_timeout_s) as deadline:
        cells: dict[str, dict[int, Any] | Exception] = {}
        if source == "parquet":
            by_file: dict[str, list[int]] = {}
            for it in items:
                by_file.setdefault(it["ref"][0], []).append(it["ref"][1])
            for uri, rows in by_file.items():
                try:
                    cells[uri] = dict(zip(rows, deadline.call(_parquet_images, uri, rows, image_column), strict=True))
                except Exception as e:  # every row of an unreadable file is a bad item, named by its row
                    cells[uri] = e
        for it in items:
            ref, where = it["ref"], it["id"]
            if source == "image_folder":
                where = _printable(ref)  # the manifest is UTF-8 JSON: no undecodable bytes of a file name
            elif source == "parquet":
                where = f"{ref[0]}#row={ref[1]}"
            try:
                pixels = deadline.call(_load_one, source, ref, cells, size, channels, max_bytes)
            except Exception as e:  # any read or decoder failure is a bad file; the caller skips or fails
                yield it, None, f"{type(e).__name__}: {e}", where
                continue
            yield it, pixels, None, where


def _load_one(source: str, ref: Any, cells: dict, size: int, channels: int, max_bytes: int) -> np.ndarray:
    if source == "digits":
        return from_gray(np.asarray(ref, np.uint8).reshape(8, 8), size, channels)
    if source == "idx":
        return from_gray(_idx_images(ref[0])[ref[1]], size, channels)
    if source == "image_folder":
        return decode_image(_read(ref, max_bytes), size, channels)
    found = cells[ref[0]]
    if isinstance(found, Exception):
        raise found
    return decode_image(_image_bytes(found[ref[1]], ref[0]), size, channels)
