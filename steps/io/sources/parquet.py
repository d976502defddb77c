"""Source ``parquet``: Hugging-Face-style Parquet tables, one file or a folder of them (local or any URI).

The image column (``data.image_column``) holds encoded image bytes, or a struct ``{bytes, path}`` whose ``path``
(when ``bytes`` is empty) is read relative to the Parquet file. Ids come from ``data.id_column`` (must be unique, no
nulls) or are ``{file stem}-{row}``, the stem being the file's path relative to the folder without ``.parquet``.
Labels come from ``data.label_column`` when a file has it: integers as they are (negative means no label, as in HF
datasets), strings as class indices in sorted order. Listing reads only the id and label columns; a worker reads
only the row groups that hold its rows' images, one file at a time.
"""

from __future__ import annotations

import bisect
import os
import posixpath
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from steps.io import reading, storage
from steps.io.pixels import decode_image
from steps.io.sources import Item, Listing, Settings, Source
from steps.io.sources.common import path_kind, read_file, under, walk_files
from steps.io.storage import filesystem


def _parquet_files(path: str) -> list[tuple[str, str]]:
    """(uri, stem) per Parquet file: stem is the path relative to the folder without the suffix."""
    if path_kind(path) == pafs.FileType.File:
        return [(path, posixpath.splitext(posixpath.basename(filesystem(path)[1]))[0])]
    rels = walk_files(path, lambda r: r.lower().endswith(".parquet"))[0]
    return [(under(path, r), r[: -len(".parquet")]) for r in rels]


def _open_parquet(uri: str) -> pq.ParquetFile:
    fs, p = filesystem(uri)
    return pq.ParquetFile(p, filesystem=fs)


def list_parquet(
    path: str, image_column: str, label_column: str | None, id_column: str | None, limit: int | None
) -> Listing:
    """The rows of the Parquet file(s) at ``path`` (the first ``limit``); each item's ``ref`` is ``[uri, row]``."""
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
            return read_file(p if os.path.isabs(p) or "://" in p else posixpath.join(posixpath.dirname(parquet_uri), p))
        return b""
    return cell or b""


class Parquet(Source):
    def list(self, cfg: Settings) -> Listing:
        return list_parquet(storage.absolute(cfg.path), cfg.image_column, cfg.label_column, cfg.id_column, cfg.limit)

    def prefetch(self, items: Sequence[Item], cfg: Settings, deadline: reading.Deadline) -> dict[str, Any]:
        """uri -> {row: image cell} per file of the chunk, or the exception that reading the file raised."""
        by_file: dict[str, list[int]] = {}
        for it in items:
            by_file.setdefault(it["ref"][0], []).append(it["ref"][1])
        cells: dict[str, dict[int, Any] | Exception] = {}
        for uri, rows in by_file.items():
            try:
                cells[uri] = dict(zip(rows, deadline.call(_parquet_images, uri, rows, cfg.image_column), strict=True))
            except Exception as e:  # every row of an unreadable file is a bad item, named by its row
                cells[uri] = e
        return cells

    def load_one(self, ref: Any, cfg: Settings, prefetched: Any) -> np.ndarray:
        found = prefetched[ref[0]]
        if isinstance(found, Exception):
            raise found
        return decode_image(_image_bytes(found[ref[1]], ref[0]), cfg.image_size, cfg.channels)

    def where(self, item: Item) -> str:
        return f"{item['ref'][0]}#row={item['ref'][1]}"
