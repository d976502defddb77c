"""The distributed training loop both training steps share (Ray Train V2, ``TorchTrainer``).

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
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from steps.core.progress import Progress
from steps.core.step import MetricsSink, SinkUnavailableError, TaskWrap
from steps.io.storage import delete, exists, join, read_json, write_json
from steps.nn.averaging import WeightAverage
from steps.nn.checkpoint import read_checkpoint, unwrap
from steps.nn.config import ConfigBase, no_effect
from steps.training import resume
from steps.training.resume import STATE_FILE

log = logging.getLogger(__name__)
NONFINITE_FILE = "nonfinite.json"  # in the run's storage: written by rank 0 when the loss diverges
SINK_DOWN_FILE = "sink_unavailable.json"  # in the run's storage: written by rank 0 when its sink gives up
LR_SCHEDULES = ("constant", "cosine", "linear")


@dataclass(frozen=True)
class TrainConfig(ConfigBase):
    """How to train, independent of what is trained."""

    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: int = 1
    batch_size: int = 64  # per worker
    steps: int = 2000
    lr: float = 3e-4
    lr_schedule: str = "cosine"
    warmup_steps: int = 100
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # max gradient norm; 0 disables clipping
    # Exponential moving average of the weights (Polyak averaging): validation, the final checkpoint and so every
    # later step use the average, which samples better than the last iterate of a short, noisy run. 0: off.
    # Warms up as min(ema_decay, (1 + step) / (10 + step)), so early weights fade fast.
    ema_decay: float = 0.0
    checkpoint_every: int = 500
    log_every: int = 25
    val_batches: int = 4  # batches of val data scored at every checkpoint
    max_failures: int = no_effect(2)  # restarts of the worker group after a crash (the result does not change)
    # Elastic training (Ray Train V2 ``num_workers=(min, max)``): a worker group that lost nodes restarts from the
    # last checkpoint with as many workers as the cluster still fits, down to this many, instead of waiting for
    # num_workers to fit again; a node that comes back is taken up again. 0: exactly num_workers, always. With fewer
    # workers each step sees fewer images (batch_size is per worker) but training still ends at ``steps``.
    min_workers: int = no_effect(0)
    seed: int = 0
    bf16: bool = True  # autocast on GPU; CPU always trains in fp32
    # GPU: convolution weights and image batches in channels-last layout. With bf16 and the fused AdamW the loop
    # uses on CUDA, the ffhq256 VQ-VAE-2 trained 1605 images/s on an H200 against 1395 without it (bench/gpu.py).
    channels_last: bool = False
    # Read and decode the datasets into Ray's object store before training starts. Training workers then never
    # wait on read tasks, which matters when they hold every CPU (a laptop); turn off for datasets larger than
    # the object store can hold or spill.
    cache_data: bool = no_effect(True)

    def validate(self) -> None:
        self.require_min(1, "num_workers", "cpus_per_worker", "batch_size", "steps", "checkpoint_every", "log_every")
        self.require_min(0, "warmup_steps", "weight_decay", "grad_clip", "val_batches", "max_failures", "min_workers")
        self.require("min_workers", self.min_workers <= self.num_workers, f"at most num_workers ({self.num_workers})")
        self.require("lr", self.lr > 0 and math.isfinite(self.lr), "a positive number")
        self.require("lr_schedule", self.lr_schedule in LR_SCHEDULES, f"one of {LR_SCHEDULES}")
        self.require("ema_decay", 0 <= self.ema_decay < 1, "in [0, 1) (0: off)")

    @property
    def workers(self) -> int | tuple[int, int]:
        """``ScalingConfig.num_workers``: a fixed count, or (min, max) for elastic training."""
        return (self.min_workers, self.num_workers) if 0 < self.min_workers < self.num_workers else self.num_workers

    def lr_factor(self, step: int) -> float:
        """Multiplier of ``lr`` after ``step`` updates: linear warm-up, then the schedule's decay to zero."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.lr_schedule == "constant":
            return 1.0
        progress = min((step - self.warmup_steps) / max(self.steps - self.warmup_steps, 1), 1.0)
        return 0.5 * (1 + math.cos(math.pi * progress)) if self.lr_schedule == "cosine" else 1.0 - progress


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or Inf. Training stopped at once without retrying (a retry from the last checkpoint would
    repeat the same updates); the last good checkpoint stays in the run's storage."""


