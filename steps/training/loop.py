"""The distributed training loop both training steps share (Ray Train V2, ``TorchTrainer``): :func:`fit`, the driver.

A :class:`TrainTask` says what differs between training an autoencoder and a prior (how to build the model, turn a
batch into a loss, evaluate, and what to write at the end); :func:`fit` owns everything else: DDP through
``prepare_model`` (gloo on CPU, NCCL on GPU), the optimiser and learning-rate schedule, bf16 autocast on GPU,
gradient clipping, an optional moving average of the weights (``ema_decay``: validation and the checkpoints' ``model``
then use the average, and ``live`` keeps the optimiser's weights), periodic checkpoints carrying model, optimiser,
scheduler, step, every rank's random streams and data position, and the metric window, resuming from
``ray.train.get_checkpoint()`` after a worker failure or a restarted driver exactly where the uninterrupted run would be
(:mod:`steps.training.resume`), and rank-0 metrics to the sink.

Training counts optimiser steps, not epochs: every worker runs exactly ``steps`` updates, cycling over its data
shard as often as needed, so ranks never disagree about how many collectives remain.

This module is the driver's side: the Ray Train set-up, and the run's outcome turned into a result or an error. What
each worker runs is :mod:`steps.training.worker`; :class:`TrainConfig` and :class:`TrainTask` live in
:mod:`steps.training.task`.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Mapping
from typing import Any

from steps.artifacts.checkpoints import NONFINITE_FILE, SINK_DOWN_FILE
from steps.core.step import MetricsSink, SinkUnavailableError, TaskWrap
from steps.io.storage import delete, exists, join, read_json
from steps.nn.checkpoint import read_checkpoint
from steps.training import resume, worker
from steps.training.resume import STATE_FILE
from steps.training.task import TrainConfig, TrainTask
from steps.training.threads import ThreadLedger


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or Inf. Training stopped at once without retrying (a retry from the last checkpoint would
    repeat the same updates); the last good checkpoint stays in the run's storage."""


def final_payload(result) -> dict[str, Any]:
    """The final model of a training result's checkpoint, without optimiser/scheduler/RNG state: the checkpoint
    payload (``format``, ``kind``, ``config``, ``model``) plus ``step`` and ``metrics``."""
    with result.checkpoint.as_directory() as d:
        payload = read_checkpoint(os.path.join(d, STATE_FILE))
    return {k: payload[k] for k in ("format", "kind", "config", "model", "step", "metrics")}


def checkpoint_file(result, name: str) -> bytes | None:
    """A file a task's :meth:`TrainTask.finalize` wrote next to the final checkpoint, or None."""
    with result.checkpoint.as_directory() as d:
        path = os.path.join(d, name)
        return open(path, "rb").read() if os.path.exists(path) else None


def fit(
    task: TrainTask,
    tc: TrainConfig,
    datasets: Mapping[str, Any],
    storage: str,
    name: str,
    sink: MetricsSink | None = None,
    wrap_task: TaskWrap | None = None,
    threads: ThreadLedger | None = None,
):  # -> ray.train.Result
    """Train ``task`` on ``datasets`` ({"train": ..., "val": ...} Ray Datasets) and return the final checkpoint.

    ``storage``/``name`` locate Ray Train's run state: a second call with the same pair resumes from the latest
    checkpoint there instead of starting over (a restarted driver continues the run). With ``threads`` (the ledger of
    runs training at the same time), the workers take up the CPU threads of those that finish before them on their
    node (:mod:`steps.training.threads`).
    """
    import ray.data
    import ray.train
    from ray.train.torch import TorchTrainer

    if wrap_task is not None:  # e.g. pipeline.faults: the one hook into the loop
        task = wrap_task(task)
    run_dir = join(storage, name)
    nonfinite_marker = join(run_dir, NONFINITE_FILE)
    delete(nonfinite_marker)  # a record from an earlier attempt of this run is history now
    sink_marker = join(run_dir, SINK_DOWN_FILE)
    delete(sink_marker)
    datasets = {name: resume.preserve_order(ds) for name, ds in datasets.items()}
    if tc.cache_data:
        datasets = {name: ds.materialize() for name, ds in datasets.items()}
    # Ray Train's console chatter follows the driver's ray.train logger (pipeline/ray_logs.py sets it), and its
    # default ingest options copy these through a deprecated argument (a warning in every run).
    level = logging.getLevelName(logging.getLogger("ray.train").level or logging.INFO)
    ingest = copy.deepcopy(ray.data.DataContext.get_current().execution_options)
    ingest.preserve_order = True  # a fixed row order per rank: resume.BatchStream's epochs build on it
    trainer = TorchTrainer(
        worker.main,
        train_loop_config={
            "task": task,
            "train": tc,
            "sink": sink,
            "run_dir": run_dir,
            "threads": threads,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=tc.workers, use_gpu=tc.use_gpu, resources_per_worker={"CPU": tc.cpus_per_worker}
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage,
            failure_config=ray.train.FailureConfig(max_failures=tc.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            logging_config=ray.train.LoggingConfig(level),
        ),
        datasets=dict(datasets),
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"], execution_options=ingest),
    )
    try:
        result = trainer.fit()
    except Exception:
        if exists(sink_marker):  # the metrics store stayed unreachable: its message, not Ray's wrapped traceback
            raise SinkUnavailableError(f"{task.name}: {read_json(sink_marker)['error']}") from None
        raise
    if exists(nonfinite_marker):
        record = read_json(nonfinite_marker)
        kept = (
            f"the last good checkpoint (step {int((result.metrics or {}).get('step', 0))}) is kept at "
            f"{result.checkpoint.path}"
            if result.checkpoint is not None
            else "there is no checkpoint yet (it diverged before the first one)"
        )
        raise NonFiniteLossError(
            f"{task.name}: loss is not finite (NaN/Inf) on rank(s) {record['ranks']} at step {record['step']}; "
            f"training stopped without retrying, and {kept}. Lower train.lr, raise train.warmup_steps or set "
            f"train.grad_clip, then run again (a changed setting starts a new run)."
        )
    if result.checkpoint is None:
        raise RuntimeError(f"{task.name}: training finished without a checkpoint (see the Ray Train logs)")
    return result
