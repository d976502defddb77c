"""Fault injection: what the pipeline survives, and what it loses.

Each scenario runs ``python -m pipeline debug=tiny`` as subprocesses, the way a user does, on an artifacts root and a
SQLite MLflow store of its own, injects one fault, and checks the invariant that must hold:

* ``worker_crash``: rank 0 of train_vqvae is killed (SIGKILL) after step 7 (``train.fail_at_step=7``, a test-only
  setting); Ray Train restarts the worker group from the step-5 checkpoint. Survived: the pipeline finishes, and the
  step's one MLflow run holds ``train/loss`` at steps 5 and 10 once each, with a ``train/resumed_from`` point at step 5.
* ``nan_loss``: rank 0's loss becomes NaN at step 7 (``train.nan_at_step=7``). Survived: the pipeline exits non-zero
  with a NonFiniteLossError naming step 7, Ray Train did not retry, the step-5 checkpoint is still in the step's work
  directory, and nothing was published for train_vqvae.
* ``driver_kill_encode``: the driver (with the local Ray it started) gets SIGKILL as soon as encode has written a
  code file. Survived: no encode output looks finished, and a rerun completes the step.
* ``driver_kill_sample``: the same, as soon as the sample step has finished its first shard (more samples than the
  debug preset, so the step lasts). Survived: no sample output looks finished, and the rerun keeps the finished
  shards ("resuming" in its log) and completes.
* ``concurrent``: two pipelines start at the same moment on one fresh root and one SQLite store. Survived: both exit
  0, and each step has exactly one output.

Afterwards ``pipeline.verify`` checks every root: each finished output has its ``_SUCCESS`` and artifacts, checkpoints
load, and ids are counted: ``rows_lost`` is the number of ids missing from code datasets (against their image
shards) and sampled codes (against ``num_samples``), ``rows_duplicated`` the ids written twice.

Last line: ``{"bench": "faults", "injected": N, "survived": N, "rows_lost": 0, ...}``.
Usage: python bench/faults.py [--quick] [--only worker_crash,concurrent] [--workdir DIR]
(``--quick`` runs the same scenarios: they are already minimal.)
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from pipeline.verify import verify  # noqa: E402

TIMEOUT_S = 900.0
# The sample step of the kill scenario: 16 shards, so the driver can be killed between the first and the last.
SAMPLE_LONGER = ("sample.num_samples=64", "sample.shard_size=4", "sample.num_actors=1")


class Workspace:
    """One artifacts root and MLflow store, and the pipelines run on them."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.root = path / "artifacts"
        self.db = path / "mlflow.db"
        path.mkdir(parents=True, exist_ok=True)
        self._logs = 0

    def command(self, *overrides: str) -> list[str]:
        return [
            sys.executable,
            "-m",
            "pipeline",
            "debug=tiny",
            f"artifacts.root={self.root}",
            f"mlflow.tracking_uri=sqlite:///{self.db}",
            *overrides,
        ]

    def start(self, *overrides: str) -> tuple[subprocess.Popen, Path]:
        """A pipeline in its own process group (so a kill takes the local Ray it starts along)."""
        self._logs += 1
        log = self.path / f"pipeline-{self._logs}.log"
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(log, "w") as out:
            proc = subprocess.Popen(
                self.command(*overrides), cwd=self.path, stdout=out, stderr=subprocess.STDOUT, env=env,
                start_new_session=True,
            )  # fmt: skip
        return proc, log

    def run(self, *overrides: str, timeout: float = TIMEOUT_S) -> tuple[int, str]:
        proc, log = self.start(*overrides)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill(proc)
            rc = -1
        return rc, log.read_text(errors="replace")

    def run_until(self, pattern: str, *overrides: str, timeout: float = TIMEOUT_S) -> tuple[bool, str]:
        """Start a pipeline and SIGKILL it (driver and local Ray) once a file matching ``<root>/<pattern>`` exists.
        Returns (killed, output); not killed means it ended first."""
        proc, log = self.start(*overrides)
        deadline = time.monotonic() + timeout
        killed = False
        while proc.poll() is None and time.monotonic() < deadline:
            if glob.glob(str(self.root / pattern)):
                _kill(proc)
                killed = True
                break
            time.sleep(0.02)
        if proc.poll() is None:  # timed out
            _kill(proc)
        return killed, log.read_text(errors="replace")

    def finished(self, step: str) -> list[str]:
        return sorted(os.path.dirname(p) for p in glob.glob(str(self.root / step / "*" / "_SUCCESS")))

    def partial(self, step: str) -> list[str]:
        return sorted(glob.glob(str(self.root / step / "*.partial")))


