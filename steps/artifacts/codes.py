"""The code-dataset contract: what the encode step writes and what train_prior, evaluate and verify read.

A code dataset is Parquet files under ``<out>/split=train/`` and ``<out>/split=val/`` (hive split folders,
:mod:`steps.artifacts.splits`: ``<out>`` opens as one dataset with a ``split`` column), one row per image in the code
format of :mod:`steps.artifacts.code_format`::

    id: string    label: int32 (nullable)    top: fixed_size_list<int16>[Ht*Wt]    bottom: fixed_size_list<int16>[Hb*Wb]

with one code column per level of the VQ model, top first (a one-level VQ-VAE has only ``top``), and the
:class:`~steps.artifacts.code_format.CodeMeta` in every file's schema metadata. ``<out>/_codes.json`` repeats that
metadata plus the row count per split; it is written last. An empty split still gets a file without rows
(``part-empty.parquet``), so every reader sees the schema.

The files are plain Parquet: pyarrow, pandas, duckdb and Ray Data read them as they are. :class:`CodeDataset` is the
handle readers open (code datasets of the old layout, ``<out>/<split>/`` and ``<out>/codes.json``, too);
:class:`CodeWriter` is what the encode step writes through.
"""

from __future__ import annotations

import hashlib
import posixpath
from collections.abc import Iterator, Mapping, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from steps.artifacts.autoencoder import Autoencoder
from steps.artifacts.base import Artifact, Upstream, digest_tables, file_ids
from steps.artifacts.code_format import CodeDatasetMismatch, CodeMeta, check_code_meta, code_schema, schema_code_meta
from steps.artifacts.images import ImageShards
from steps.artifacts.splits import SPLITS, is_legacy, split_folder
from steps.core.step import MissingInputError
from steps.io import storage
from steps.io.idcheck import IdCounts, count

METADATA_FILE = "_codes.json"
LEGACY_METADATA_FILE = "codes.json"  # the old layout's name, still read
EMPTY_PART = "part-empty"  # the file without rows an empty split gets, so that every reader sees the schema


def read_code_meta(uri: str) -> CodeMeta:
    """The metadata of the code dataset at ``uri`` (a folder of either layout, or one file): from ``_codes.json``,
    else from a Parquet file's schema.

    Raises:
        MissingInputError: nothing at ``uri`` looks like a code dataset.
        ValueError: Parquet files without the code metadata, or an unreadable ``_codes.json``.
    """
    return _read_code_meta(uri, _is_legacy(uri))


def _is_legacy(uri: str) -> bool:
    return is_legacy(uri, METADATA_FILE, LEGACY_METADATA_FILE)


def _read_code_meta(uri: str, legacy: bool) -> CodeMeta:
    meta_uri = storage.join(uri, LEGACY_METADATA_FILE if legacy else METADATA_FILE)
    if storage.exists(meta_uri):
        try:
            return CodeMeta.from_json(storage.read_bytes(meta_uri))
        except ValueError as exc:
            raise ValueError(f"{meta_uri}: not valid code metadata ({exc}); rerun the encode step") from None
    for split in (*SPLITS, ""):
        files = storage.parquet_files(storage.join(uri, split_folder(split, legacy)) if split else uri)
        if files:
            fs, path = storage.filesystem(files[0])
            return schema_code_meta(pq.read_schema(path, filesystem=fs), where=f"code dataset {uri} ({files[0]})")
    raise MissingInputError(
        f"no code dataset at {uri}: neither {METADATA_FILE} nor Parquet files under it; run the encode step first"
    )


class CodeDataset(Artifact):
    """An encode output, opened for reading: its metadata, files per split, ids and batches."""

    is_dataset = True

    def __init__(self, uri: str, meta: CodeMeta, legacy: bool = False) -> None:
        self.uri, self.meta, self.legacy = uri, meta, legacy

    @classmethod
    def open(cls, uri: str) -> CodeDataset:
        """The code dataset at ``uri``, of either layout (see :func:`read_code_meta` for the errors)."""
        legacy = _is_legacy(uri)
        return cls(uri, _read_code_meta(uri, legacy), legacy)

    def split_uri(self, split: str) -> str:
        """The folder of one split's files."""
        return storage.join(self.uri, split_folder(split, self.legacy))

    def files(self, split: str) -> list[str]:
        return storage.parquet_files(self.split_uri(split))

    def ids(self, split: str) -> pa.ChunkedArray:
        return storage.read_column(self.files(split), "id")

    def scoring_split(self) -> str:
        """The split to score on: ``val``, or ``train`` when val is empty."""
        for split in ("val", "train"):
            if self.files(split):
                return split
        raise MissingInputError(f"no codes under {self.uri}: rerun the encode step")

    def tables(self, split: str, columns: list[str] | None = None) -> Iterator[pa.Table]:
        """The split's files one table at a time."""
        for uri in self.files(split):
            yield storage.read_parquet(uri, columns)

    def parts(self, split: str) -> dict[str, str]:
        """The split's code files by name (``<name>.parquet`` -> ``<name>``), without the empty split's placeholder:
        encode writes one code file per image-shard file of the same name."""
        named = {posixpath.basename(storage.filesystem(u)[1]).removesuffix(".parquet"): u for u in self.files(split)}
        return {name: uri for name, uri in named.items() if name != EMPTY_PART}

    def verify(self, upstream: Upstream) -> dict[str, IdCounts]:
        """Every file carries this dataset's metadata; each split holds each id of its image shards exactly once (or,
        with the shards gone, as many distinct ids as rows); the codes belong to the autoencoder they name."""
        rows = self.check_files()  # from the files' footers; the ids stream file by file
        shards = upstream.get(ImageShards)
        counts = {}
        for split in SPLITS:
            expected = file_ids(shards.files(split)) if shards else rows[split]
            counts[split] = count(file_ids(self.files(split)), expected, rows[split])
        autoencoder = upstream.get(Autoencoder)
        if autoencoder is not None:
            self.check_against(autoencoder)
        return counts

    def check_against(self, autoencoder: Autoencoder) -> None:
        """Raise :class:`CodeDatasetMismatch` naming the field unless ``autoencoder`` made these codes."""
        try:
            check_code_meta(self.meta, levels=autoencoder.levels, shapes=autoencoder.shapes,
                            codebook_size=autoencoder.codebook_sizes, where=self.uri)  # fmt: skip
        except CodeDatasetMismatch as exc:
            raise CodeDatasetMismatch(f"{exc} (expected by {autoencoder.model_uri}); rerun the encode step") from None
        if self.meta.vqvae != autoencoder.codes_digest:  # the same architecture, other weights
            raise CodeDatasetMismatch(
                f"code dataset {self.uri}: field 'vqvae' mismatch: made by VQ-VAE {self.meta.vqvae}, but "
                f"{autoencoder.model_uri} is {autoencoder.codes_digest}; rerun the encode step"
            )

    def content_digest(self) -> str:
        """The ids, labels and codes of each split, rows in id order."""
        h = hashlib.sha256()
        for split in SPLITS:
            digest_tables(h, self.tables(split), ["id", "label", *self.meta.levels])
        return h.hexdigest()

    def check_files(self) -> dict[str, int]:
        """Rows per split, after checking every file's schema metadata against :attr:`meta`.

        Raises:
            CodeDatasetMismatch: a file written with other metadata.
        """
        rows = {}
        for split in SPLITS:
            rows[split] = 0
            for uri in self.files(split):
                fs, path = storage.filesystem(uri)
                md = pq.read_metadata(path, filesystem=fs)
                if schema_code_meta(md.schema.to_arrow_schema(), where=uri) != self.meta:
                    raise CodeDatasetMismatch(f"{uri} was written with metadata other than {self.meta}")
                rows[split] += md.num_rows
        return rows


