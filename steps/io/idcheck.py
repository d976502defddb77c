"""Exactly-once checks on id columns of any size: how many ids are duplicated, missing or extra.

Ids stream in one file's column at a time. Up to ``bucket_rows`` ids are compared in memory. Beyond that, every id is
routed by a hash of its bytes to one of ``ceil(rows / bucket_rows)`` buckets spilled to local Arrow IPC files, and
the buckets are compared one at a time: an id lands in the same bucket wherever it occurs, so per-bucket counts add
up to the whole. Memory stays at about one bucket plus one file's ids, whatever the dataset size; the encode step and
``python -m pipeline.verify`` both check through here.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

BUCKET_ROWS = 2_000_000  # ids compared in memory at once (~100 MB of short string ids)
_WEIGHTS = np.random.default_rng(20190602).integers(1, 2**63, size=61, dtype=np.uint64) | np.uint64(1)
_MIX = np.uint64(0x9E3779B97F4A7C15)


@dataclass
class IdCounts:
    """An id column against what it should hold: ``expected`` ids (or just a count), ``found`` rows."""

    expected: int
    found: int
    duplicates: int = 0  # rows beyond the first of an id
    missing: int = 0  # expected ids absent
    extra: int = 0  # ids that should not be there

    @property
    def exact(self) -> bool:
        return self.found == self.expected and not (self.duplicates or self.missing or self.extra)


def count(
    found: Iterable[pa.Array], expected: Iterable[pa.Array] | int, rows: int, bucket_rows: int = BUCKET_ROWS
) -> IdCounts:
    """Compare the ids of ``found`` (chunks, e.g. one per file) with ``expected`` (chunks of the ids that belong, or
    only how many distinct ids there should be). ``rows``: about how many ids there are, to size the buckets."""
    buckets = max(1, -(-max(rows, 1) // bucket_rows))
    if buckets == 1:
        return _compare(_concat(found), expected if isinstance(expected, int) else _concat(expected))
    with tempfile.TemporaryDirectory(prefix="idcheck-") as tmp:
        found_spill = _Spill(os.path.join(tmp, "found"), buckets, found)
        expected_spill = None if isinstance(expected, int) else _Spill(os.path.join(tmp, "expected"), buckets, expected)
        total = IdCounts(expected=expected if isinstance(expected, int) else 0, found=0)
        distinct = 0
        for b in range(buckets):
            ids = found_spill.read(b)
            part = _compare(ids, expected_spill.read(b) if expected_spill else 0)
            total.found += part.found
            total.duplicates += part.duplicates
            distinct += part.found - part.duplicates
            if expected_spill:
                total.expected += part.expected
                total.missing += part.missing
                total.extra += part.extra
        if isinstance(expected, int):
            total.missing, total.extra = max(expected - distinct, 0), max(distinct - expected, 0)
        return total


def _compare(found: pa.Array, expected: pa.Array | int) -> IdCounts:
    distinct = pc.unique(found)
    counts = IdCounts(expected=expected if isinstance(expected, int) else len(expected), found=len(found))
    counts.duplicates = len(found) - len(distinct)
    if isinstance(expected, int):
        counts.missing = max(expected - len(distinct), 0)
        counts.extra = max(len(distinct) - expected, 0)
    else:
        counts.missing = int(pc.sum(pc.invert(pc.is_in(pc.unique(expected), value_set=distinct))).as_py() or 0)
        counts.extra = int(pc.sum(pc.invert(pc.is_in(distinct, value_set=expected))).as_py() or 0)
    return counts


def _concat(chunks: Iterable[pa.Array]) -> pa.Array:
    arrays = [c.combine_chunks() if isinstance(c, pa.ChunkedArray) else c for c in chunks]
    return pa.concat_arrays([a.cast(pa.string()) for a in arrays]) if arrays else pa.array([], pa.string())


def bucket_of(ids: pa.Array, buckets: int) -> np.ndarray:
    """Per id, a bucket in ``[0, buckets)`` from a hash of its UTF-8 bytes: vectorised; the same id, the same bucket."""
    arr = ids.cast(pa.binary())
    n = len(arr)
    if n == 0:
        return np.zeros(0, np.int64)
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int32)[arr.offset : arr.offset + n + 1].astype(np.int64)
    lengths = np.diff(offsets)
    h = lengths.astype(np.uint64) * _MIX
    if offsets[-1] > offsets[0]:
        data = np.frombuffer(arr.buffers()[2], dtype=np.uint8)[offsets[0] : offsets[-1]].astype(np.uint64)
        starts = offsets[:-1] - offsets[0]
        position = np.arange(len(data)) - np.repeat(starts, lengths)
        nonempty = lengths > 0
        h[nonempty] += np.add.reduceat(data * _WEIGHTS[position % len(_WEIGHTS)], starts[nonempty])
    h *= _MIX
    return ((h >> np.uint64(32)) % np.uint64(buckets)).astype(np.int64)


class _Spill:
    """The ids of ``chunks`` routed into ``buckets`` Arrow IPC files under ``prefix``."""

    def __init__(self, prefix: str, buckets: int, chunks: Iterable[pa.Array]) -> None:
        self.paths = [f"{prefix}-{b:04d}.arrow" for b in range(buckets)]
        schema = pa.schema([("id", pa.string())])
        writers = [pa.ipc.new_stream(p, schema) for p in self.paths]
        try:
            for chunk in chunks:
                ids = _concat([chunk])
                where = bucket_of(ids, buckets)
                for b in np.unique(where):
                    part = ids.filter(pa.array(where == b))
                    writers[b].write_batch(pa.record_batch([part], schema=schema))
        finally:
            for w in writers:
                w.close()

    def read(self, bucket: int) -> pa.Array:
        with pa.ipc.open_stream(self.paths[bucket]) as reader:
            return _concat(reader.read_all().column("id").chunks)
