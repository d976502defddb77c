"""One training worker's procedure: what :func:`steps.training.loop.fit` runs on every Ray Train worker.

:class:`WorkerContext` is all the procedure asks of the cluster around it: its rank and the world size, its device,
the model made data-parallel, the checkpoint to resume from, its data shards, and a report of metrics with a
checkpoint directory. :class:`RayWorker` provides it on a Ray Train worker and is the only code of the training loop
that touches ``ray.train``; the rest is plain torch and Python, which the unit tests drive with a fake context (one
CPU rank, in-memory shards, the reports captured).

:func:`train` is the procedure, built from :func:`build` (model, optimiser, schedule, weight average),
:meth:`Learner.restore` and :func:`restore_streams` (a checkpoint's state), :func:`train_step` (one update),
:func:`log_window` (the means of the metric window, every ``log_every``) and :func:`checkpoint` (validation and every
rank's state, every ``checkpoint_every`` and at the end). :func:`main` wraps it with the delivery of the sink's
buffered metrics.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from steps.artifacts.checkpoints import NONFINITE_FILE, SINK_DOWN_FILE
from steps.core.progress import Progress
from steps.core.step import MetricsSink, SinkUnavailableError
from steps.io.storage import exists, join, read_json, write_json
from steps.nn.averaging import WeightAverage
from steps.nn.checkpoint import unwrap
from steps.training import resume
from steps.training.resume import STATE_FILE
from steps.training.task import TrainConfig, TrainTask
from steps.training.threads import ThreadShare

log = logging.getLogger(__name__)
CHECKPOINT_FLUSH_S = 60.0  # how long a checkpoint waits for the metrics logged before it to be delivered


# ------------------------------------------------------------------------------------------------ the cluster
class WorkerContext(Protocol):
    """What a worker's training needs from the cluster it runs in."""

    rank: int
    world: int
    device: torch.device

    def prepare_model(self, model: nn.Module) -> nn.Module:
        """``model`` on :attr:`device`, wrapped for data-parallel training when :attr:`world` > 1."""

    def latest_checkpoint(self) -> Any:
        """The newest checkpoint the cluster registered for this run (``path``, ``as_directory()``), or None."""

    def dataset_shard(self, name: str) -> Any:
        """This rank's part of dataset ``name``: ``iter_batches(batch_size=..., batch_format="numpy", ...)``."""

    def report(self, metrics: Mapping[str, float], directory: str | None) -> None:
        """``metrics`` and, from rank 0, a checkpoint ``directory``, which is copied before this returns (a
        collective: every rank reports)."""


class RayWorker:
    """:class:`WorkerContext` on a Ray Train worker; imports Ray only when made, so the loop imports without it."""

    def __init__(self) -> None:
        import ray.train
        import ray.train.torch

        context = ray.train.get_context()
        self.rank, self.world = context.get_world_rank(), context.get_world_size()
        self.device: torch.device = ray.train.torch.get_device()

    def prepare_model(self, model: nn.Module) -> nn.Module:
        import ray.train.torch

        # Buffers (the EMA codebooks) are kept identical by the quantiser's own all-reduce; DDP's per-forward
        # broadcast of them from rank 0 would only cost time.
        return ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"broadcast_buffers": False})

    def latest_checkpoint(self) -> Any:
        import ray.train

        return ray.train.get_checkpoint()

    def dataset_shard(self, name: str) -> Any:
        import ray.train

        return ray.train.get_dataset_shard(name)

    def report(self, metrics: Mapping[str, float], directory: str | None) -> None:
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(directory) if directory is not None else None
        ray.train.report(dict(metrics), checkpoint=checkpoint)


# ------------------------------------------------------------------------------------------------ collectives
def check_replicas(model: nn.Module, step: int) -> None:
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


def nonfinite_ranks(loss: torch.Tensor, world: int) -> list[int]:
    """Ranks whose loss is NaN/Inf. Every rank gets the same answer, so all stop together (none waits forever in
    the next gradient all-reduce for a rank that left)."""
    flag = (~torch.isfinite(loss.detach().float())).float().reshape(1)
    if world == 1:
        return [0] if flag.item() else []
    import torch.distributed as dist

    flags = [torch.empty_like(flag) for _ in range(world)]
    dist.all_gather(flags, flag)
    return torch.cat(flags).nonzero().flatten().tolist()  # one device sync, not one per rank


