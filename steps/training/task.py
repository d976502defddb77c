"""What a training run is given: :class:`TrainConfig` (how to train, the same for every model) and :class:`TrainTask`
(what differs between training an autoencoder and a prior). :mod:`steps.training.loop` re-exports both; the worker
procedure (:mod:`steps.training.worker`) and the driver (:func:`steps.training.loop.fit`) both read them."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from steps.nn.config import ConfigBase, no_effect

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
