"""The ``train_vqvae`` step: train VQ-VAE-2, a one-level VQ-VAE or the Gaussian VAE baseline on image shards.

Reads the shard step's Parquet images with Ray Data (PNG decoding runs in Ray Data tasks, in parallel with training),
trains with :func:`steps.training.loop.fit` and writes the autoencoder artifact (:mod:`steps.artifacts.autoencoder`):
the model, a reconstruction grid, final metrics, and Ray Train's run state (a rerun of a crashed step resumes from
it). The model kind is whatever ``model`` configures: any autoencoder of :mod:`steps.nn.registry`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from steps.artifacts.autoencoder import RECON_GRID, AutoencoderWriter
from steps.artifacts.images import ImageShards
from steps.core.step import MetricsSink, StepResult, TaskWrap, require_input
from steps.io.pixels import decode_batch, grid_png
from steps.nn import registry
from steps.nn.blocks import AutoencoderConfig
from steps.nn.config import ConfigBase
from steps.nn.metrics import psnr
from steps.nn.vqvae import VQVAE2Config
from steps.training.loop import checkpoint_file, final_payload, fit
from steps.training.task import TrainConfig, TrainTask


@dataclass(frozen=True)
class TrainVQVAEConfig(ConfigBase):
    model: AutoencoderConfig = field(default_factory=VQVAE2Config)  # any autoencoder kind of the registry
    train: TrainConfig = field(default_factory=TrainConfig)
    grid_images: int = 16  # val images shown in recon.png

    def validate(self) -> None:
        self.require("grid_images", self.grid_images >= 1, ">= 1")

    @property
    def kind(self) -> str:
        return registry.kind_of(self.model)


def _decode_images(batch: dict[str, np.ndarray], channels: int) -> dict[str, np.ndarray]:
    """Ray Data map: PNG bytes -> uint8 (B, C, S, S). Floats are made on the worker: 4x fewer bytes to ship."""
    images = ((decode_batch(batch["image"], channels) + 1.0) * 127.5).round().astype(np.uint8)
    return {"image": images}


class AutoencoderTask(TrainTask):
    """Trains any autoencoder of ``steps.nn`` on uint8 image batches."""

    progress_val = ("recon_mse", "val mse")

    def __init__(self, model_config: AutoencoderConfig, grid_images: int) -> None:
        self.name = "train_vqvae"
        self.model_config = model_config
        self.grid_images = grid_images

    def build_model(self) -> torch.nn.Module:
        return registry.build(self.model_config)

    def prepare_batch(self, batch: Mapping[str, Any], device: torch.device) -> torch.Tensor:
        pixels = np.require(batch["image"], requirements="W")  # Ray hands out read-only views; copy only those
        return torch.from_numpy(pixels).to(device).float() / 127.5 - 1.0  # (B, C, S, S)

    def loss(self, model, x):
        out = model(x)
        stats = {"recon_mse": out.recon_loss.detach(), **out.stats}
        return out.loss, stats

    def window_stats(self, model) -> dict[str, float]:
        stats = {}
        for name, q in getattr(model, "quantizers", {}).items():
            stats[f"usage_{name}"] = q.usage_fraction()
            stats[f"restarts_{name}"] = float(q.restart_count())
            q.reset_usage()
        return stats

    def evaluate(self, model, batches) -> dict[str, float]:
        if not batches:
            return {}
        quantizers = getattr(model, "quantizers", {})
        for q in quantizers.values():
            q.reset_usage()
        sq_err, count = 0.0, 0
        for x in batches:
            recon = model(x).recon.float()
            sq_err += F.mse_loss(recon, x, reduction="sum").item()
            count += x.numel()
        mse = sq_err / count
        metrics = {"recon_mse": mse, "psnr": psnr(mse)}
        for name, q in quantizers.items():
            metrics[f"usage_{name}"] = q.usage_fraction()
            metrics[f"perplexity_{name}"] = q.usage_perplexity()
            q.reset_usage()
        return metrics

    def finalize(self, model, batches, out_dir: str) -> None:
        if not batches:
            return
        x = torch.cat(batches)[: self.grid_images]
        recon = model(x).recon.float()
        nrow = min(8, len(x))
        # Originals and reconstructions in matching row blocks, so each image sits above its reconstruction.
        tiles = torch.cat([torch.cat([x[i : i + nrow], recon[i : i + nrow]]) for i in range(0, len(x), nrow)])
        with open(f"{out_dir}/{RECON_GRID}", "wb") as f:
            f.write(grid_png(tiles.cpu(), nrow=nrow))


def image_dataset(shards: ImageShards, split: str):
    """Ray Dataset of uint8 images (column ``image``: (C, S, S)) of one split, or None if the split is empty."""
    import ray.data

    files = shards.files(split)
    if not files:
        return None
    ds = ray.data.read_parquet(files, columns=["image"])
    return ds.map_batches(_decode_images, fn_kwargs={"channels": shards.channels}, batch_format="numpy", batch_size=256)


def run(
    cfg: TrainVQVAEConfig, inputs: Mapping[str, str], out: str, sink: MetricsSink | None = None,
    wrap_task: TaskWrap | None = None,
) -> StepResult:  # fmt: skip
    """Train ``cfg.model`` on the shards of ``inputs["shard"]``; write the autoencoder artifact to ``out``.

    Raises:
        MissingInputError: no finished shard output.
        ValueError: the shards' image size or channels differ from the model's.
    """
    shards = ImageShards.open(require_input(inputs, "train_vqvae", "shard"))
    model_cfg = cfg.model
    if shards.image_shape != (model_cfg.in_channels, model_cfg.image_size, model_cfg.image_size):
        raise ValueError(
            f"image shards at {shards.uri} hold {shards.channels}-channel {shards.image_size}px images, but the "
            f"model expects model.in_channels={model_cfg.in_channels}, model.image_size={model_cfg.image_size}"
        )
    datasets = {"train": image_dataset(shards, "train")}
    val = image_dataset(shards, "val")
    if val is not None:
        datasets["val"] = val
    writer = AutoencoderWriter(out)
    task = AutoencoderTask(model_cfg, cfg.grid_images)
    result = fit(task, cfg.train, datasets, storage=writer.train_state, name="train_vqvae", sink=sink,
                 wrap_task=wrap_task)  # fmt: skip
    payload = final_payload(result)
    metrics = {k.replace("/", "_"): float(v) for k, v in (result.metrics or {}).items()}
    grid = checkpoint_file(result, RECON_GRID) if val is not None else None
    artifacts = writer.write(payload, grid, {"step": payload["step"], **metrics})
    return StepResult(metrics=metrics, artifacts=artifacts, info={"kind": cfg.kind, "step": int(payload["step"])})