# ------------------------------------------------------------------------------------------------ training state
@dataclass
class Learner:
    """What an update changes: the weights (DDP-wrapped when world > 1), optimiser, schedule, weight average, and
    the count of updates done."""

    model: nn.Module
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    average: WeightAverage | None
    step: int = 0

    def used(self) -> nn.Module:
        """The weights validation and the final artifacts use: a copy holding the average with ``ema_decay``,
        otherwise the live model itself."""
        return self.average.model(unwrap(self.model)) if self.average is not None else unwrap(self.model)

    def restore(self, state: Mapping[str, Any]) -> None:
        """Everything but the random streams and the data position from a checkpoint's state."""
        unwrap(self.model).load_state_dict(state.get("live", state["model"]))
        resume.restore_buffers(unwrap(self.model), state.get("buffers") or {})
        if self.average is not None:
            self.average.load_state_dict(state.get("average") or state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.step = int(state["step"])

    def update(self, loss: torch.Tensor, grad_clip: float) -> None:
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), grad_clip)
        self.opt.step()
        self.sched.step()
        self.step += 1
        if self.average is not None:
            self.average.update(unwrap(self.model), self.step)


def build(task: TrainTask, tc: TrainConfig, worker: WorkerContext) -> Learner:
    """The model as ``task`` builds it from ``tc.seed`` (the same on every rank), made data-parallel, and a fresh
    optimiser, schedule and weight average for it."""
    torch.manual_seed(tc.seed)  # identical initial weights on every rank
    model = task.build_model()
    if tc.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = worker.prepare_model(model)
    # The fused kernel on CUDA: one launch for all parameters (bench/gpu.py: +37% images/s for the ffhq256 VQ-VAE-2).
    fused = worker.device.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay, fused=fused)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, tc.lr_factor)
    average = WeightAverage(unwrap(model), tc.ema_decay) if tc.ema_decay else None
    return Learner(model, opt, sched, average)


def restore_streams(
    state: Mapping[str, Any] | None, tc: TrainConfig, worker: WorkerContext, step: int
) -> tuple[int, int]:
    """Set this rank's random streams and return where its data stream starts: both as they were at the checkpoint
    if it was written by as many ranks as there are now, otherwise fresh streams and the next epoch."""
    ranks = (state or {}).get("ranks") or []
    if len(ranks) == worker.world:
        return resume.restore_rank_state(ranks[worker.rank], worker.device)
    # Each rank draws differently (dropout, restarts); rank 0 goes on from the stream that drew the weights.
    resume.seed_rank(tc.seed + step, worker.rank, keep_torch=worker.rank == 0 and state is None)
    return (int(ranks[0]["data"][0]) + 1, 0) if ranks else (0, 0)  # another world size: start a new epoch


@dataclass
class MetricWindow:
    """Sums of the logged values since the last log line, and that line's metrics (each checkpoint's report carries
    them). It travels in the checkpoint, so a resume in the middle of a window logs what the whole run logs."""

    sums: dict[str, float] = field(default_factory=dict)
    seen: int = 0
    last_train: dict[str, float] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)

    @classmethod
    def restore(cls, saved: Mapping[str, Any] | None) -> MetricWindow:
        saved = saved or {}
        return cls(dict(saved.get("sums") or {}), int(saved.get("seen", 0)), dict(saved.get("last_train") or {}))

    def state(self) -> dict[str, Any]:
        return {"sums": self.sums, "seen": self.seen, "last_train": self.last_train}

    def add(self, values: Mapping[str, float]) -> None:
        self.seen += 1
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + v

    def restart(self, logged: dict[str, float]) -> None:
        self.sums, self.seen, self.last_train, self.started = {}, 0, logged, time.perf_counter()


# ------------------------------------------------------------------------------------------------ the procedure
@dataclass
class Run:
    """What the steps of one worker's attempt share once it has started (a restart makes a new one)."""

    task: TrainTask
    tc: TrainConfig
    worker: WorkerContext
    run_dir: str
    sink: MetricsSink
    logged_until: int  # steps up to here were logged by an earlier attempt, before it crashed
    stream: resume.BatchStream
    val_shard: Any  # rank 0's, when there are val batches to score; None elsewhere
    autocast: torch.autocast
    progress: Progress | None  # rank 0's console line
    threads: Threads | None = None  # takes up the CPU threads of runs that finish beside it

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        if self.worker.rank == 0 and step > self.logged_until:
            self.sink.log_metrics(metrics, step)


class Threads(Protocol):
    """How a worker takes up CPU threads that runs beside it free (:class:`steps.training.threads.ThreadShare`)."""

    def poll(self) -> None:
        """Set the thread count the runs beside it now leave it (called after every step)."""

    def leave(self) -> None:
        """This worker has finished training: its threads are free."""


