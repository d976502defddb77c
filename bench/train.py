"""Training throughput: the train_vqvae step on Ray Train (one worker) against a plain single-process torch loop.

Both train the same VQ-VAE-2 on the same digits shards with the same optimiser, schedule, batch size and torch thread
count. Throughput is steady state: images/s over the logging windows after the first one (the Ray worker measures
its own windows, so Ray start-up, dataset materialisation and worker launch are excluded and reported separately).
Last line: {"bench": "train", "ray_images_per_s": ..., "plain_images_per_s": ..., "ratio": ray/plain, ...}

Usage: python bench/train.py [--quick] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np
import torch

from steps import train_vqvae
from steps.artifacts.images import ImageShards
from steps.core.step import JsonlSink
from steps.nn.vqvae import VQVAE2Config
from steps.shard import ShardConfig
from steps.shard import run as shard_run
from steps.training.images import AutoencoderTask
from steps.training.task import TrainConfig


def plain_loop(cfg: train_vqvae.TrainVQVAEConfig, images: np.ndarray, threads: int) -> float:
    """images/s of the same training in-process, over the windows after the first."""
    torch.set_num_threads(threads)
    torch.manual_seed(cfg.train.seed)
    tc = cfg.train
    task = AutoencoderTask(cfg.model, cfg.grid_images)
    model = task.build_model().train()
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, tc.lr_factor)
    rng = np.random.default_rng(0)
    rates, t0 = [], time.perf_counter()
    for step in range(1, tc.steps + 1):
        batch = {"image": images[rng.integers(0, len(images), tc.batch_size)]}
        x = task.prepare_batch(batch, torch.device("cpu"))
        loss, _ = task.loss(model, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        sched.step()
        if step % tc.log_every == 0:
            rates.append(tc.log_every * tc.batch_size / (time.perf_counter() - t0))
            t0 = time.perf_counter()
    return float(np.mean(rates[1:]))


def ray_run(cfg: train_vqvae.TrainVQVAEConfig, shards: str, work: str) -> tuple[float, float]:
    """(steady-state images/s from the worker's own windows, wall seconds of the whole step)."""
    sink_path = os.path.join(work, "metrics.jsonl")
    start = time.perf_counter()
    train_vqvae.run(cfg, {"shard": shards}, os.path.join(work, "out"), sink=JsonlSink(sink_path))
    wall = time.perf_counter() - start
    with open(sink_path) as f:
        rows = [json.loads(line) for line in f]
    rates = [r["train/items_per_s"] for r in rows if "train/items_per_s" in r]
    return float(np.mean(rates[1:])), wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=None)
    args = parser.parse_args()
    steps = args.steps or (120 if args.quick else 400)

    import ray

    ray.init(num_cpus=args.threads, include_dashboard=False, log_to_driver=False, configure_logging=False)
    with tempfile.TemporaryDirectory() as work:
        shards = os.path.join(work, "shards")
        shard_run(ShardConfig(val_fraction=0.1), {}, shards)
        images = ImageShards.open(shards).read_images("train")  # uint8 (N, 1, 32, 32)
        cfg = train_vqvae.TrainVQVAEConfig(
            model=VQVAE2Config(image_size=32, in_channels=1, channels=64),
            train=TrainConfig(
                steps=steps,
                batch_size=64,
                lr=1e-3,
                warmup_steps=10,
                log_every=20,
                checkpoint_every=steps,
                val_batches=1,
                cpus_per_worker=args.threads,
                max_failures=0,
            ),
        )
        print(f"VQ-VAE-2 (channels 64) on {len(images)} digits, batch 64, {steps} steps, {args.threads} threads")
        plain_before = plain_loop(cfg, images, args.threads)
        ray_rate, wall = ray_run(cfg, shards, work)
        plain_after = plain_loop(cfg, images, args.threads)
    plain = (plain_before + plain_after) / 2
    busy = steps * cfg.train.batch_size / ray_rate
    print(f"plain loop: {plain_before:.1f} / {plain_after:.1f} images/s (before / after the Ray run)")
    print(
        f"ray train : {ray_rate:.1f} images/s steady state; step wall time {wall:.1f} s "
        f"(about {wall - busy:.1f} s of it start-up, materialisation and checkpointing)"
    )
    print(
        json.dumps(
            {
                "bench": "train",
                "threads": args.threads,
                "steps": steps,
                "ray_images_per_s": round(ray_rate, 1),
                "plain_images_per_s": round(plain, 1),
                "plain_before_after": [round(plain_before, 1), round(plain_after, 1)],
                "ratio": round(ray_rate / plain, 3),
                "ray_step_wall_s": round(wall, 1),
                "startup_overhead_s": round(wall - busy, 1),
                "load_average": round(os.getloadavg()[0], 1),
            }
        )
    )


if __name__ == "__main__":
    main()