class TrainTask:
    """What one kind of training needs on each worker. Subclasses must be picklable (Ray ships them to workers)."""

    name = "train"
    progress_val = ("", "")  # (val metric, its label) the console's progress line shows, e.g. ("recon_mse", "val mse")

    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def prepare_batch(self, batch: Mapping[str, Any], device: torch.device) -> Any:
        """A Ray Data batch (dict of numpy arrays) -> what :meth:`loss` takes, on ``device``."""
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(scalar loss to minimise, detached scalars to log)."""
        raise NotImplementedError

    def window_stats(self, model: nn.Module) -> dict[str, float]:
        """Statistics over the steps since the last log line (e.g. codebook usage); called at every log step."""
        return {}

    def evaluate(self, model: nn.Module, batches: list[Any]) -> dict[str, float]:
        """Validation metrics on a few val batches (rank 0, eval mode, no grad)."""
        return {}

    def finalize(self, model: nn.Module, batches: list[Any], out_dir: str) -> None:
        """Write extra artifacts (e.g. a reconstruction grid) into ``out_dir`` at the end (rank 0)."""

    def begin_step(self, step: int, rank: int, run_dir: str) -> None:
        """Called before each update, ``step`` updates done (a hook for wrappers, e.g. pipeline.faults)."""

    def end_step(self, step: int, rank: int, run_dir: str) -> None:
        """Called after update ``step`` and its checkpoint, if any (a hook for wrappers)."""


def _check_replicas(model: nn.Module, step: int) -> None:
    """Every rank must hold identical buffers (the EMA codebooks): compare checksums, fail loudly if not."""
    import torch.distributed as dist

    buffers = [b.detach().double().sum() for b in unwrap(model).buffers() if b.is_floating_point()]
    if not buffers:
        return
    local = torch.stack(buffers).to(next(model.parameters()).device)
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, local)
    if any(not torch.equal(g, gathered[0]) for g in gathered[1:]):
        raise RuntimeError(f"model buffers (codebooks) differ between ranks at step {step}")


def _nonfinite_ranks(loss: torch.Tensor, world: int) -> list[int]:
    """Ranks whose loss is NaN/Inf. Every rank gets the same answer, so all stop together (none waits forever in
    the next gradient all-reduce for a rank that left)."""
    flag = (~torch.isfinite(loss.detach().float())).float().reshape(1)
    if world == 1:
        return [0] if flag.item() else []
    import torch.distributed as dist

    flags = [torch.empty_like(flag) for _ in range(world)]
    dist.all_gather(flags, flag)
    return torch.cat(flags).nonzero().flatten().tolist()  # one device sync, not one per rank


def _worker_main(config: dict) -> None:
    """:func:`_worker_loop`, then the sink's buffered metrics delivered. A sink that gave up (its store stayed down
    too long) leaves a record that stops each restarted worker group at once; :func:`fit` raises its message."""
    sink: MetricsSink = config["sink"] or MetricsSink()
    marker = join(config["run_dir"], SINK_DOWN_FILE)
    try:
        if exists(marker):
            raise SinkUnavailableError(read_json(marker)["error"])
        _worker_loop(config)
        sink.flush()
    except SinkUnavailableError as exc:
        if not exists(marker):
            write_json(marker, {"error": str(exc)})
        raise
    except BaseException:
        with contextlib.suppress(Exception):
            sink.flush(30.0)  # what was logged before the crash: a restart logs only the steps after it
        raise


def _worker_loop(config: dict) -> None:
    import ray.train
    import ray.train.torch

    task: TrainTask = config["task"]
    tc: TrainConfig = config["train"]
    sink: MetricsSink = config["sink"] or MetricsSink()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.set_num_threads(tc.cpus_per_worker)
    torch.manual_seed(tc.seed)  # identical initial weights on every rank
    model = task.build_model()
    if tc.channels_last:
        model = model.to(memory_format=torch.channels_last)
    # Buffers (the EMA codebooks) are kept identical by the quantiser's own all-reduce; DDP's per-forward
    # broadcast of them from rank 0 would only cost time.
    model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"broadcast_buffers": False})
    # The fused kernel on CUDA: one launch for all parameters (bench/gpu.py: +37% images/s for the ffhq256 VQ-VAE-2).
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay, fused=device.type == "cuda")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, tc.lr_factor)
    step = 0
    run_dir: str = config["run_dir"]
    state = resume.resume_state(ray.train.get_checkpoint(), run_dir)
    average = WeightAverage(unwrap(model), tc.ema_decay) if tc.ema_decay else None
    if state is not None:
        unwrap(model).load_state_dict(state.get("live", state["model"]))
        resume.restore_buffers(unwrap(model), state.get("buffers") or {})
        if average is not None:
            average.load_state_dict(state.get("average") or state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        step = int(state["step"])
        log.info("%s: resumed from step %d", task.name, step)
    ranks = (state or {}).get("ranks") or []
    position = (int(ranks[0]["data"][0]) + 1, 0) if ranks else (0, 0)  # another world size: start a new epoch
    if len(ranks) == world:  # every rank's random streams and data position as they were at the checkpoint
        position = resume.restore_rank_state(ranks[rank], device)
    else:  # each rank draws differently (dropout, restarts); rank 0 goes on from the stream that drew the weights
        resume.seed_rank(tc.seed + step, rank, keep_torch=rank == 0 and state is None)

    # After a restart, steps between the checkpoint and the crash were already logged: do not log them twice.
    logged_until = sink.last_step("train/loss") if rank == 0 and state is not None else 0
    if rank == 0 and state is not None:
        sink.log_metrics({"train/resumed_from": step}, step)  # shows each restart in the run's metrics
    shard = ray.train.get_dataset_shard("train")
    train_iter = resume.BatchStream(shard, tc.batch_size, tc.seed, rank, *position)
    val_shard = ray.train.get_dataset_shard("val") if rank == 0 and tc.val_batches else None
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda" and tc.bf16)
    # The metric window (sums since the last log line) travels in the checkpoint: a resume mid-window logs the same.
    saved = (state or {}).get("window") or {}
    window: dict[str, float] = dict(saved.get("sums") or {})
    last_train: dict[str, float] = dict(saved.get("last_train") or {})
    progress = Progress(task.name, tc.steps, step, items_per_unit=tc.batch_size * world) if rank == 0 else None
    seen, t0 = int(saved.get("seen", 0)), time.perf_counter()

    def checkpoint(last: bool) -> None:
        """Validation, then the checkpoint of every rank's state (and the final artifacts) reported to Ray Train."""
        if world > 1:
            _check_replicas(model, step)
        report: dict[str, float] = {"step": step, **last_train}
        val = []
        if val_shard is not None:
            val = [
                task.prepare_batch(b, device)
                for _, b in zip(
                    range(tc.val_batches),
                    val_shard.iter_batches(batch_size=tc.batch_size, batch_format="numpy"),
                    strict=False,
                )
            ]
            scored = average.model(unwrap(model)) if average is not None else unwrap(model)
            scored.eval()
            with torch.no_grad(), autocast:
                report.update({f"val/{k}": v for k, v in task.evaluate(scored, val).items()})
            if step > logged_until:
                sink.log_metrics({k: v for k, v in report.items() if k.startswith("val/")}, step)
            if f"val/{task.progress_val[0]}" in report:
                progress.val = (task.progress_val[1], report[f"val/{task.progress_val[0]}"])
        ranks = resume.gather_rank_states(resume.rank_state(device, train_iter.position), world)
        with tempfile.TemporaryDirectory() as d:
            if rank == 0:
                window_state = {"sums": window, "seen": seen, "last_train": last_train}
                resume.save_state(os.path.join(d, STATE_FILE), model, opt, sched, average, step=step,
                                  metrics={k: float(v) for k, v in report.items()}, ranks=ranks,
                                  window=window_state)  # fmt: skip
                if last:
                    final = average.model(unwrap(model)) if average is not None else unwrap(model)
                    final.eval()
                    with torch.no_grad(), autocast:
                        task.finalize(final, val, d)
            ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(d) if rank == 0 else None)

    if state is not None and step >= tc.steps:  # resumed from the final checkpoint, which Ray Train may not have
        checkpoint(last=True)  # registered before the crash: report it again, so the result is this checkpoint
    while step < tc.steps:
        model.train()
        task.begin_step(step, rank, run_dir)
        batch = task.prepare_batch(next(train_iter), device)
        if tc.channels_last and isinstance(batch, torch.Tensor) and batch.dim() == 4:
            batch = batch.contiguous(memory_format=torch.channels_last)  # (B, C, S, S) images
        with autocast:
            loss, stats = task.loss(model, batch)
        bad_ranks = _nonfinite_ranks(loss, world)
        if bad_ranks:
            # Returning (not raising) keeps Ray Train from restarting the workers: a retry would resume from the
            # same checkpoint with the same data order and diverge again. The driver turns the record into an error.
            if rank == 0:
                write_json(
                    join(run_dir, NONFINITE_FILE),
                    {"step": step + 1, "ranks": bad_ranks, "loss_rank0": float(loss.detach())},
                )
            log.error("%s: loss is not finite on rank(s) %s at step %d; stopping", task.name, bad_ranks, step + 1)
            return
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if tc.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        sched.step()
        step += 1
        if average is not None:
            average.update(unwrap(model), step)
        seen += 1
        values = {k: float(v) for k, v in {"loss": loss.detach(), **stats}.items()}
        for k, v in values.items():
            window[k] = window.get(k, 0.0) + v
        last = step == tc.steps
        if step % tc.log_every == 0 or last:
            elapsed = time.perf_counter() - t0
            metrics = {f"train/{k}": v / seen for k, v in window.items()}
            metrics.update({f"train/{k}": v for k, v in task.window_stats(unwrap(model)).items()})
            metrics["train/lr"] = sched.get_last_lr()[0]
            metrics["train/items_per_s"] = seen * tc.batch_size * world / max(elapsed, 1e-9)
            if rank == 0 and step > logged_until:
                sink.log_metrics(metrics, step)
            last_train = metrics
            window, seen, t0 = {}, 0, time.perf_counter()
        if step % tc.checkpoint_every == 0 or last:
            checkpoint(last)
        if progress is not None and (text := progress.update(step, values["loss"])):
            log.info("%s", text)  # rank 0's console: one line at least every PROGRESS_EVERY_S, and the last
        task.end_step(step, rank, run_dir)


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
):  # -> ray.train.Result
    """Train ``task`` on ``datasets`` ({"train": ..., "val": ...} Ray Datasets) and return the final checkpoint.

    ``storage``/``name`` locate Ray Train's run state: a second call with the same pair resumes from the latest
    checkpoint there instead of starting over (a restarted driver continues the run).
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
        _worker_main,
        train_loop_config={
            "task": task,
            "train": tc,
            "sink": sink,
            "run_dir": run_dir,
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
