"""The samples contract: what the sample step writes and what evaluate and verify read.

    <out>/images/{index:06d}.png          one PNG per sample (unless sample.write_pngs=false)
    <out>/codes/part-{shard:05d}.parquet  the sampled codes in the code format of the code dataset
                                          (:mod:`steps.artifacts.code_format`: id, label, one int16 list per level,
                                          the CodeMeta in the schema) plus seed [, attempt, class_prob, accepted];
                                          none for the VAE. Only Parquet files live in ``codes/``: it opens as one
                                          dataset in pyarrow.dataset, pandas, duckdb and Ray Data (``<out>`` itself
                                          does not: PNGs and JSON beside)
    <out>/grid.png                        the first samples tiled
    <out>/shards/part-{shard:05d}.json    one record per finished shard (written last for that shard)
    <out>/shards/settings.json            what the samples depend on: an interrupted run resumes only with these
    <out>/samples.json                    the run's metadata; written last

:class:`Samples` opens it; :class:`SamplesWriter` writes it and decides what an interrupted run may keep.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from steps.artifacts.autoencoder import Autoencoder
from steps.artifacts.base import Artifact, Upstream, digest_tables, file_ids
from steps.artifacts.code_format import CODES_META_KEY, CodeMeta, check_code_meta, codes_to_arrow, schema_code_meta
from steps.io import storage
from steps.io.idcheck import IdCounts, count
from steps.io.pixels import decode_png

METADATA = "samples.json"
GRID = "grid.png"
IMAGES, CODES, SHARDS = "images", "codes", "shards"
SETTINGS = "settings.json"


SEED = pa.field("seed", pa.int64())  # the generator seed of the draw kept: steps.generation.generator.sample_seed
REJECTION = (pa.field("attempt", pa.int32()), pa.field("class_prob", pa.float32()), pa.field("accepted", pa.bool_()))


def sampled_codes(
    ids: Sequence[str],
    labels: Sequence[int | None] | None,
    codes: Mapping[str, Any],
    meta: CodeMeta,
    seeds: Sequence[int],
    rejection: Mapping[str, Sequence[Any]] | None = None,
) -> pa.Table:
    """One shard's sampled codes as a table of the code format, with the seed (and, with classifier rejection, the
    ``attempt``, ``class_prob`` and ``accepted`` of the draw kept) after the levels."""
    extra = [(SEED, seeds), *((f, rejection[f.name]) for f in (REJECTION if rejection is not None else ()))]
    return codes_to_arrow(ids, labels, codes, meta, extra)


def sample_id(index: int) -> str:
    return f"sample-{index:06d}"


class Samples(Artifact):
    """A finished sample output, opened for reading."""

    def __init__(self, uri: str, meta: dict[str, Any]) -> None:
        self.uri, self.meta = uri, meta

    @classmethod
    def open(cls, uri: str) -> Samples:
        """The samples at ``uri``.

        Raises:
            MissingInputError: no ``samples.json`` (the sample step has not finished).
        """
        missing = f"no samples at {uri} ({METADATA} missing): run the sample step first"
        return cls(uri, storage.read_record(uri, METADATA, missing))

    @property
    def num_samples(self) -> int:
        return int(self.meta["num_samples"])

    @property
    def codes_uri(self) -> str:
        """The folder of the sampled codes: a Parquet dataset on its own (no split; absent without codes)."""
        return storage.join(self.uri, CODES)

    def code_files(self) -> list[str]:
        return storage.parquet_files(self.codes_uri)

    def ids(self) -> pa.ChunkedArray:
        return storage.read_column(self.code_files(), "id")

    def verify(self, upstream: Upstream) -> dict[str, IdCounts]:
        """The sampled codes hold each of the ``num_samples`` ids once, and were made in the code format of the
        autoencoder the samples came from (outputs written before the format was shared carry no such metadata)."""
        files = self.code_files()
        if not files:
            return {}
        autoencoder = upstream.get(Autoencoder)
        for uri in files if autoencoder is not None else ():
            fs, path = storage.filesystem(uri)
            schema = pq.read_schema(path, filesystem=fs)
            if CODES_META_KEY in (schema.metadata or {}):
                meta = schema_code_meta(schema, where=uri)
                check_code_meta(meta, vqvae=autoencoder.codes_digest, levels=autoencoder.levels,
                                shapes=autoencoder.shapes, codebook_size=autoencoder.codebook_sizes,
                                where=uri)  # fmt: skip
        return {"codes": count(file_ids(files), self.num_samples, self.num_samples)}

    def content_digest(self) -> str:
        """The sampled codes (every column, rows in id order); for samples without codes (the VAE), the PNGs."""
        h = hashlib.sha256()
        tables = [storage.read_parquet(f, None) for f in self.code_files()]
        if tables:
            digest_tables(h, tables, sorted(tables[0].column_names))
        else:
            for name in self._png_names():
                h.update(storage.read_bytes(storage.join(self.uri, IMAGES, name)))
        return h.hexdigest()

    def _png_names(self) -> list[str]:
        return sorted(
            i.base_name for i in storage.listdir(storage.join(self.uri, IMAGES)) if i.base_name.endswith(".png")
        )

    def read_pngs(self, channels: int, limit: int) -> np.ndarray | None:
        """Up to ``limit`` sample PNGs as uint8 (N, C, S, S) in index order, or None if none were written."""
        names = self._png_names()
        if not names:
            return None
        paths = [storage.join(self.uri, IMAGES, n) for n in names[:limit]]
        return np.stack([decode_png(storage.read_bytes(p), channels) for p in paths])

    def read_labels(self, limit: int) -> np.ndarray | None:
        """The class each of the first ``limit`` samples was drawn for, int64 (N,) in index order (the order of
        :meth:`read_pngs` and :meth:`read_codes`), -1 for an unconditional sample; None without codes."""
        ids, labels = [], []
        for uri in self.code_files():
            table = storage.read_parquet(uri, ["id", "label"])
            ids += table.column("id").to_pylist()
            labels += [-1 if lb is None else lb for lb in table.column("label").to_pylist()]
        if not ids:
            return None
        return np.asarray([lb for _, lb in sorted(zip(ids, labels, strict=True))][:limit], dtype=np.int64)

    def read_codes(self, levels: tuple[str, ...], limit: int) -> dict[str, np.ndarray]:
        """Up to ``limit`` sampled code rows per level, flat (N, H*W) int64, in file order; {} without codes."""
        parts: dict[str, list[np.ndarray]] = {lv: [] for lv in levels}
        for uri in self.code_files():
            table = storage.read_parquet(uri, list(levels))
            for lv in levels:
                parts[lv].append(np.stack(table.column(lv).to_numpy(zero_copy_only=False)).astype(np.int64))
        if not any(parts.values()):
            return {}
        return {lv: np.concatenate(p)[:limit] for lv, p in parts.items()}


class SamplesWriter:
    """Writes a sample output at ``out``, shard by shard; :meth:`resume` keeps what an interrupted run finished."""

    def __init__(self, out: str) -> None:
        self.out = out

    def _record_uri(self, shard: int) -> str:
        return storage.join(self.out, SHARDS, f"part-{shard:05d}.json")

    def resume(self, settings: dict[str, Any], num_shards: int) -> dict[int, dict[str, Any]]:
        """The records of the shards an interrupted run with the same ``settings`` finished (kept); anything else
        in ``out`` is cleared. Records ``settings`` for the next attempt."""
        settings = json.loads(json.dumps(settings, default=str))  # as it reads back
        done: dict[int, dict[str, Any]] = {}
        try:
            same = storage.read_json(storage.join(self.out, SHARDS, SETTINGS)) == settings
        except (FileNotFoundError, OSError, ValueError):
            same = False
        if same:  # one listing, then only the records that exist are read (object stores: no miss per shard)
            for info in storage.listdir(storage.join(self.out, SHARDS)):
                name = info.base_name
                if name.startswith("part-") and name.endswith(".json") and name[5:-5].isdigit():
                    shard = int(name[5:-5])
                    try:
                        if shard < num_shards:
                            done[shard] = storage.read_json(self._record_uri(shard))
                    except (OSError, ValueError):
                        continue
        if done:  # keep the finished shards; drop what an unfinished one or the last run's ending left behind
            for name in (GRID, METADATA):
                storage.delete(storage.join(self.out, name))
        else:
            storage.clear_dir(self.out)
        storage.write_json(storage.join(self.out, SHARDS, SETTINGS), settings)
        return done

    def write_image(self, index: int, png: bytes) -> None:
        storage.write_bytes(storage.join(self.out, IMAGES, f"{index:06d}.png"), png)

    def write_codes(self, shard: int, table: pa.Table) -> None:
        storage.write_parquet(table, storage.join(self.out, CODES, f"part-{shard:05d}.parquet"), compression="snappy")

    def write_record(self, shard: int, record: dict[str, Any]) -> None:
        """The shard's record, written after its images and codes: a shard with a record is complete."""
        storage.write_json(self._record_uri(shard), record)

    def finish(self, grid_png: bytes, meta: dict[str, Any], pngs: bool, codes: bool) -> dict[str, str]:
        """The grid, then ``samples.json`` (last); returns the artifact URIs."""
        artifacts = {"grid": storage.join(self.out, GRID)}
        storage.write_bytes(artifacts["grid"], grid_png)
        if pngs:
            artifacts["images"] = storage.join(self.out, IMAGES)
        if codes:
            artifacts["codes"] = storage.join(self.out, CODES)
        artifacts["metadata"] = storage.join(self.out, METADATA)
        storage.write_json(artifacts["metadata"], meta)
        return artifacts
