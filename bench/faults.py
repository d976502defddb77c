"""Fault injection: what the pipeline survives, and what it loses.

Each scenario of the fault-drill harness (``tests/drills``) runs ``python -m pipeline debug=tiny`` as subprocesses, the
way a user does, on an artifacts root and a SQLite MLflow store of its own, injects one fault, and checks the invariant
that must hold:

* ``worker_crash``: rank 0 of train_vqvae is killed (SIGKILL) after step 7 (``python -m pipeline.faults --kill-at
  train_vqvae:7``); Ray Train restarts the worker group from the step-5 checkpoint. Survived: the pipeline finishes,
  and the step's one MLflow run holds ``train/loss`` at steps 5 and 10 once each, with a ``train/resumed_from`` point
  at step 5.
* ``nan_loss``: rank 0's loss becomes NaN at step 7 (``--nan-at train_vqvae:7``). Survived: the pipeline exits
  non-zero with a NonFiniteLossError naming step 7, Ray Train did not retry, the step-5 checkpoint is still in the
  step's work directory, and nothing was published for train_vqvae.
* ``driver_kill_train``: the driver (with the local Ray it started) gets SIGKILL once train_vqvae has written its
  first checkpoint (60 training steps, only shard and train_vqvae). Survived: no train_vqvae output looks finished,
  and the rerun resumes mid-training and finishes.
* ``driver_kill_encode``: the driver (with the local Ray it started) gets SIGKILL as soon as encode has written a
  code file. Survived: no encode output looks finished, and a rerun completes the step.
* ``driver_kill_sample``: the same, as soon as the sample step has finished its first shard (more samples than the
  debug preset, so the step lasts). Survived: no sample output looks finished, and the rerun keeps the finished
  shards ("resuming" in its log) and completes.
* ``concurrent``: two pipelines start at the same moment on one fresh root and one SQLite store. Survived: both exit
  0, and each step has exactly one output.
* ``hostile_folder``, ``read_only_root``, ``disk_full`` (``tests/drills/io_faults.py``): an input folder with a FIFO, a
  socket, device and loop links and an oversized file (the shard step finishes and names each); an artifacts root on
  a read-only tmpfs (exit 2 before anything runs, naming ``artifacts.root``); a 1 MiB root that fills up in
  train_vqvae (exit 1 naming the step, nothing of it published; after the mount grows the rerun finishes). Where a
  tmpfs cannot be mounted the last two print ``skipped`` and are not counted.

Tracking-server outages and node loss need a server or a second raylet: they are tests
(``tests/e2e/test_tracking_outage.py``, ``tests/e2e/test_node_loss.py``), not scenarios here.

Every scenario is also compared with a clean reference (uninterrupted pipelines of the same configs, run once per
bench run on a root of its own): ``identical`` when each output both hold has the same digest (weights tensor by
tensor, code columns in id order: ``drills.compare``) and every training metric logged equals the
clean run's (throughput and restart markers aside). A scenario with no finished output to compare (``nan_loss``)
counts as neither.

Afterwards ``pipeline.verify`` checks every root: each finished output has its ``_SUCCESS`` and artifacts, checkpoints
load, and ids are counted: ``rows_lost`` is the number of ids missing from code datasets (against their image
shards) and sampled codes (against ``num_samples``), ``rows_duplicated`` the ids written twice.

Last line: ``{"bench": "faults", "injected": N, "identical": N, "survived": N, "rows_lost": 0, ...}``.
Usage: python bench/faults.py [--quick] [--only worker_crash,concurrent] [--workdir DIR]
(``--quick`` runs the same scenarios: they are already minimal.)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for path in (REPO, REPO / "tests"):  # the project, and the fault-drill harness (tests/drills)
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from drills import io_faults, scenarios  # noqa: E402
from drills.compare import clean_reference, compare_to_clean  # noqa: E402
from drills.workspace import Workspace  # noqa: E402
from pipeline.verify import verify  # noqa: E402

SCENARIOS = {**scenarios.SCENARIOS, **io_faults.SCENARIOS}


@contextlib.contextmanager
def scratch(workdir: str | None) -> Iterator[Path]:
    """The bench's folder: ``workdir`` (kept), or a temporary one removed at the end. Either way every tmpfs a
    scenario kept mounted in it (disk_full) is released first: a folder with a mount in it cannot be removed."""
    with contextlib.ExitStack() as stack:
        base = Path(workdir) if workdir else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        stack.callback(io_faults.release_mounts)  # runs before the temporary folder goes
        yield base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="accepted for bench/run_all.py; the same scenarios")
    parser.add_argument("--only", default="", help="comma-separated subset of: " + ", ".join(SCENARIOS))
    parser.add_argument("--workdir", default=None, help="keep roots, stores and logs here")
    args = parser.parse_args()
    chosen = [s for s in SCENARIOS if not args.only or s in args.only.split(",")]
    with scratch(args.workdir) as base:
        results, roots = {}, {}
        clean = Workspace(base / "clean")
        reference = clean_reference(clean)
        print(f"{'clean reference':<20} {'ok' if reference['ok'] else 'FAILED':<9} {reference}", flush=True)
        roots[clean.root] = True
        for name in chosen:
            ws = Workspace(base / scenarios.SHARED.get(name, name))
            start = time.perf_counter()
            results[name] = SCENARIOS[name](ws)
            results[name]["seconds"] = round(time.perf_counter() - start, 1)
            if "skipped" in results[name]:  # e.g. no permission to mount a tmpfs here
                print(f"{name:<20} {'skipped':<9} {results.pop(name)}", flush=True)
                continue
            results[name].update(compare_to_clean(ws, clean) if reference["ok"] else {"identical": None})
            roots[ws.root] = True
            print(f"{name:<20} {'survived' if results[name]['survived'] else 'FAILED':<9} {results[name]}", flush=True)
        reports = [verify(str(root)) for root in roots if root.exists()]
    for report in reports:
        state = "ok" if report.ok else f"{len(report.errors)} problem(s): {report.errors}"
        print(f"verify {report.root}: {len(report.outputs)} outputs, rows lost {report.rows_lost}, {state}")
    summary = {
        "bench": "faults",
        "injected": len(results),
        "identical": sum(r["identical"] is True for r in results.values()),
        "survived": sum(r["survived"] for r in results.values()),
        "rows_lost": sum(r.rows_lost for r in reports),
        "rows_duplicated": sum(r.rows_duplicated for r in reports),
        "verify_ok": all(r.ok for r in reports),
        "scenarios": {name: r["survived"] for name, r in results.items()},
        "identical_per_scenario": {name: r["identical"] for name, r in results.items()},
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
