"""Fault injection: real faults in real runs, for the test suite, ``bench/faults.py`` and drills on a new cluster.

Two layers:

* **Inside training** (:class:`Faults`, :func:`injected`): a wrapper around the training steps' tasks
  (``steps.training.TASK_WRAPPERS``) kills rank 0 with SIGKILL (a preempted node, the OOM killer) or raises, once,
  right after a given step, or turns rank 0's loss into NaN at a step. Nothing of this is in the user-facing config.
  From the command line, around a normal pipeline::

      python -m pipeline.faults --kill-at train_vqvae:7 -- debug=tiny artifacts.root=/tmp/x

* **Around pipelines** (:class:`Workspace` and the scenario functions): pipelines run as subprocesses the way a
  user runs them, on an artifacts root and a SQLite MLflow store of their own; the driver (with the local Ray it
  started) is SIGKILLed at a chosen moment; two pipelines race on one root. Each scenario returns the facts it saw
  and whether the invariant held (``"survived"``); :mod:`pipeline.faults_compare` says whether what it produced
  equals, bitwise, an uninterrupted run of the same configs. ``bench/faults.py`` runs them all.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from steps import storage, training
from steps.training import TrainTask

log = logging.getLogger(__name__)
FAULT_FILE = ".fault-injected"  # in a training run's storage: the kill has fired (a restarted attempt goes on)
MODES = ("kill", "raise")


# ------------------------------------------------------------------------------------------------ inside training
@dataclass(frozen=True)
class Faults:
    """Faults to inject, per training (``train_vqvae``, ``train_prior``, or one level: ``train_prior[top]``).

    Attributes:
        kill_at: training -> step after which rank 0 fails, once per run directory.
        nan_at: training -> step whose loss on rank 0 becomes NaN.
        mode: ``kill`` (SIGKILL the worker process) or ``raise`` (an exception in the training loop).
    """

    kill_at: dict[str, int] = field(default_factory=dict)
    nan_at: dict[str, int] = field(default_factory=dict)
    mode: str = "kill"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")

    def step_for(self, table: dict[str, int], task_name: str) -> int:
        """The step of ``table`` that applies to a task (``train_prior[top]`` matches ``train_prior`` too); 0: none."""
        return table.get(task_name, table.get(task_name.split("[")[0], 0))

    def wrap(self, task: TrainTask) -> TrainTask:
        kill, nan = self.step_for(self.kill_at, task.name), self.step_for(self.nan_at, task.name)
        return FaultyTask(task, kill, nan, self.mode) if kill or nan else task


class FaultyTask(TrainTask):
    """A training task that behaves as ``inner`` except for the faults it injects (see :class:`Faults`)."""

    def __init__(self, inner: TrainTask, kill_at: int, nan_at: int, mode: str) -> None:
        self.inner, self.kill_at, self.nan_at, self.mode = inner, kill_at, nan_at, mode
        self.name, self.progress_val = inner.name, inner.progress_val
        self._step, self._rank = 0, 0

    def build_model(self):
        return self.inner.build_model()

    def prepare_batch(self, batch, device):
        return self.inner.prepare_batch(batch, device)

    def loss(self, model, batch):
        loss, stats = self.inner.loss(model, batch)
        if self.nan_at == self._step + 1 and self._rank == 0:
            loss = loss * float("nan")
        return loss, stats

    def window_stats(self, model):
        return self.inner.window_stats(model)

    def evaluate(self, model, batches):
        return self.inner.evaluate(model, batches)

    def finalize(self, model, batches, out_dir):
        self.inner.finalize(model, batches, out_dir)

    def begin_step(self, step: int, rank: int, run_dir: str) -> None:
        self._step, self._rank = step, rank
        self.inner.begin_step(step, rank, run_dir)

    def end_step(self, step: int, rank: int, run_dir: str) -> None:
        self.inner.end_step(step, rank, run_dir)
        marker = storage.join(run_dir, FAULT_FILE)
        if step == self.kill_at and rank == 0 and not storage.exists(marker):
            storage.write_bytes(marker, b"")
            if self.mode == "kill":
                log.warning("injected fault: killing this worker after step %d", step)
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError(f"injected fault at step {step}")


@contextlib.contextmanager
def injected(faults: Faults) -> Iterator[None]:
    """Inject ``faults`` into every training started in this process (the driver) while the block runs."""
    training.TASK_WRAPPERS.append(faults.wrap)
    try:
        yield
    finally:
        training.TASK_WRAPPERS.remove(faults.wrap)


def _steps(values: list[str]) -> dict[str, int]:
    out = {}
    for value in values:
        name, _, step = value.rpartition(":")
        if not name or not step.isdigit():
            raise SystemExit(f"expected TRAINING:STEP (train_vqvae:7), got {value!r}")
        out[name] = int(step)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.faults", description=__doc__.split("\n\n")[0])
    parser.add_argument("--kill-at", action="append", default=[], help="TRAINING:STEP, e.g. train_vqvae:7")
    parser.add_argument("--nan-at", action="append", default=[], help="TRAINING:STEP whose loss becomes NaN")
    parser.add_argument("--mode", choices=MODES, default="kill")
    parser.add_argument("overrides", nargs="*", help="the pipeline's overrides (after --)")
    args = parser.parse_args(argv)
    from pipeline.__main__ import main as pipeline_main

    training.TASK_WRAPPERS.append(Faults(_steps(args.kill_at), _steps(args.nan_at), args.mode).wrap)
    sys.argv = ["pipeline", *args.overrides]
    pipeline_main()


# ------------------------------------------------------------------------------------------------ around pipelines
TIMEOUT_S = 900.0
# The sample step of the kill scenario: 16 shards, so the driver can be killed between the first and the last.
SAMPLE_LONGER = ("sample.num_samples=64", "sample.shard_size=4", "sample.num_actors=1")
# Training long enough that a driver killed after the first checkpoint dies mid-training (the tiny 10 steps run out in
# the moment it takes to notice the checkpoint); only the steps up to train_vqvae.
TRAIN_LONGER = ("train_vqvae.train.steps=60", "steps=[shard,train_vqvae]")


class Workspace:
    """One artifacts root and MLflow store, and the pipelines (``debug=tiny``) run on them."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.root = path / "artifacts"
        self.db = path / "mlflow.db"
        path.mkdir(parents=True, exist_ok=True)
        self._logs = 0

    def command(self, *overrides: str, faults: tuple[str, ...] = ()) -> list[str]:
        base = [f"artifacts.root={self.root}", f"mlflow.tracking_uri=sqlite:///{self.db}", "debug=tiny"]
        if faults:
            return [sys.executable, "-m", "pipeline.faults", *faults, "--", *base, *overrides]
        return [sys.executable, "-m", "pipeline", *base, *overrides]

    def start(self, *overrides: str, faults: tuple[str, ...] = ()) -> tuple[subprocess.Popen, Path]:
        """A pipeline in its own process group (so a kill takes the local Ray it starts along)."""
        self._logs += 1
        log_path = self.path / f"pipeline-{self._logs}.log"
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(log_path, "w") as out:
            proc = subprocess.Popen(
                self.command(*overrides, faults=faults), cwd=self.path, stdout=out, stderr=subprocess.STDOUT,
                env=env, start_new_session=True,
            )  # fmt: skip
        return proc, log_path

    def run(self, *overrides: str, faults: tuple[str, ...] = (), timeout: float = TIMEOUT_S) -> tuple[int, str]:
        proc, log_path = self.start(*overrides, faults=faults)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill(proc)
            rc = -1
        return rc, log_path.read_text(errors="replace")

    def run_until(
        self, pattern: str, *overrides: str, timeout: float = TIMEOUT_S, settle_s: float = 0.0
    ) -> tuple[bool, str]:
        """Start a pipeline and SIGKILL it (driver and local Ray) once a file matching ``<root>/<pattern>`` exists
        (and ``settle_s`` seconds later: time to finish writing it). Returns (killed, output); not killed means it
        ended first."""
        proc, log_path = self.start(*overrides)
        deadline = time.monotonic() + timeout
        killed = False
        while proc.poll() is None and time.monotonic() < deadline:
            if glob.glob(str(self.root / pattern)):
                time.sleep(settle_s)
                _kill(proc)
                killed = True
                break
            time.sleep(0.02)
        if proc.poll() is None:  # timed out
            _kill(proc)
        return killed, log_path.read_text(errors="replace")

    def finished(self, step: str) -> list[str]:
        return sorted(os.path.dirname(p) for p in glob.glob(str(self.root / step / "*" / storage.SUCCESS)))

    def partial(self, step: str) -> list[str]:
        return sorted(glob.glob(str(self.root / step / "*.partial")))


