"""Pipeline faults, each a function of a :class:`~drills.workspace.Workspace` that returns the facts it saw and
whether the invariant held (``"survived"``); :mod:`drills.compare` says whether what it produced equals, bitwise, an
uninterrupted run of the same configs. ``bench/faults.py`` runs them all, ``tests/e2e/test_faults.py`` some.
"""

from __future__ import annotations

import glob
import os
import subprocess
from typing import Any

from drills.workspace import SAMPLE_LONGER, TIMEOUT_S, TRAIN_LONGER, Workspace, kill
from pipeline.faults import FAULT_FILE
from pipeline.graph import NAMES
from steps.training.resume import STATE_FILE


def worker_crash(ws: Workspace) -> dict[str, Any]:
    """Rank 0 of train_vqvae is SIGKILLed after step 7; Ray Train restarts the workers from the step-5 checkpoint.
    Survived: the pipeline finishes and the step's one MLflow run holds train/loss at steps 5 and 10 once each, with
    a train/resumed_from point at step 5."""
    rc, _ = ws.run("train_vqvae.train.max_failures=2", faults=("--kill-at", "train_vqvae:7"))
    losses = ws.metric_steps("train_vqvae", "train/loss")
    resumed = ws.metric_steps("train_vqvae", "train/resumed_from")
    injected = bool(glob.glob(str(ws.root / "train_vqvae" / "*" / "ray" / "*" / FAULT_FILE)))
    facts = {"rc": rc, "loss_steps": losses, "resumed_from": resumed, "injected": injected}
    facts["survived"] = rc == 0 and injected and losses == [[5, 10]] and resumed == [[5]]
    return facts


def nan_loss(ws: Workspace) -> dict[str, Any]:
    """Rank 0's loss becomes NaN at step 7. Survived: the pipeline exits non-zero with a NonFiniteLossError naming
    step 7, Ray Train did not retry, the step-5 checkpoint is kept, nothing was published for train_vqvae."""
    import torch

    rc, output = ws.run("train_vqvae.train.max_failures=2", faults=("--nan-at", "train_vqvae:7"))
    pattern = str(ws.root / "train_vqvae" / "*.partial" / "ray" / "**" / STATE_FILE)
    kept = [torch.load(p, map_location="cpu", weights_only=True)["step"] for p in glob.glob(pattern, recursive=True)]
    facts = {
        "rc": rc,
        "error_named": "NonFiniteLossError" in output and "at step 7" in output,
        "checkpoints_kept": sorted(kept),
        "published": ws.finished("train_vqvae"),
        "retried": ws.metric_steps("train_vqvae", "train/resumed_from") not in ([], [[]]),
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
    checkpoint = f"train_vqvae/*.partial/ray/*/checkpoint_*/{STATE_FILE}"
    facts = driver_kill(ws, "train_vqvae", checkpoint, *TRAIN_LONGER, settle_s=0.3)  # the checkpoint written whole
    facts["resumed_from"] = [s for run in ws.metric_steps("train_vqvae", "train/resumed_from") for s in run]
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
            kill(proc)
            rcs.append(-1)
    outputs = {step: len(ws.finished(step)) for step in NAMES if step != "tune_decoder"}  # the one step left off
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
