"""The shard step: read a source, resize/crop every image to ``image_size``, split by id hash, write Parquet shards.

The driver lists the source (file paths or row references, never pixels of a large source), assigns each image to
train or val from a hash of its id, and cuts each split into chunks of ``rows_per_shard``. Each chunk is one Ray
Data work unit: a worker decodes its images and writes ``<out>/<split>/part-NNNNN.parquet`` itself (temporary name,
then rename), returning only counts and the files it could not read. The manifest is written last, so an output
without ``manifest.json`` is never mistaken for a finished one.

Output::

    <out>/train/part-00000.parquet ...   schema: steps.images.image_schema(image_size, channels, {"source": ...})
    <out>/val/part-00000.parquet ...
    <out>/manifest.json                  rows/files per split, skipped files, classes, num_classes, ...
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from steps import sources
from steps.common import MetricsSink, StepResult, exists, filesystem, join, makedirs, read_json, write_json
from steps.images import SPLITS, encode_png, image_schema

SOURCES = ("digits", "image_folder", "parquet", "idx")
MANIFEST = "manifest.json"
MAX_SKIPPED_LISTED = 1000  # the manifest lists at most this many skipped files; the count stays exact


@dataclass(frozen=True)
class ShardConfig:
    """Where the images come from and what the shards look like (see the module docstring)."""

    source: str = "digits"
    path: str | None = None
    image_size: int = 32
    channels: int = 1
    val_fraction: float = 0.1
    rows_per_shard: int = 1024
    limit: int | None = None
    on_bad_file: str = "skip"
    image_column: str = "image"
    label_column: str | None = "label"
    id_column: str | None = None
    split_salt: str = ""

    def __post_init__(self) -> None:
        def bad(name: str, want: str) -> ValueError:
            return ValueError(f"shard.{name} must be {want}, got {getattr(self, name)!r}")

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        if self.source not in SOURCES:
            raise bad("source", f"one of {', '.join(SOURCES)}")
        if self.source == "digits" and self.path is not None:
            raise bad("path", "unset for source=digits (the digits are bundled; did you mean source=image_folder?)")
        if self.source != "digits" and (not isinstance(self.path, str) or not self.path):
            raise bad("path", f"set for source={self.source}")
        if not is_int(self.image_size) or self.image_size % 8 or not 32 <= self.image_size <= 256:
            raise ValueError(f"shard.image_size must be a multiple of 8 in [32, 256], got {self.image_size!r}")
        if self.channels not in (1, 3) or not is_int(self.channels):
            raise bad("channels", "1 or 3")
        if isinstance(self.val_fraction, bool) or not isinstance(self.val_fraction, (int, float)):
            raise bad("val_fraction", "a number in [0, 1)")
        if not 0 <= self.val_fraction < 1:
            raise bad("val_fraction", "in [0, 1)")
        if not is_int(self.rows_per_shard) or self.rows_per_shard < 1:
            raise bad("rows_per_shard", "a positive integer")
        if self.limit is not None and (not is_int(self.limit) or self.limit < 1):
            raise bad("limit", "null or a positive integer")
        if self.on_bad_file not in ("skip", "fail"):
            raise bad("on_bad_file", "skip or fail")
        if not isinstance(self.image_column, str) or not self.image_column:
            raise bad("image_column", "a non-empty column name")
        for name in ("label_column", "id_column"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise bad(name, "null or a non-empty column name")
        if not isinstance(self.split_salt, str):
            raise bad("split_salt", "a string")


# ------------------------------------------------------------------------------------------------ public helpers
def read_manifest(uri: str) -> dict:
    """The manifest of a shard output (its folder, or the manifest file itself).

    Raises:
        FileNotFoundError: the shard output is missing or incomplete (a crashed run never writes the manifest).
    """
    path = uri if uri.endswith(".json") else join(uri, MANIFEST)
    if not exists(path):
        raise FileNotFoundError(
            f"no shard manifest at {path}: the shard output is missing or incomplete; run the shard step"
        )
    return read_json(path)


def shard_files(uri: str, split: str) -> list[str]:
    """URIs of one split's Parquet files, as the manifest lists them (may be empty, e.g. val with val_fraction=0)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return [join(uri, split, name) for name in read_manifest(uri)["files"][split]]


# ------------------------------------------------------------------------------------------------ the step
def _absolute(uri: str) -> str:
    """Workers may run in another working directory than the driver: hand them absolute local paths."""
    return uri if "://" in uri else os.path.abspath(os.path.expanduser(uri))


def _list(cfg: ShardConfig) -> sources.Listing:
    if cfg.source == "digits":
        return sources.list_digits(cfg.limit)
    path = _absolute(cfg.path)
    if cfg.source == "image_folder":
        listing = sources.list_image_folder(path)
        if cfg.limit is not None:
            listing.items = listing.items[: cfg.limit]
        return listing
    if cfg.source == "parquet":
        return sources.list_parquet(path, cfg.image_column, cfg.label_column, cfg.id_column, cfg.limit)
    return sources.list_idx(path, cfg.limit)