class CodeWriter:
    """Writes a code dataset at ``out``: Parquet parts per split (each whole or absent), then ``_codes.json``."""

    def __init__(self, out: str, meta: CodeMeta) -> None:
        self.out, self.meta = out, meta
        self.schema = code_schema(meta)

    def split_uri(self, split: str) -> str:
        return storage.join(self.out, split_folder(split))

    def _refuse_inputs_inside(self, keep_clear_of: Sequence[str]) -> None:
        inside = storage.filesystem(self.out)[1].rstrip("/") + "/"
        for uri in keep_clear_of:
            if (storage.filesystem(uri)[1].rstrip("/") + "/").startswith(inside):
                raise ValueError(f"code dataset {self.out} must not contain its input {uri}")

    def clear(self, keep_clear_of: Sequence[str] = ()) -> None:
        """Empty ``out`` (a crashed attempt may have left files), refusing to touch an input directory in it."""
        self._refuse_inputs_inside(keep_clear_of)
        storage.clear_dir(self.out)

    def resume(
        self, expected: Mapping[tuple[str, str], int], keep_clear_of: Sequence[str] = ()
    ) -> set[tuple[str, str]]:
        """Keep what an interrupted attempt finished, delete the rest; returns the ``(split, name)`` parts kept.

        A part ``<out>/split=<split>/<name>.parquet`` is kept when ``expected[(split, name)]`` is its row count and its
        schema carries this dataset's metadata (the same VQ-VAE, shapes, codebooks). Everything else in ``out``
        (other or unreadable parts, temporary files, the old layout, a ``_codes.json`` of another attempt) goes.
        """
        self._refuse_inputs_inside(keep_clear_of)
        kept: set[tuple[str, str]] = set()
        folders = {split_folder(s): s for s in SPLITS}
        for entry in storage.listdir(self.out):
            uri = storage.join(self.out, entry.base_name)
            if entry.base_name not in folders:
                storage.delete(uri)
                continue
            split = folders[entry.base_name]
            for part in storage.listdir(uri):
                name = part.base_name.removesuffix(".parquet")
                if (split, name) in expected and self._complete(
                    storage.join(uri, part.base_name), expected[(split, name)]
                ):
                    kept.add((split, name))
                else:
                    storage.delete(storage.join(uri, part.base_name))
        storage.makedirs(self.out)
        return kept

    def _complete(self, uri: str, rows: int) -> bool:
        try:
            fs, path = storage.filesystem(uri)
            md = pq.read_metadata(path, filesystem=fs)
            return md.num_rows == rows and schema_code_meta(md.schema.to_arrow_schema(), where=uri) == self.meta
        except (OSError, ValueError, pa.ArrowException):  # a torn or foreign file: encode it again
            return False

    def write_part(self, table: pa.Table, split: str, name: str) -> str:
        """Write ``table`` (code schema) as ``<out>/split=<split>/<name>.parquet``; returns its URI."""
        uri = storage.join(self.split_uri(split), f"{name}.parquet")
        storage.write_parquet(table.cast(self.schema).replace_schema_metadata(self.schema.metadata), uri)
        return uri

    def write_empty(self, split: str) -> None:
        """An empty split still gets a file, so readers see the schema."""
        self.write_part(self.schema.empty_table(), split, EMPTY_PART)

    def finish(self, rows: Mapping[str, int]) -> dict[str, str]:
        """Write ``_codes.json`` (last: its presence means the data is complete); returns the artifact URIs."""
        metadata = storage.join(self.out, METADATA_FILE)
        storage.write_json(metadata, {**self.meta.to_dict(), "rows": dict(rows)})
        return {split: self.split_uri(split) for split in SPLITS} | {"metadata": metadata}
