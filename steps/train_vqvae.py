"""The ``train_vqvae`` step: train VQ-VAE-2, a one-level VQ-VAE or the Gaussian VAE baseline on image shards.

Reads the shard step's Parquet images with Ray Data (PNG decoding runs in Ray Data tasks, in parallel with training),
trains with :func:`steps.training.fit` and writes

    <out>/model.pt      the trained model (checkpoint format 1, no optimiser state)
    <out>/recon.png     val images (top rows) above their reconstructions (bottom rows)
    <out>/metrics.json  final train and val metrics
    <out>/ray/          Ray Train's run state and checkpoints (a rerun of a crashed step resumes from them)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from steps import common
from steps.common import MetricsSink, StepResult, require_input
from steps.images import decode_batch, grid_png
from steps.nn.checkpoint import AUTOENCODERS
from steps.nn.vae import VAEConfig
from steps.nn.vqvae import VQVAE2Config, VQVAEConfig
from steps.shard import read_manifest, shard_files
from steps.training import TrainConfig, TrainTask, export_checkpoint, fit, run_storage

ModelConfig = VQVAE2Config | VQVAEConfig | VAEConfig
KINDS = {VQVAE2Config: "vqvae2", VQVAEConfig: "vqvae", VAEConfig: "vae"}


@dataclass(frozen=True)
class TrainVQVAEConfig:
    model: ModelConfig = field(default_factory=VQVAE2Config)
    train: TrainConfig = field(default_factory=TrainConfig)
    grid_images: int = 16  # val images shown in recon.png

    def __post_init__(self) -> None:
        self.train.validate("train_vqvae.train")
        if self.grid_images < 1:
            raise ValueError(f"train_vqvae.grid_images must be >= 1, got {self.grid_images}")

    @property
    def kind(self) -> str:
        return KINDS[type(self.model)]


def psnr(mse: float) -> float:
    """PSNR in dB for images in [-1, 1] (peak-to-peak 2)."""
    return 10.0 * math.log10(4.0 / max(mse, 1e-12))


def _decode_images(batch: dict[str, np.ndarray], channels: int) -> dict[str, np.ndarray]:
    """Ray Data map: PNG bytes -> uint8 (B, C, S, S). Floats are made on the worker: 4x fewer bytes to ship."""
    images = ((decode_batch(batch["image"], channels) + 1.0) * 127.5).round().astype(np.uint8)
    return {"image": images}


class AutoencoderTask(TrainTask):
    """Trains any autoencoder of ``steps.nn`` on uint8 image batches."""

    def __init__(self, kind: str, model_config: dict[str, Any], grid_images: int) -> None:
        self.name = "train_vqvae"
        self.kind = kind
        self.model_config = model_config
        self.grid_images = grid_images

    def build_model(self) -> torch.nn.Module:
        return AUTOENCODERS[self.kind].from_config_dict(self.model_config)

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
            stats[f"restarts_{name}"] = float(q.restarts)
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
        with open(f"{out_dir}/recon.png", "wb") as f:
            f.write(grid_png(tiles.cpu(), nrow=nrow))


def image_dataset(shard_uri: str, split: str, channels: int):
    """Ray Dataset of uint8 images (column ``image``: (C, S, S)) of one split, or None if the split is empty."""
    import ray.data

    files = shard_files(shard_uri, split)
    if not files:
        return None
    ds = ray.data.read_parquet(files, columns=["image"])
    return ds.map_batches(_decode_images, fn_kwargs={"channels": channels}, batch_format="numpy", batch_size=256)


def run(cfg: TrainVQVAEConfig, inputs: Mapping[str, str], out: str, sink: MetricsSink | None = None) -> StepResult:
    shard = require_input(inputs, "train_vqvae", "shard")
    meta = read_manifest(shard)
    model_cfg = cfg.model
    if (meta["image_size"], meta["channels"]) != (model_cfg.image_size, model_cfg.in_channels):
        raise ValueError(
            f"image shards at {shard} hold {meta['channels']}-channel {meta['image_size']}px images, but the model "
            f"expects model.in_channels={model_cfg.in_channels}, model.image_size={model_cfg.image_size}"
        )
    datasets = {"train": image_dataset(shard, "train", meta["channels"])}
    val = image_dataset(shard, "val", meta["channels"])
    if val is not None:
        datasets["val"] = val
    task = AutoencoderTask(cfg.kind, model_cfg.to_dict(), cfg.grid_images)
    result = fit(task, cfg.train, datasets, storage=run_storage(out), name="train_vqvae", sink=sink)

    with result.checkpoint.as_directory() as d:
        payload = export_checkpoint(d, common.join(out, "model.pt"))
        grid = Path(d, "recon.png").read_bytes() if val is not None else None
    artifacts = {"model": common.join(out, "model.pt")}
    if grid is not None:
        common.write_bytes(common.join(out, "recon.png"), grid)
        artifacts["recon_grid"] = common.join(out, "recon.png")
    metrics = {k.replace("/", "_"): float(v) for k, v in (result.metrics or {}).items()}
    common.write_json(common.join(out, "metrics.json"), {"step": payload["step"], **metrics})
    return StepResult(metrics=metrics, artifacts=artifacts, info={"kind": cfg.kind, "step": int(payload["step"])})
