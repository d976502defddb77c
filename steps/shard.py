"""The shard step: read a source, resize/crop every image to ``image_size``, split by id hash, write Parquet shards.

The driver lists the source (file paths or row references, never pixels of a large source), assigns each image to
train or val from a hash of its id, and cuts each split into chunks of ``rows_per_shard``. Each chunk is one Ray
Data work unit: a worker decodes its images and writes one shard file itself (temporary name, then rename),
returning only counts and the files it could not read. The manifest is written last, so an output without it is never
mistaken for a finished one.

The output is the image-shard artifact of :mod:`steps.artifacts.images`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from steps.artifacts.images import SPLITS, ShardWriter
from steps.core.progress import Progress, watch
from steps.core.step import MetricsSink, StepResult
from steps.core.watchdog import Heartbeat, watched
from steps.io import sources, storage
from steps.io.pixels import encode_png
from steps.nn.blocks import MAX_IMAGE, MIN_IMAGE
from steps.nn.config import ConfigBase, no_effect

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardConfig(ConfigBase):
    """Where the images come from and what the shards look like (see the module docstring)."""

    source: str = "digits"  # a name in steps.io.sources.SOURCES
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
    read_timeout_s: float = no_effect(30.0)  # one item's read + decode; an item that overruns is a bad file
    max_file_mb: int = no_effect(64)  # a larger image file is a bad file (never read)
    stall_timeout_s: float = no_effect(600.0)  # a work unit without progress this long fails, naming it (0: off)

    def validate(self) -> None:
        known = sources.names()
        self.require("source", self.source in known, f"one of {', '.join(known)}")
        source = sources.get(self.source)
        if source.needs_path:
            self.require("path", bool(self.path), f"set for source={self.source}")
        else:
            self.require("path", self.path is None, f"unset for source={self.source}{source.path_hint}")
        ok = self.image_size % 8 == 0 and MIN_IMAGE <= self.image_size <= MAX_IMAGE
        self.require("image_size", ok, f"a multiple of 8 in [{MIN_IMAGE}, {MAX_IMAGE}]")
        self.require("channels", self.channels in (1, 3), "1 or 3")
        self.require("val_fraction", 0 <= self.val_fraction < 1, "a number in [0, 1)")
        self.require("rows_per_shard", self.rows_per_shard >= 1, "a positive integer")
        self.require("limit", self.limit is None or self.limit >= 1, "null or a positive integer")
        self.require("on_bad_file", self.on_bad_file in ("skip", "fail"), "skip or fail")
        self.require("image_column", bool(self.image_column), "a non-empty column name")
        self.require("read_timeout_s", self.read_timeout_s >= 0, "seconds >= 0 (0: no limit)")
        self.require("max_file_mb", self.max_file_mb >= 1, "a positive number of MiB")
        self.require("stall_timeout_s", self.stall_timeout_s >= 0, "seconds >= 0 (0: no limit)")
        for name in ("label_column", "id_column"):
            self.require(
                name, getattr(self, name) is None or bool(getattr(self, name)), "null or a non-empty column name"
            )


# ------------------------------------------------------------------------------------------------ the step
def _list(cfg: ShardConfig) -> sources.Listing:
    """The items of ``cfg.source``, listed on the driver (see :mod:`steps.io.sources`)."""
    return sources.get(cfg.source).list(cfg)


def _writer(cfg: ShardConfig, out: str) -> ShardWriter:
    return ShardWriter(out, cfg.image_size, cfg.channels, extra={"source": cfg.source})


def _shard_unit(split: str, part: int, items: list[dict], cfg: ShardConfig, out: str) -> dict[str, Any]:
    """Decode one chunk of items and write it as one shard file; stops at the first bad file under "fail". Fails
    (:class:`~steps.core.watchdog.StalledError`) after ``cfg.stall_timeout_s`` without progress, naming the unit."""
    first = items[0]["id"] if items else "-"
    what = f"shard unit {split}/{part} ({len(items)} images, the first {first}) of {cfg.source} into {out}"
    return watched(lambda beat: _write_unit(split, part, items, cfg, out, beat), what, cfg.stall_timeout_s)


def _write_unit(
    split: str, part: int, items: list[dict], cfg: ShardConfig, out: str, beat: Heartbeat
) -> dict[str, Any]:
    ids, labels, images, skipped = [], [], [], []
    for item, pixels, reason, where in sources.get(cfg.source).load(items, cfg):
        beat(f"reading the images (last: {item['id']})")
        if pixels is None:
            skipped.append({"path": where, "reason": reason})
            if cfg.on_bad_file == "fail":
                return {"rows": 0, "file": "", "skipped": skipped, "failed": True}
            continue
        ids.append(item["id"])
        labels.append(item["label"])
        images.append(encode_png(pixels))
    beat(f"writing its shard file ({len(ids)} images) under {out}/{split}")
    name = _writer(cfg, out).write_part(split, part, ids, labels, images) if ids else ""
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


def run(cfg: ShardConfig, inputs: Mapping[str, str], out: str, sink: MetricsSink | None = None) -> StepResult:
    """Shard ``cfg.source`` into ``out`` (cleared first). ``inputs`` is unused: shard is the first step.

    Raises:
        ValueError: an empty or malformed source, or a bad image under ``on_bad_file="fail"`` (no manifest then).
        FileNotFoundError: ``cfg.path`` does not exist.
    """
    import ray.data  # deferred: steps stay importable (and configs checkable) without starting Ray

    listing = _list(cfg)
    if listing.unreadable and cfg.on_bad_file == "fail":
        first = listing.unreadable[0]
        raise ValueError(f"bad image {first['path']}: {first['reason']} (shard.on_bad_file=fail)")
    out = storage.absolute(out)  # workers may run in another working directory
    writer = _writer(cfg, out)
    writer.clear()

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
    progress = Progress("shard", len(listing.items), unit="rows", rate_unit="rows/s")
    done = []
    with watch(progress, lambda: progress.done, log):
        for r in ds.iter_rows():  # units in the order they finish
            done.append((r["split"], int(r["part"]), json.loads(r["result"])))
            progress.done += done[-1][2]["rows"] + len(done[-1][2]["skipped"])
    results = sorted(done, key=lambda r: (SPLITS.index(r[0]), r[1]))

    skipped = listing.unreadable + [entry for _, _, r in results for entry in r["skipped"]]
    failed = [r["skipped"][-1] for _, _, r in results if r["failed"]]
    if failed:
        writer.clear()
        raise ValueError(f"bad image {failed[0]['path']}: {failed[0]['reason']} (shard.on_bad_file=fail)")
    log.info("%s", progress.line())
    rows = {s: sum(r["rows"] for split, _, r in results if split == s) for s in SPLITS}
    if not sum(rows.values()):
        writer.clear()
        first = f"; first: {skipped[0]['path']}: {skipped[0]['reason']}" if skipped else ""
        raise ValueError(
            f"nothing to shard in {cfg.path or cfg.source}: all {len(skipped)} images were unreadable{first}"
        )

    labels = [it["label"] for it in listing.items if it["label"] is not None]
    if listing.classes:
        num_classes: int | None = len(listing.classes)
    else:
        num_classes = max(labels) + 1 if labels else None
    artifacts = writer.finish(
        files={s: [r["file"] for split, _, r in results if split == s and r["file"]] for s in SPLITS},
        rows=rows,
        skipped=skipped,
        num_classes=num_classes,
        classes=listing.classes,
        config=cfg.to_dict(),
        source=cfg.source,
        ignored_files=listing.ignored_files,
        **listing.extra,
    )
    return StepResult(
        metrics={"rows_train": rows["train"], "rows_val": rows["val"], "files_skipped": len(skipped)},
        artifacts=artifacts,
        info={
            "skipped": skipped[:20],
            "num_classes": num_classes,
            "image_size": cfg.image_size,
            "channels": cfg.channels,
        },
    )