def train(
    task: TrainTask, tc: TrainConfig, worker: WorkerContext, run_dir: str, sink: MetricsSink,
    threads: Threads | None = None,
) -> None:  # fmt: skip
    """One worker's part of the run: from the newest checkpoint's state (or from scratch) on to ``tc.steps``
    updates, logging the metric window every ``log_every`` and checkpointing every ``checkpoint_every`` and at the
    end. A loss that is not finite on any rank stops every rank, with a record in ``run_dir``. With ``threads``, the
    worker starts on ``cpus_per_worker`` threads and takes up more as runs beside it finish."""
    torch.set_num_threads(tc.cpus_per_worker)
    try:
        _train(task, tc, worker, run_dir, sink, threads)
    finally:
        if threads is not None:
            threads.leave()


def _train(
    task: TrainTask, tc: TrainConfig, worker: WorkerContext, run_dir: str, sink: MetricsSink, threads: Threads | None
) -> None:  # fmt: skip
    rank, device = worker.rank, worker.device
    learner = build(task, tc, worker)
    state = resume.resume_state(worker.latest_checkpoint(), run_dir)
    if state is not None:
        learner.restore(state)
        log.info("%s: resumed from step %d", task.name, learner.step)
    position = restore_streams(state, tc, worker, learner.step)
    # After a restart, steps between the checkpoint and the crash were already logged: do not log them twice.
    logged_until = sink.last_step("train/loss") if rank == 0 and state is not None else 0
    if rank == 0 and state is not None:
        sink.log_metrics({"train/resumed_from": learner.step}, learner.step)  # shows each restart in the run's metrics
    stream = resume.BatchStream(worker.dataset_shard("train"), tc.batch_size, tc.seed, rank, *position)
    val_shard = worker.dataset_shard("val") if rank == 0 and tc.val_batches else None
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda" and tc.bf16)
    items = tc.batch_size * worker.world
    progress = Progress(task.name, tc.steps, learner.step, items_per_unit=items) if rank == 0 else None
    run = Run(task, tc, worker, run_dir, sink, logged_until, stream, val_shard, autocast, progress, threads)
    window = MetricWindow.restore((state or {}).get("window"))
    if state is not None and learner.step >= tc.steps:  # resumed from the final checkpoint, which Ray Train may not
        checkpoint(run, learner, window, last=True)  # have registered before the crash: report it again
    while learner.step < tc.steps:
        learner.model.train()
        task.begin_step(learner.step, rank, run_dir)
        values = train_step(run, learner)
        if values is None:
            return  # the loss is not finite (see stop_nonfinite)
        window.add(values)
        last = learner.step == tc.steps
        if learner.step % tc.log_every == 0 or last:
            log_window(run, learner, window)
        if learner.step % tc.checkpoint_every == 0 or last:
            checkpoint(run, learner, window, last)
        if run.progress is not None and (text := run.progress.update(learner.step, values["loss"])):
            log.info("%s", text)  # rank 0's console: one line at least every PROGRESS_EVERY_S, and the last
        task.end_step(learner.step, rank, run_dir)
        if run.threads is not None:
            run.threads.poll()


def train_step(run: Run, learner: Learner) -> dict[str, float] | None:
    """One update on the next batch; the loss and the task's statistics, or None if the loss was not finite on
    some rank (then no rank updates)."""
    task, device = run.task, run.worker.device
    batch = task.prepare_batch(next(run.stream), device)
    if run.tc.channels_last and isinstance(batch, torch.Tensor) and batch.dim() == 4:
        batch = batch.contiguous(memory_format=torch.channels_last)  # (B, C, S, S) images
    with run.autocast:
        loss, stats = task.loss(learner.model, batch)
    bad_ranks = nonfinite_ranks(loss, run.worker.world)
    if bad_ranks:
        stop_nonfinite(run, learner.step + 1, bad_ranks, loss)
        return None
    learner.update(loss, run.tc.grad_clip)
    return {k: float(v) for k, v in {"loss": loss.detach(), **stats}.items()}


def stop_nonfinite(run: Run, step: int, bad_ranks: list[int], loss: torch.Tensor) -> None:
    # Stopping by returning (not raising) keeps Ray Train from restarting the workers: a retry would resume from the
    # same checkpoint with the same data order and diverge again. The driver turns the record into an error.
    if run.worker.rank == 0:
        record = {"step": step, "ranks": bad_ranks, "loss_rank0": float(loss.detach())}
        write_json(join(run.run_dir, NONFINITE_FILE), record)
    log.error("%s: loss is not finite on rank(s) %s at step %d; stopping", run.task.name, bad_ranks, step)


