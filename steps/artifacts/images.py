"""The image-shard contract: what the shard step writes and what train_vqvae, encode, evaluate and verify read.

Image shards are Parquet files ``<out>/split=<split>/part-NNNNN.parquet`` (hive split folders,
:mod:`steps.artifacts.splits`: ``<out>`` opens as one dataset with a ``split`` column) with columns ``id: string``,
``label: int32`` (nullable) and ``image: binary`` (PNG bytes, already ``image_size`` square with ``channels``
channels). The schema metadata key ``vqvae2.images`` holds ``{"image_size": S, "channels": C, ...}`` so a reader can
check what it got without decoding an image. ``<out>/_manifest.json`` lists the files and rows per split, the classes
and the files that were skipped (with reasons); it is written last, so shards without it are incomplete. An empty
split is an empty folder (no folder on an object store). Shards of the old layout (``<out>/<split>/``,
``<out>/manifest.json``) open too.

:class:`ImageShards` is the handle readers open; :class:`ShardWriter` is what the shard step writes through.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from steps.artifacts import records
from steps.artifacts.base import Artifact, Upstream, digest_tables, file_ids
from steps.artifacts.splits import SPLITS, check_split, is_legacy, split_folder, split_folders
from steps.io import storage
from steps.io.idcheck import IdCounts, count
from steps.io.pixels import decode_png

IMAGE_META_KEY = b"vqvae2.images"
MANIFEST = "_manifest.json"
LEGACY_MANIFEST = "manifest.json"  # the old layout's name, still read
FORMAT = 2  # the manifest's format: 2 since the hive split folders (1: <out>/<split>/)
MAX_SKIPPED_LISTED = 1000  # the manifest lists at most this many skipped files; the count stays exact


def image_schema(image_size: int, channels: int, extra: dict | None = None) -> pa.Schema:
    meta = {"image_size": image_size, "channels": channels, **(extra or {})}
    return pa.schema(
        [("id", pa.string()), ("label", pa.int32()), ("image", pa.binary())],
        metadata={IMAGE_META_KEY: json.dumps(meta).encode()},
    )


def image_meta(schema: pa.Schema, where: str = "image shards") -> dict:
    """The image metadata of a shard schema, or a ValueError naming ``where``."""
    raw = (schema.metadata or {}).get(IMAGE_META_KEY)
    if raw is None:
        raise ValueError(f"{where}: not image shards of this pipeline (schema metadata {IMAGE_META_KEY!r} missing)")
    return json.loads(raw)


class ImageShards(Artifact):
    """A finished shard output, opened for reading."""

    is_dataset = True

    def __init__(self, uri: str, manifest: dict[str, Any], legacy: bool = False) -> None:
        self.uri, self.manifest, self.legacy = uri, manifest, legacy

    @classmethod
    def open(cls, uri: str) -> ImageShards:
        """The shards at ``uri`` (either layout).

        Raises:
            MissingInputError: no manifest: the shard output is missing or incomplete (a crash never writes one).
        """
        legacy = is_legacy(uri, MANIFEST, LEGACY_MANIFEST)
        name = LEGACY_MANIFEST if legacy else MANIFEST
        missing = f"no shard manifest at {storage.join(uri, name)}: the shard output is missing or incomplete; "
        return cls(uri, storage.read_record(uri, name, missing + "run the shard step first"), legacy)

    @property
    def image_size(self) -> int:
        return int(self.manifest["image_size"])

    @property
    def channels(self) -> int:
        return int(self.manifest["channels"])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.image_size, self.image_size)

    @property
    def num_classes(self) -> int | None:
        return self.manifest.get("num_classes")

    def rows(self, split: str) -> int:
        check_split(split)
        return int(self.manifest["rows"][split])

    def files(self, split: str) -> list[str]:
        """URIs of one split's Parquet files (may be empty, e.g. val with val_fraction=0)."""
        folder = self.split_uri(split)
        return [storage.join(folder, name) for name in self.manifest["files"][split]]

    def split_uri(self, split: str) -> str:
        """The folder of one split's files."""
        return storage.join(self.uri, split_folder(split, self.legacy))

    def ids(self, split: str) -> pa.ChunkedArray:
        return storage.read_column(self.files(split), "id")

    def verify(self, upstream: Upstream) -> dict[str, IdCounts]:
        """Each split's files hold as many distinct ids as the manifest says, none twice (one file's ids in memory)."""
        return {s: count(file_ids(self.files(s)), self.rows(s), self.rows(s)) for s in SPLITS}

    def content_digest(self) -> str:
        """The ids, labels and image bytes of each split, rows in id order."""
        h = hashlib.sha256()
        for split in SPLITS:
            digest_tables(h, self.tables(split), ["id", "label", "image"])
        return h.hexdigest()

    def check_images(self, image_size: int, channels: int, consumer: str) -> None:
        """Every file's schema metadata against the size and channels ``consumer`` (a file, a model) expects.

        Raises:
            ValueError: a file holds other images; the message names the file, the field and ``consumer``.
        """
        want = {"image_size": image_size, "channels": channels}
        for split in SPLITS:
            for uri in self.files(split):
                fs, path = storage.filesystem(uri)
                got = image_meta(pq.read_schema(path, filesystem=fs), where=uri)
                for key, value in want.items():
                    if int(got.get(key, -1)) != value:
                        raise ValueError(
                            f"image shards {uri} hold {key}={got.get(key)}, but {consumer} expects {key}={value}; "
                            "rerun shard with the model's image size, or train a model for these images"
                        )

    def tables(self, split: str, columns: list[str] | None = None) -> Iterator[pa.Table]:
        for uri in self.files(split):
            yield storage.read_parquet(uri, columns)

    def read_images(self, split: str, limit: int | None = None) -> np.ndarray:
        """Up to ``limit`` images of ``split`` as uint8 (N, C, S, S), in file order; (0, C, S, S) if none."""
        return self.read_images_and_labels(split, limit)[0]

    def read_images_and_labels(self, split: str, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Up to ``limit`` images of ``split`` as uint8 (N, C, S, S), in file order, and their labels as int64 (N,),
        -1 where a row has none."""
        images: list[np.ndarray] = []
        labels: list[int] = []
        for table in self.tables(split, ["image", "label"]):
            for png, label in zip(table.column("image").to_pylist(), table.column("label").to_pylist(), strict=True):
                if limit is not None and len(images) == limit:
                    break
                images.append(decode_png(png, self.channels))
                labels.append(-1 if label is None else label)
        if not images:
            return np.zeros((0, *self.image_shape), np.uint8), np.zeros(0, np.int64)
        return np.stack(images), np.asarray(labels, dtype=np.int64)

    def read_labelled(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """The labelled images of ``split``: uint8 (N, C, S, S) and int64 labels (N,); unlabelled rows skipped."""
        images, labels = self.read_images_and_labels(split)
        keep = labels >= 0
        return images[keep], labels[keep]


class ShardWriter:
    """Writes image shards at ``out``: Parquet parts (each whole or absent), then the manifest."""

    def __init__(self, out: str, image_size: int, channels: int, extra: dict | None = None) -> None:
        self.out = out
        self.schema = image_schema(image_size, channels, extra)

    def split_uri(self, split: str) -> str:
        return storage.join(self.out, split_folder(split))

    def clear(self) -> None:
        """Remove what an earlier attempt may have left in ``out``, and nothing else (``out`` may be a folder the
        caller also uses); a stale ``_SUCCESS`` goes too, since it vouches for the old contents."""
        for info in storage.listdir(self.out):
            ours = (*split_folders(), MANIFEST, LEGACY_MANIFEST, records.SUCCESS)
            if info.base_name in ours or info.base_name.startswith(".tmp-"):
                storage.delete(storage.join(self.out, info.base_name))

    def write_part(self, split: str, part: int, ids: list[str], labels: list[int | None], pngs: list[bytes]) -> str:
        """Write one shard file; returns its name (as the manifest lists it)."""
        name = f"part-{part:05d}.parquet"
        columns = [pa.array(ids, pa.string()), pa.array(labels, pa.int32()), pa.array(pngs, pa.binary())]
        storage.write_parquet(pa.table(columns, schema=self.schema), storage.join(self.split_uri(split), name))
        return name

    def finish(
        self,
        files: dict[str, list[str]],
        rows: dict[str, int],
        skipped: list[dict[str, str]],
        num_classes: int | None,
        classes: list[str] | None,
        **extra: Any,
    ) -> dict[str, str]:
        """Write the manifest (last: its presence means the shards are complete); returns the artifact URIs."""
        meta = image_meta(self.schema)
        manifest = {
            "format": FORMAT,
            "image_size": meta["image_size"],
            "channels": meta["channels"],
            "rows": rows,
            "files": files,
            "skipped_count": len(skipped),
            "skipped": skipped[:MAX_SKIPPED_LISTED],
            "num_classes": num_classes,
            "classes": classes,
            **extra,
        }
        for split in SPLITS:  # an empty split is an empty folder
            storage.makedirs(self.split_uri(split))
        path = storage.join(self.out, MANIFEST)
        storage.write_json(path, manifest)
        return {split: self.split_uri(split) for split in SPLITS} | {"manifest": path}
