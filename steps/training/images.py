"""Training an autoencoder on image shards, shared by the steps that do (train_vqvae, tune_decoder): the Ray Dataset
of a split's images (PNG decoding in Ray Data tasks, in parallel with training) and :class:`AutoencoderTask`, the
:class:`~steps.training.task.TrainTask` of any autoencoder of ``steps.nn``: MSE and its own auxiliary loss, codebook
usage per log window, val MSE/PSNR and a reconstruction grid."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from steps.artifacts.autoencoder import RECON_GRID
from steps.artifacts.images import ImageShards
from steps.io.pixels import decode_batch, grid_png
from steps.nn import registry
from steps.nn.blocks import AutoencoderConfig
from steps.nn.metrics import psnr
from steps.training.task import TrainTask


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
