"""Check an artifacts root after a crash, a preemption or a concurrent run: ``python -m pipeline.verify [ROOT]``.

What it proves, per output of ``<root>/<step>/``:

* a directory that looks finished (no ``.partial`` in its name) has its ``_SUCCESS`` record, for its own step and
  fingerprint, and every artifact the record names exists;
* image shards, code datasets and sampled codes hold each id exactly once, and as many rows as they should: a code
  dataset one row per image of the shards it was encoded from (``missing``, ``extra``, ``duplicates`` count the
  differences), the sampled codes ``num_samples`` rows;
* checkpoints load (weights only) as the kind their step writes, and code datasets and priors still belong to the
  autoencoder they were made from (``steps.artifacts.compat.check_compatible``).

``.partial`` directories are work in progress or interrupted work (a rerun of the same config resumes or restarts
them); they are listed, never judged. Exit status 1 if anything is wrong, so it can gate a job.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from pipeline.graph import NAMES
from steps.artifacts.autoencoder import Autoencoder
from steps.artifacts.codes import CodeDataset
from steps.artifacts.compat import check_compatible
from steps.artifacts.images import SPLITS, ImageShards
from steps.artifacts.priors import Priors
from steps.artifacts.samples import Samples
from steps.core.step import MissingInputError
from steps.io import storage
from steps.io.idcheck import IdCounts as Rows
from steps.io.idcheck import count
from steps.io.storage import SUCCESS
from steps.nn.checkpoint import CheckpointError


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
        if not storage.exists(artifact):
            report.errors.append(f"{uri}: artifact {label!r} ({artifact}) is missing")
    inputs = record.get("inputs", {})
    if step == "shard":
        shards = ImageShards.open(uri)
        for split in SPLITS:
            rows = shards.rows(split)
            _judge(report, f"{key}/{split}", count(_ids(shards.files(split)), rows, rows))
    elif step == "train_vqvae":
        Autoencoder.open(uri).load()
    elif step == "encode":
        codes = CodeDataset.open(uri)
        shards = _upstream(report, uri, inputs, "shard", ImageShards.open)
        rows = codes.check_files()  # from the files' footers; the ids stream file by file
        for split in SPLITS:
            expected = _ids(shards.files(split)) if shards else rows[split]
            _judge(report, f"{key}/{split}", count(_ids(codes.files(split)), expected, rows[split]))
        autoencoder = _upstream(report, uri, inputs, "train_vqvae", Autoencoder.open)
        if autoencoder:
            check_compatible(autoencoder, codes=codes)
    elif step == "train_prior":
        priors = Priors.open(uri)
        for level in priors.summary["levels"]:
            priors.load(level)
        encode = _record(inputs.get("encode"))
        autoencoder = encode and _upstream(report, uri, encode.get("inputs", {}), "train_vqvae", Autoencoder.open)
        if autoencoder:
            check_compatible(autoencoder, priors=priors)
    elif step == "sample":
        samples = Samples.open(uri)
        if samples.code_files():
            _judge(report, f"{key}/codes", count(_ids(samples.code_files()), samples.num_samples, samples.num_samples))


def _ids(files: list[str]) -> Iterator[pa.Array]:
    """The id column of ``files``, one file at a time (memory: one file's ids)."""
    for uri in files:
        yield storage.read_column([uri], "id").combine_chunks()


def _record(uri: str | None) -> dict[str, Any] | None:
    """The ``_SUCCESS`` record of a finished upstream output, or None if it is gone."""
    path = storage.join(uri, SUCCESS) if uri else None
    return storage.read_json(path) if path and storage.exists(path) else None


def _upstream(report: Report, uri: str, inputs: dict[str, str], name: str, opener):
    """The handle of upstream ``name`` if that output still exists (else a warning, and None)."""
    if _record(inputs.get(name)) is None:
        report.warnings.append(f"{uri}: its input {name} ({inputs.get(name)}) is gone; checks against it skipped")
        return None
    return opener(inputs[name])


def verify(root: str) -> Report:
    """Check every output under ``root`` (see the module docstring)."""
    report = Report(root=root)
    local = storage.is_local(root)
    for step in NAMES:
        for info in storage.listdir(storage.join(root, step)):
            name = info.base_name
            uri = storage.join(root, step, name)
            if name.endswith(".lock") or info.type != pafs.FileType.Directory:
                continue
            if name.endswith(".partial"):
                report.in_progress.append(uri)
                continue
            if ".old-" in name:
                report.warnings.append(f"{uri}: left over from a replaced output; safe to delete")
                continue
            success = storage.join(uri, SUCCESS)
            if not storage.exists(success):
                if local:
                    report.errors.append(f"{uri}: looks finished but has no {SUCCESS}")
                else:  # object stores: the step writes in place and _SUCCESS goes last
                    report.in_progress.append(uri)
                continue
            report.outputs.append(uri)
            try:
                _check_output(report, step, uri, storage.read_json(success))
            except (OSError, ValueError, KeyError, CheckpointError, MissingInputError) as exc:
                report.errors.append(f"{uri}: cannot be read ({type(exc).__name__}: {exc})")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.verify", description=__doc__.split("\n\n")[0])
    parser.add_argument("root", nargs="?", default="outputs", help="artifacts root (artifacts.root); default outputs")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    root = args.root if not storage.is_local(args.root) else os.path.abspath(os.path.expanduser(args.root))
    if not storage.exists(root):
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
