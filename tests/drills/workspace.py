"""One artifacts root and MLflow store, and the pipelines run on them as subprocesses, the way a user runs them.

Each pipeline runs ``python -m pipeline debug=tiny`` (or ``python -m pipeline.faults ... --`` around it) in its own
process group, so a kill takes the local Ray it started along, as a preempted head node would.
"""

from __future__ import annotations

import contextlib
import glob
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from steps.artifacts import records

TIMEOUT_S = 900.0
# The sample step of the kill scenario: 16 shards, so the driver can be killed between the first and the last.
SAMPLE_LONGER = ("sample.num_samples=64", "sample.shard_size=4", "sample.num_actors=1")
# Training long enough that a driver killed after the first checkpoint dies mid-training (the tiny 10 steps run out in
# the moment it takes to notice the checkpoint); only the steps up to train_vqvae.
TRAIN_LONGER = ("train_vqvae.train.steps=60", "steps=[shard,train_vqvae]")


EXPERIMENT = "fault-drills"  # the MLflow experiment the drills' pipelines log into


class Workspace:
    """One artifacts root and MLflow store, and the pipelines (``debug=tiny``) run on them.

    Every pipeline gets the root, the store and the experiment as overrides, so nothing depends on the defaults."""

    def __init__(self, path: Path, experiment: str = EXPERIMENT) -> None:
        self.path = path
        self.root = path / "artifacts"
        self.db = path / "mlflow.db"
        self.experiment = experiment
        path.mkdir(parents=True, exist_ok=True)
        self._logs = 0

    def command(self, *overrides: str, faults: tuple[str, ...] = ()) -> list[str]:
        base = [f"artifacts.root={self.root}", f"mlflow.tracking_uri=sqlite:///{self.db}",
                f"mlflow.experiment={self.experiment}", "debug=tiny"]  # fmt: skip
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
            kill(proc)
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
                kill(proc)
                killed = True
                break
            time.sleep(0.02)
        if proc.poll() is None:  # timed out
            kill(proc)
        return killed, log_path.read_text(errors="replace")

    def finished(self, step: str) -> list[str]:
        return sorted(os.path.dirname(p) for p in glob.glob(str(self.root / step / "*" / records.SUCCESS)))

    def partial(self, step: str) -> list[str]:
        return sorted(glob.glob(str(self.root / step / "*.partial")))

    def step_runs(self, step_name: str) -> list:
        """The MLflow child runs named ``step_name`` (one per pipeline that ran or reused it), oldest first."""
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=f"sqlite:///{self.db}")
        exp = client.get_experiment_by_name(self.experiment)
        if exp is None:  # nothing was tracked (yet)
            return []
        found = client.search_runs([exp.experiment_id], f"tags.`mlflow.runName` = '{step_name}'")
        return sorted(found, key=lambda r: r.info.start_time)

    def metric_steps(self, step_name: str, key: str) -> list[list[int]]:
        """Per MLflow child run named ``step_name``: the steps at which ``key`` was logged."""
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=f"sqlite:///{self.db}")
        return [[m.step for m in client.get_metric_history(r.info.run_id, key)] for r in self.step_runs(step_name)]


def kill(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