def _kill(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def metric_steps(db: Path, step_name: str, key: str) -> list[list[int]]:
    """Per MLflow child run named ``step_name``: the steps at which ``key`` was logged."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    exp = client.get_experiment_by_name("vqvae2")
    runs = client.search_runs([exp.experiment_id], f"tags.`mlflow.runName` = '{step_name}'")
    return [[m.step for m in client.get_metric_history(r.info.run_id, key)] for r in runs]


def worker_crash(ws: Workspace) -> dict[str, Any]:
    """Rank 0 of train_vqvae is SIGKILLed after step 7; Ray Train restarts the workers from the step-5 checkpoint.
    Survived: the pipeline finishes and the step's one MLflow run holds train/loss at steps 5 and 10 once each, with
    a train/resumed_from point at step 5."""
    rc, _ = ws.run("train_vqvae.train.max_failures=2", faults=("--kill-at", "train_vqvae:7"))
    losses = metric_steps(ws.db, "train_vqvae", "train/loss")
    resumed = metric_steps(ws.db, "train_vqvae", "train/resumed_from")
    injected = bool(glob.glob(str(ws.root / "train_vqvae" / "*" / "ray" / "*" / FAULT_FILE)))
    facts = {"rc": rc, "loss_steps": losses, "resumed_from": resumed, "injected": injected}
    facts["survived"] = rc == 0 and injected and losses == [[5, 10]] and resumed == [[5]]
    return facts


def nan_loss(ws: Workspace) -> dict[str, Any]:
    """Rank 0's loss becomes NaN at step 7. Survived: the pipeline exits non-zero with a NonFiniteLossError naming
    step 7, Ray Train did not retry, the step-5 checkpoint is kept, nothing was published for train_vqvae."""
    import torch

    rc, output = ws.run("train_vqvae.train.max_failures=2", faults=("--nan-at", "train_vqvae:7"))
    pattern = str(ws.root / "train_vqvae" / "*.partial" / "ray" / "**" / training.STATE_FILE)
    kept = [torch.load(p, map_location="cpu", weights_only=True)["step"] for p in glob.glob(pattern, recursive=True)]
    facts = {
        "rc": rc,
        "error_named": "NonFiniteLossError" in output and "at step 7" in output,
        "checkpoints_kept": sorted(kept),
        "published": ws.finished("train_vqvae"),
        "retried": metric_steps(ws.db, "train_vqvae", "train/resumed_from") not in ([], [[]]),
    }
    facts["survived"] = (
        rc != 0 and facts["error_named"] and 5 in kept and not facts["published"] and not facts["retried"]
    )
    return facts


def driver_kill(ws: Workspace, step: str, pattern: str, *overrides: str, settle_s: float = 0.0) -> dict[str, Any]:
    """SIGKILL the driver (and its local Ray) once ``pattern`` exists under the root, then rerun. Survived: no
    output of ``step`` looked finished after the kill, and the rerun finished it."""
    before = set(ws.finished(step))
    killed, _ = ws.run_until(pattern, *overrides, settle_s=settle_s)
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


def driver_kill_train(ws: Workspace) -> dict[str, Any]:
    """The driver is killed once train_vqvae (TRAIN_LONGER: 60 steps) has written its first checkpoint; the rerun
    must resume mid-training (a ``train/resumed_from`` point before step 60 in the rerun's MLflow run) and finish."""
    checkpoint = f"train_vqvae/*.partial/ray/*/checkpoint_*/{training.STATE_FILE}"
    facts = driver_kill(ws, "train_vqvae", checkpoint, *TRAIN_LONGER, settle_s=0.3)  # model.pt written whole
    facts["resumed_from"] = [s for run in metric_steps(ws.db, "train_vqvae", "train/resumed_from") for s in run]
    facts["resumed"] = len(facts["resumed_from"]) == 1 and 0 < facts["resumed_from"][0] < 60
    facts["survived"] = facts["survived"] and facts["resumed"]
    return facts


def driver_kill_encode(ws: Workspace) -> dict[str, Any]:
    """The driver is killed as soon as encode has written a code file; the rerun must keep the finished code files
    and encode only the rest ("resuming")."""
    facts = driver_kill(ws, "encode", "encode/*.partial/*/*.parquet")
    facts["survived"] = facts["survived"] and facts["resumed"]
    return facts


def driver_kill_sample(ws: Workspace) -> dict[str, Any]:
    """The driver is killed once the sample step finished its first shard; the rerun must resume ("resuming")."""
    facts = driver_kill(ws, "sample", "sample/*.partial/shards/part-*.json", *SAMPLE_LONGER)
    facts["survived"] = facts["survived"] and facts["resumed"]
    return facts


def concurrent(ws: Workspace) -> dict[str, Any]:
    """Two pipelines start at the same moment on one fresh root and one SQLite store. Survived: both exit 0, and
    each step has exactly one output, none left half-done."""
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


SCENARIOS = {
    "worker_crash": worker_crash,
    "nan_loss": nan_loss,
    "driver_kill_train": driver_kill_train,
    "driver_kill_encode": driver_kill_encode,
    "driver_kill_sample": driver_kill_sample,
    "concurrent": concurrent,
}
# Scenarios that share a root (each continues from the state the previous one left).
SHARED = {"driver_kill_sample": "driver_kill_encode"}


if __name__ == "__main__":
    main()