def log_window(run: Run, learner: Learner, window: MetricWindow) -> None:
    """The window's means, the task's statistics over it, the learning rate and the throughput to the sink; then
    a new window."""
    elapsed = time.perf_counter() - window.started
    metrics = {f"train/{k}": v / window.seen for k, v in window.sums.items()}
    metrics.update({f"train/{k}": v for k, v in run.task.window_stats(unwrap(learner.model)).items()})
    metrics["train/lr"] = learner.sched.get_last_lr()[0]
    metrics["train/items_per_s"] = window.seen * run.tc.batch_size * run.worker.world / max(elapsed, 1e-9)
    if run.threads is not None:
        metrics["train/cpu_threads"] = torch.get_num_threads()
    run.log(metrics, learner.step)
    window.restart(metrics)


def validate(run: Run, learner: Learner) -> tuple[list[Any], dict[str, float]]:
    """Rank 0 scores the weights in use on ``val_batches`` val batches: (the batches, ``val/`` metrics)."""
    task, tc = run.task, run.tc
    if run.val_shard is None:
        return [], {}
    batches = run.val_shard.iter_batches(batch_size=tc.batch_size, batch_format="numpy")
    val = [task.prepare_batch(b, run.worker.device) for _, b in zip(range(tc.val_batches), batches, strict=False)]
    scored = learner.used()
    scored.eval()
    with torch.no_grad(), run.autocast:
        metrics = {f"val/{k}": v for k, v in task.evaluate(scored, val).items()}
    run.log(metrics, learner.step)
    if f"val/{task.progress_val[0]}" in metrics:
        run.progress.val = (task.progress_val[1], metrics[f"val/{task.progress_val[0]}"])
    return val, metrics


def checkpoint(run: Run, learner: Learner, window: MetricWindow, last: bool) -> None:
    """Validation, then every rank's state in a checkpoint (with the task's final artifacts when ``last``),
    reported (a collective: every rank calls it)."""
    worker, step = run.worker, learner.step
    if worker.world > 1:
        check_replicas(learner.model, step)
    report: dict[str, float] = {"step": step, **window.last_train}
    val, val_metrics = validate(run, learner)
    report.update(val_metrics)
    ranks = resume.gather_rank_states(resume.rank_state(worker.device, run.stream.position), worker.world)
    with tempfile.TemporaryDirectory() as d:
        if worker.rank == 0:
            metrics = {k: float(v) for k, v in report.items()}
            resume.save_state(os.path.join(d, STATE_FILE), learner.model, learner.opt, learner.sched, learner.average,
                              step=step, metrics=metrics, ranks=ranks, window=window.state())  # fmt: skip
            if last:
                final = learner.used()
                final.eval()
                with torch.no_grad(), run.autocast:
                    run.task.finalize(final, val, d)
            deliver_before_checkpoint(run.sink, step)
        worker.report(report, d if worker.rank == 0 else None)


def deliver_before_checkpoint(sink: MetricsSink, step: int) -> None:
    """Wait (up to :data:`CHECKPOINT_FLUSH_S`) until the sink has delivered every metric logged so far, before the
    checkpoint is reported. A worker SIGKILLed after it then loses no metric: those logged up to the checkpoint are in
    the store, and those after it are logged again by the resumed run, each once (it logs only the steps past the
    store's last one). A store that stays down longer costs a warning, not the training time."""
    if not sink.flush(CHECKPOINT_FLUSH_S):
        log.warning(
            "metrics logged up to step %d not yet delivered (the tracking store is down); training goes on", step
        )


def main(config: Mapping[str, Any]) -> None:
    """The function every Ray Train worker runs: :func:`train`, then the sink's buffered metrics delivered. A sink
    that gave up (its store stayed down too long) leaves a record that stops each restarted worker group at once;
    :func:`steps.training.loop.fit` raises its message."""
    sink: MetricsSink = config["sink"] or MetricsSink()
    marker = join(config["run_dir"], SINK_DOWN_FILE)
    try:
        if exists(marker):
            raise SinkUnavailableError(read_json(marker)["error"])
        task, tc, context, threads = config["task"], config["train"], RayWorker(), None
        if config.get("threads") is not None:  # a ThreadLedger: take up the threads of runs that finish beside it
            threads = ThreadShare(config["threads"], f"{task.name}[{context.rank}]", tc.cpus_per_worker)
        train(task, tc, context, config["run_dir"], sink, threads)
        sink.flush()
    except SinkUnavailableError as exc:
        if not exists(marker):
            write_json(marker, {"error": str(exc)})
        raise
    except BaseException:
        with contextlib.suppress(Exception):
            sink.flush(30.0)  # what was logged before the crash: a restart logs only the steps after it
        raise
