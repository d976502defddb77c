"""Codebook health: how many codes VQ-VAE-2 uses with and without dead-code restart.

Trains the default VQ-VAE-2 (codebook size 512 per level) on scikit-learn's bundled digits resized to 32x32, once with
dead-code restart and once without, same seed and data, then counts which codes the whole dataset uses per level.
Prints a line per run and a final JSON line:

    {"bench": "codebook", "usage_top": ..., "usage_bottom": ..., "usage_top_no_restart": ..., ...}

Usage: python bench/codebook.py [--quick] [--steps N]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from steps.nn.vqvae import VQVAE2, VQVAE2Config


def digits_32() -> torch.Tensor:
    """All 1797 digits as (N, 1, 32, 32) floats in [-1, 1]."""
    images = torch.from_numpy(load_digits().images.astype(np.float32) / 16.0)[:, None]  # (N, 1, 8, 8) in [0, 1]
    return F.interpolate(images, size=32, mode="bilinear", align_corners=False) * 2 - 1


def train(cfg: VQVAE2Config, data: torch.Tensor, steps: int, batch_size: int, seed: int) -> dict:
    torch.manual_seed(seed)
    model = VQVAE2(cfg).train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-4)
    order = torch.Generator().manual_seed(seed)
    curve = []
    start = time.perf_counter()
    for step in range(1, steps + 1):
        x = data[torch.randint(0, len(data), (batch_size,), generator=order)]
        out = model(x)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        if step % max(steps // 10, 1) == 0:
            # Usage over the steps since the last point (a window, not the whole run; restarts do not read it).
            usage = {f"usage_{n}": round(q.usage_fraction(), 4) for n, q in model.quantizers.items()}
            for q in model.quantizers.values():
                q.reset_usage()
            curve.append({"step": step, "recon_mse": round(out.recon_loss.item(), 5), **usage})
    seconds = time.perf_counter() - start

    # Dataset-level usage: which codes does the whole dataset choose once training is over?
    model.eval()
    for q in model.quantizers.values():
        q.reset_usage()
    mse = 0.0
    with torch.no_grad():
        for chunk in data.split(256):
            mse += F.mse_loss(model(chunk).recon, chunk, reduction="sum").item()
    result = {name: round(q.usage_fraction(), 4) for name, q in model.quantizers.items()}
    restarts = {name: q.restart_count() for name, q in model.quantizers.items()}
    return {
        "usage": result,
        "restarts": restarts,
        "recon_mse": round(mse / data.numel(), 5),
        "seconds": round(seconds, 1),
        "curve": curve,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="short run for CI-sized machines")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    steps = args.steps or (300 if args.quick else 1500)

    data = digits_32()
    base = VQVAE2Config(image_size=32, in_channels=1)
    print(
        f"digits {tuple(data.shape)}, codebook {base.quantizer.codebook_size} per level, {steps} steps, "
        f"batch {args.batch_size}, torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads"
    )
    runs = {}
    no_restart = replace(base, quantizer=replace(base.quantizer, restart_after=0))
    for label, cfg in (("restart", base), ("no_restart", no_restart)):
        runs[label] = train(cfg, data, steps, args.batch_size, args.seed)
        r = runs[label]
        print(
            f"{label:>10}: usage top {r['usage']['top']:.1%} bottom {r['usage']['bottom']:.1%}, "
            f"restarts {r['restarts']}, recon MSE {r['recon_mse']}, {r['seconds']} s"
        )
    print(
        json.dumps(
            {
                "bench": "codebook",
                "steps": steps,
                "codebook_size": base.quantizer.codebook_size,
                "usage_top": runs["restart"]["usage"]["top"],
                "usage_bottom": runs["restart"]["usage"]["bottom"],
                "usage_top_no_restart": runs["no_restart"]["usage"]["top"],
                "usage_bottom_no_restart": runs["no_restart"]["usage"]["bottom"],
                "recon_mse": runs["restart"]["recon_mse"],
                "recon_mse_no_restart": runs["no_restart"]["recon_mse"],
                "curves": {k: v["curve"] for k, v in runs.items()},
            }
        )
    )


if __name__ == "__main__":
    main()
