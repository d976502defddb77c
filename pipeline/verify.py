"""Check an artifacts root after a crash, a preemption or a concurrent run: ``python -m pipeline.verify [ROOT]``.

What it proves, per output of ``<root>/<step>/``:

* a directory that looks finished (no ``.partial`` in its name) has its ``_SUCCESS`` record, for its own step and
  fingerprint, and every artifact the record names exists;
* what the output holds, as its step's output handle checks it (``verify`` of :class:`steps.artifacts.base.Artifact`)
  against the upstream outputs it was made from (found through the run records): image shards, code datasets and
  sampled codes hold each id exactly once, and as many rows as they should (a code dataset one row per image of the
  shards it was encoded from: ``missing``, ``extra``, ``duplicates`` count the differences; the sampled codes
  ``num_samples`` rows); checkpoints load (weights only) as the kind their step writes; code datasets, priors and
  sampled codes still belong to the autoencoder they were made from.

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
import pyarrow.fs as pafs

from pipeline.graph import GRAPH, STEPS, Step
from steps.artifacts import records
from steps.artifacts.base import Upstream
from steps.artifacts.records import SUCCESS
from steps.core.step import MissingInputError
from steps.io import storage
from steps.io.idcheck import IdCounts as Rows
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


def _upstream(report: Report, uri: str) -> Upstream:
    """The outputs ``uri`` was made from, by handle class, through the run records (a warning for each one gone)."""
    outputs: dict[type, str | None] = {}
    for step, found in records.lineage(uri).items():
        if step not in STEPS:  # a record of a step this version no longer has
            continue
        if not found.finished:
            report.warnings.append(f"{uri}: its input {step} ({found.uri}) is gone; checks against it skipped")
        outputs[STEPS[step].output] = found.uri if found.finished else None
    return Upstream(outputs)


def _check_output(report: Report, step: Step, uri: str, record: dict[str, Any]) -> None:
    name = uri.rstrip("/").rsplit("/", 1)[-1]
    if record.get("step") != step.name or record.get("fingerprint") != name:
        report.errors.append(f"{uri}: its {SUCCESS} is for {record.get('step')}/{record.get('fingerprint')}")
    for label, artifact in record.get("artifacts", {}).items():
        if not storage.exists(artifact):
            report.errors.append(f"{uri}: artifact {label!r} ({artifact}) is missing")
    for part, rows in step.output.open(uri).verify(_upstream(report, uri)).items():
        _judge(report, f"{step.name}/{name}/{part}", rows)


def verify(root: str) -> Report:
    """Check every output under ``root`` (see the module docstring)."""
    report = Report(root=root)
    local = storage.is_local(root)
    for step in GRAPH:
        for info in storage.listdir(storage.join(root, step.name)):
            name = info.base_name
            uri = storage.join(root, step.name, name)
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
            except (OSError, ValueError, KeyError, CheckpointError, MissingInputError, pa.ArrowException) as exc:
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
