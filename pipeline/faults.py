"""Fault injection into real training runs: for the test suite, ``bench/faults.py`` and drills on a new cluster.

:class:`Faults` wraps the training steps' tasks (the ``wrap_task`` parameter of ``steps.training.loop.fit``, which
the orchestrator passes to every step the graph marks as training): it kills rank 0 with SIGKILL (a preempted node,
the OOM killer) or raises, once, right after a given step, or turns rank 0's loss into NaN at a step. Nothing of this
is in the user-facing config. From the command line, around a normal pipeline::

    python -m pipeline.faults --kill-at train_vqvae:7 -- debug=tiny artifacts.root=/tmp/x

The drills around whole pipelines (a killed driver, two pipelines on one root, a full disk...) are test and bench
code: ``tests/drills``.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from dataclasses import dataclass, field

from steps.io import storage
from steps.training.task import TrainTask

log = logging.getLogger(__name__)
FAULT_FILE = ".fault-injected"  # in a training run's storage: the kill has fired (a restarted attempt goes on)
MODES = ("kill", "raise")


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

    faults = Faults(_steps(args.kill_at), _steps(args.nan_at), args.mode)
    sys.argv = ["pipeline", *args.overrides]
    pipeline_main(wrap_task=faults.wrap)


if __name__ == "__main__":
    main()