def _kill(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _metric_steps(db: Path, step_name: str, key: str) -> list[list[int]]:
    """Per MLflow child run named ``step_name``: the steps at which ``key`` was logged."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    exp = client.get_experiment_by_name("vqvae2")
    runs = client.search_runs([exp.experiment_id], f"tags.`mlflow.runName` = '{step_name}'")
    return [[m.step for m in client.get_metric_history(r.info.run_id, key)] for r in runs]


# ------------------------------------------------------------------------------------------------ scenarios
def worker_crash(ws: Workspace) -> dict[str, Any]:
    rc, _ = ws.run("train_vqvae.train.fail_at_step=7", "train_vqvae.train.max_failures=2")
    losses = _metric_steps(ws.db, "train_vqvae", "train/loss")
    resumed = _metric_steps(ws.db, "train_vqvae", "train/resumed_from")
    injected = bool(glob.glob(str(ws.root / "train_vqvae" / "*" / "ray" / "*" / ".fault-injected")))
    facts = {"rc": rc, "loss_steps": losses, "resumed_from": resumed, "injected": injected}
    facts["survived"] = rc == 0 and facts["injected"] and losses == [[5, 10]] and resumed == [[5]]
    return facts


def nan_loss(ws: Workspace) -> dict[str, Any]:
    import torch

    rc, output = ws.run("train_vqvae.train.nan_at_step=7", "train_vqvae.train.max_failures=2")
    kept = [
        torch.load(p, map_location="cpu", weights_only=True)["step"]
        for p in glob.glob(str(ws.root / "train_vqvae" / "*.partial" / "ray" / "**" / "model.pt"), recursive=True)
    ]
    facts = {
        "rc": rc,
        "error_named": "NonFiniteLossError" in output and "at step 7" in output,
        "checkpoints_kept": sorted(kept),
        "published": ws.finished("train_vqvae"),
        "retried": _metric_steps(ws.db, "train_vqvae", "train/resumed_from") not in ([], [[]]),
    }
    facts["survived"] = (
        rc != 0 and facts["error_named"] and 5 in kept and not facts["published"] and not facts["retried"]
    )
    return facts


def driver_kill(ws: Workspace, step: str, pattern: str, *overrides: str) -> dict[str, Any]:
    before = set(ws.finished(step))
    killed, _ = ws.run_until(pattern, *overrides)
    interrupted = [p.removesuffix(".partial") for p in ws.partial(step)]
    facts: dict[str, Any] = {
        "killed": killed,
        "interrupted": [os.path.basename(p) for p in interrupted],
        "looked_finished_after_kill": sorted(set(ws.finished(step)) - before),
    }
    rc, output = ws.run(*overrides)
    facts.update(rerun_rc=rc, resumed="resuming" in output)
    facts["finished_after_rerun"] = bool(interrupted) and all(p in ws.finished(step) for p in interrupted)
    facts["survived"] = (
        killed and not facts["looked_finished_after_kill"] and rc == 0 and facts["finished_after_rerun"]
        and not ws.partial(step)
    )  # fmt: skip
    return facts


def driver_kill_encode(ws: Workspace) -> dict[str, Any]:
    return driver_kill(ws, "encode", "encode/*.partial/*/*.parquet")


def driver_kill_sample(ws: Workspace) -> dict[str, Any]:
    facts = driver_kill(ws, "sample", "sample/*.partial/shards/part-*.json", *SAMPLE_LONGER)
    facts["survived"] = facts["survived"] and facts["resumed"]
    return facts


def concurrent(ws: Workspace) -> dict[str, Any]:
    procs = [ws.start() for _ in range(2)]
    rcs = []
    for proc, _ in procs:
        try:
            rcs.append(proc.wait(timeout=TIMEOUT_S))
        except subprocess.TimeoutExpired:
            _kill(proc)
            rcs.append(-1)
    outputs = {step: len(ws.finished(step)) for step in ("shard", "train_vqvae", "encode", "train_prior", "sample")}
    waited = sum("another pipeline is working on it" in log.read_text(errors="replace") for _, log in procs)
    facts = {"rcs": rcs, "outputs_per_step": outputs, "pipelines_that_waited": waited}
    left = glob.glob(str(ws.root / "*" / "*.partial"))
    facts["survived"] = rcs == [0, 0] and set(outputs.values()) == {1} and not left
    return facts


SCENARIOS: dict[str, Callable[[Workspace], dict[str, Any]]] = {
    "worker_crash": worker_crash,
    "nan_loss": nan_loss,
    "driver_kill_encode": driver_kill_encode,
    "driver_kill_sample": driver_kill_sample,
    "concurrent": concurrent,
}
# Scenarios that share a root (each continues from the state the previous one left).
SHARED = {"driver_kill_sample": "driver_kill_encode"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="accepted for bench/run_all.py; the same scenarios")
    parser.add_argument("--only", default="", help="comma-separated subset of: " + ", ".join(SCENARIOS))
    parser.add_argument("--workdir", default=None, help="keep roots, stores and logs here")
    args = parser.parse_args()
    chosen = [s for s in SCENARIOS if not args.only or s in args.only.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(args.workdir or tmp)
        results, roots = {}, {}
        for name in chosen:
            ws = Workspace(base / SHARED.get(name, name))
            start = time.perf_counter()
            results[name] = SCENARIOS[name](ws)
            results[name]["seconds"] = round(time.perf_counter() - start, 1)
            roots[ws.root] = True
            print(f"{name:<20} {'survived' if results[name]['survived'] else 'FAILED':<9} {results[name]}", flush=True)
        reports = [verify(str(root)) for root in roots if root.exists()]
    for report in reports:
        state = "ok" if report.ok else f"{len(report.errors)} problem(s): {report.errors}"
        print(f"verify {report.root}: {len(report.outputs)} outputs, rows lost {report.rows_lost}, {state}")
    summary = {
        "bench": "faults",
        "injected": len(results),
        "survived": sum(r["survived"] for r in results.values()),
        "rows_lost": sum(r.rows_lost for r in reports),
        "rows_duplicated": sum(r.rows_duplicated for r in reports),
        "verify_ok": all(r.ok for r in reports),
        "scenarios": {name: r["survived"] for name, r in results.items()},
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