def _write_table(table: pa.Table, uri: str) -> None:
    """Write a Parquet file that readers see whole or not at all (temporary hidden name + rename on local disk)."""
    fs, path = filesystem(uri)
    if not isinstance(fs, pafs.LocalFileSystem):
        pq.write_table(table, path, filesystem=fs)  # object stores publish an object when its upload completes
        return
    # Hidden and not *.parquet, so no reader that globs a split folder picks up a half-written file.
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-", suffix=".part")
    os.close(fd)
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _shard_unit(split: str, part: int, items: list[dict], cfg: ShardConfig, out: str) -> dict[str, Any]:
    """Decode one chunk of items and write it as one shard file; stops at the first bad file under "fail"."""
    ids, labels, images, skipped = [], [], [], []
    loaded = sources.load_items(cfg.source, items, cfg.image_size, cfg.channels, cfg.image_column)
    for item, pixels, reason, where in loaded:
        if pixels is None:
            skipped.append({"path": where, "reason": reason})
            if cfg.on_bad_file == "fail":
                return {"rows": 0, "file": "", "skipped": skipped, "failed": True}
            continue
        ids.append(item["id"])
        labels.append(item["label"])
        images.append(encode_png(pixels))
    name = ""
    if ids:
        schema = image_schema(cfg.image_size, cfg.channels, extra={"source": cfg.source})
        table = pa.table(
            [pa.array(ids, pa.string()), pa.array(labels, pa.int32()), pa.array(images, pa.binary())], schema=schema
        )
        name = f"part-{part:05d}.parquet"
        _write_table(table, join(out, split, name))
    return {"rows": len(ids), "file": name, "skipped": skipped, "failed": False}


def _shard_batch(batch: dict[str, Any], cfg: ShardConfig, out: str) -> dict[str, list]:
    """Ray Data batch function: one row per work unit in, one row of counts per unit out."""
    results: dict[str, list] = {"split": [], "part": [], "result": []}
    for split, part, items in zip(batch["split"], batch["part"], batch["items"], strict=True):
        result = _shard_unit(str(split), int(part), json.loads(items), cfg, out)
        results["split"].append(str(split))
        results["part"].append(int(part))
        results["result"].append(json.dumps(result))
    return results


def _clear(out: str) -> None:
    """Remove what an earlier attempt of this step may have left in ``out``, and nothing else (``out`` may be a
    folder the caller also uses); a stale ``_SUCCESS`` goes too, since it vouches for the old contents."""
    fs, path = filesystem(out)
    fs.create_dir(path, recursive=True)
    for info in fs.get_file_info(pafs.FileSelector(path)):
        name = info.base_name
        if name in (*SPLITS, MANIFEST, "_SUCCESS") or name.startswith(".tmp-"):
            if info.type == pafs.FileType.Directory:
                fs.delete_dir(info.path)
            else:
                fs.delete_file(info.path)


def run(cfg: ShardConfig, inputs: Mapping[str, str], out: str, sink: MetricsSink | None = None) -> StepResult:
    """Shard ``cfg.source`` into ``out`` (cleared first). ``inputs`` is unused: shard is the first step.

    Raises:
        ValueError: an empty or malformed source, or a bad image under ``on_bad_file="fail"`` (no manifest then).
        FileNotFoundError: ``cfg.path`` does not exist.
    """
    import ray.data  # deferred: steps stay importable (and configs checkable) without starting Ray

    listing = _list(cfg)
    result_uri, out = out, _absolute(out)
    _clear(out)
    for split in SPLITS:
        makedirs(join(out, split))

    by_split: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for item in listing.items:
        by_split[sources.split_of(item["id"], cfg.val_fraction, cfg.split_salt)].append(item)
    step = cfg.rows_per_shard
    units = [
        {"split": split, "part": part, "items": json.dumps(items[start : start + step])}
        for split, items in by_split.items()
        for part, start in enumerate(range(0, len(items), step))
    ]
    ds = ray.data.from_items(units, override_num_blocks=len(units))
    ds = ds.map_batches(_shard_batch, batch_size=1, batch_format="numpy", fn_kwargs={"cfg": cfg, "out": out})
    results = sorted(
        ((r["split"], int(r["part"]), json.loads(r["result"])) for r in ds.take_all()),
        key=lambda r: (SPLITS.index(r[0]), r[1]),
    )

    skipped = [entry for _, _, r in results for entry in r["skipped"]]
    failed = [r["skipped"][-1] for _, _, r in results if r["failed"]]
    if failed:
        _clear(out)
        raise ValueError(f"bad image {failed[0]['path']}: {failed[0]['reason']} (shard.on_bad_file=fail)")
    rows = {s: sum(r["rows"] for split, _, r in results if split == s) for s in SPLITS}
    if not sum(rows.values()):
        _clear(out)
        first = f"; first: {skipped[0]['path']}: {skipped[0]['reason']}" if skipped else ""
        raise ValueError(
            f"nothing to shard in {cfg.path or cfg.source}: all {len(skipped)} images were unreadable{first}"
        )

    labels = [it["label"] for it in listing.items if it["label"] is not None]
    if listing.classes:
        num_classes: int | None = len(listing.classes)
    else:
        num_classes = max(labels) + 1 if labels else None
    manifest = {
        "format": 1,
        "config": asdict(cfg),
        "source": cfg.source,
        "image_size": cfg.image_size,
        "channels": cfg.channels,
        "rows": rows,
        "files": {s: [r["file"] for split, _, r in results if split == s and r["file"]] for s in SPLITS},
        "skipped_count": len(skipped),
        "skipped": skipped[:MAX_SKIPPED_LISTED],
        "ignored_files": listing.ignored_files,
        "num_classes": num_classes,
        "classes": listing.classes,
        **listing.extra,
    }
    write_json(join(out, MANIFEST), manifest)
    return StepResult(
        metrics={"rows_train": rows["train"], "rows_val": rows["val"], "files_skipped": len(skipped)},
        artifacts={s: join(result_uri, s) for s in SPLITS} | {"manifest": join(result_uri, MANIFEST)},
        info={
            "skipped": skipped[:20],
            "num_classes": num_classes,
            "image_size": cfg.image_size,
            "channels": cfg.channels,
        },
    )
