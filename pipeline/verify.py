"""Check an artifacts root after a crash, a preemption or a concurrent run: ``python -m pipeline.verify [ROOT]``.

What it proves, per output of ``<root>/<step>/``:

* a directory that looks finished (no ``.partial`` in its name) has its ``_SUCCESS`` record, for its own step and
  fingerprint, and every artifact the record names exists;
* image shards, code datasets and sampled codes hold each id exactly once, and as many rows as they should: a code
  dataset one row per image of the shards it was encoded from (``missing``, ``extra``, ``duplicates`` count the
  differences), the sampled codes ``num_samples`` rows;
* checkpoints load (weights only) as the kind their step writes.

``.partial`` directories are work in progress or interrupted work (a rerun of the same config resumes or restarts
them); they are listed, never judged. Exit status 1 if anything is wrong, so it can gate a job.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from pipeline.cache import SUCCESS
from pipeline.graph import NAMES
from steps import common
from steps.codes import parquet_files, read_ids
from steps.nn.checkpoint import CheckpointError, load_model

CHECKPOINTS = {"train_vqvae": {"model": ("vqvae2", "vqvae", "vae")}, "train_prior": {"top": "prior", "bottom": "prior"}}


@dataclass
class Rows:
    """One id column checked against what it should hold."""

    expected: int
    found: int
    duplicates: int = 0
    missing: int = 0  # expected ids absent
    extra: int = 0  # ids that should not be there


@dataclass
class Report:
    root: str
    outputs: list[str] = field(default_factory=list)  # finished outputs checked
    in_progress: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    rows: dict[str, Rows] = field(default_factory=dict)  # "<step>/<fingerprint>[/<split>]" -> counts

    @property
    def ok(self) -> bool:
        return not self.errors

    @property
    def rows_lost(self) -> int:
        return sum(r.missing for r in self.rows.values())

    @property
    def rows_duplicated(self) -> int:
        return sum(r.duplicates for r in self.rows.values())

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(ok=self.ok, rows_lost=self.rows_lost, rows_duplicated=self.rows_duplicated)
        return out


def _entries(uri: str) -> list[pafs.FileInfo]:
    fs, path = common.filesystem(uri)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return []
    return sorted(fs.get_file_info(pafs.FileSelector(path)), key=lambda i: i.base_name)


def _ids(uri: str) -> pa.Array:
    """The ids of the Parquet files under ``uri``."""
    return read_ids(parquet_files(uri)).combine_chunks()


def compare_ids(found: pa.Array, expected: pa.Array | int) -> Rows:
    """Counts of ``found`` against the ids it should hold (or only how many, given an int)."""
    distinct = pc.unique(found)
    rows = Rows(expected=expected if isinstance(expected, int) else len(expected), found=len(found))
    rows.duplicates = len(found) - len(distinct)
    if isinstance(expected, int):
        rows.missing = max(expected - len(distinct), 0)
        rows.extra = max(len(distinct) - expected, 0)
    else:
        rows.missing = int(pc.sum(pc.invert(pc.is_in(pc.unique(expected), value_set=distinct))).as_py() or 0)
        rows.extra = int(pc.sum(pc.invert(pc.is_in(distinct, value_set=expected))).as_py() or 0)
    return rows


def _judge(report: Report, key: str, rows: Rows) -> None:
    report.rows[key] = rows
    wrong = {k: getattr(rows, k) for k in ("duplicates", "missing", "extra") if getattr(rows, k)}
    if wrong or rows.found != rows.expected:
        report.errors.append(f"{key}: {rows.found} rows where {rows.expected} belong ({wrong or 'count differs'})")


def _check_output(report: Report, step: str, uri: str, record: dict[str, Any]) -> None:
    name = uri.rstrip("/").rsplit("/", 1)[-1]
    key = f"{step}/{name}"
    if record.get("step") != step or record.get("fingerprint") != name:
        report.errors.append(f"{uri}: its {SUCCESS} is for {record.get('step')}/{record.get('fingerprint')}")
    for label, artifact in record.get("artifacts", {}).items():
        if not common.exists(artifact):
            report.errors.append(f"{uri}: artifact {label!r} ({artifact}) is missing")
    if step == "shard":
        manifest = common.read_json(common.join(uri, "manifest.json"))
        for split in ("train", "val"):
            ids = _ids(common.join(uri, split))
            _judge(report, f"{key}/{split}", compare_ids(ids, int(manifest["rows"][split])))
    elif step == "encode":
        shard = record.get("inputs", {}).get("shard")
        have_shards = bool(shard) and common.exists(common.join(shard, SUCCESS))
        if not have_shards:
            report.warnings.append(f"{uri}: its input shards ({shard}) are gone; ids checked for duplicates only")
        for split in ("train", "val"):
            found = _ids(common.join(uri, split))
            expected = _ids(common.join(shard, split)) if have_shards else len(pc.unique(found))
            _judge(report, f"{key}/{split}", compare_ids(found, expected))
    elif step == "sample":
        meta = common.read_json(common.join(uri, "samples.json"))
        if common.exists(common.join(uri, "codes")):
            _judge(report, f"{key}/codes", compare_ids(_ids(common.join(uri, "codes")), meta["num_samples"]))
    for file, kinds in CHECKPOINTS.get(step, {}).items():
        ckpt = common.join(uri, f"{file}.pt")
        if step == "train_prior" and not common.exists(ckpt) and file == "bottom":
            continue  # one-level models have no bottom prior
        try:
            load_model(common.read_bytes(ckpt), expect=kinds)
        except (CheckpointError, OSError, ValueError, RuntimeError) as exc:
            report.errors.append(f"{ckpt}: does not load ({exc})")


def verify(root: str) -> Report:
    """Check every output under ``root`` (see the module docstring)."""
    report = Report(root=root)
    local = common.is_local(root)
    for step in NAMES:
        for info in _entries(common.join(root, step)):
            name = info.base_name
            uri = common.join(root, step, name)
            if name.endswith(".lock") or info.type != pafs.FileType.Directory:
                continue
            if name.endswith(".partial"):
                report.in_progress.append(uri)
                continue
            if ".old-" in name:
                report.warnings.append(f"{uri}: left over from a replaced output; safe to delete")
                continue
            success = common.join(uri, SUCCESS)
            if not common.exists(success):
                if local:
                    report.errors.append(f"{uri}: looks finished but has no {SUCCESS}")
                else:  # object stores: the step writes in place and _SUCCESS goes last
                    report.in_progress.append(uri)
                continue
            report.outputs.append(uri)
            try:
                _check_output(report, step, uri, common.read_json(success))
            except (OSError, ValueError, KeyError) as exc:
                report.errors.append(f"{uri}: cannot be read ({type(exc).__name__}: {exc})")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.verify", description=__doc__.split("\n\n")[0])
    parser.add_argument("root", nargs="?", default="outputs", help="artifacts root (artifacts.root); default outputs")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    root = args.root if not common.is_local(args.root) else os.path.abspath(os.path.expanduser(args.root))
    if not common.exists(root):
        print(f"no artifacts root at {root} (artifacts.root of the runs to check)", file=sys.stderr)
        return 2
    report = verify(root)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2, default=str))
    else:
        print(f"{root}: {len(report.outputs)} finished outputs checked, {len(report.in_progress)} in progress")
        for key, rows in report.rows.items():
            print(f"  {key}: {rows.found}/{rows.expected} rows, {rows.duplicates} duplicated, {rows.missing} missing")
        for uri in report.in_progress:
            print(f"  in progress (a rerun resumes or restarts it): {uri}")
        for line in report.warnings:
            print(f"  warning: {line}")
        for line in report.errors:
            print(f"  ERROR: {line}")
        print("ok" if report.ok else f"{len(report.errors)} problem(s)")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
