"""Encode throughput: the Ray Data encode step (one actor) against a plain single-process torch loop.

Both sides encode the same digits-like images (scikit-learn's bundled digits, resized to 32x32 and tiled to N images)
with the same default-size VQ-VAE-2 (``VQVAE2Config(image_size=32, in_channels=1)``, random weights: the cost does
not depend on them), the same batch size and the same torch thread count. The plain loop does what one encode actor
does per batch: decode PNG -> ``model.encode`` -> build the Arrow table of codes (``codes_to_arrow``).

Ray's steady-state rate excludes start-up (Ray Data planning, actor start, model load, verification): after a cold
first run, the step runs once on one batch and once on N images; the rate is the slope between the two, start-up the
intercept. On a shared machine, compare only runs made at a low load average (printed): under contention Ray's several
processes get a larger share of the cores than the plain loop's one, which flatters the ratio. The
plain loop is timed before and after the Ray runs (half the images each) so drifting load on a shared machine hits
both sides alike. Prints a line per measurement and a final JSON line:

    {"bench": "encode", "ray_images_per_s": ..., "plain_images_per_s": ..., "ratio": ray/plain, "startup_s": ...}

Usage: python bench/encode.py [--quick] [--images N] [--batch-size B] [--threads T]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import numpy as np
import pyarrow as pa
import ray
import torch
from PIL import Image
from sklearn.datasets import load_digits

from steps.artifacts.autoencoder import Autoencoder, AutoencoderWriter
from steps.artifacts.code_format import CodeMeta, codes_to_arrow
from steps.artifacts.images import ShardWriter
from steps.encode import EncodeConfig, run
from steps.io.pixels import decode_batch, encode_png
from steps.nn.checkpoint import checkpoint_dict
from steps.nn.vqvae import VQVAE2, VQVAE2Config


def digits_png(n: int, size: int = 32) -> list[bytes]:
    """``n`` PNGs of the 1797 bundled digits resized to ``size`` (tiled, every copy shifted so no two are equal)."""
    base = [
        Image.fromarray((img * 255 / 16).astype(np.uint8)).resize((size, size), Image.BILINEAR)
        for img in load_digits().images
    ]
    out = []
    for i in range(n):
        arr = np.roll(np.asarray(base[i % len(base)]), i // len(base), axis=1)
        out.append(encode_png(arr))
    return out


def write_shard(root: str, images: list[bytes], rows_per_file: int = 1024) -> None:
    """Image shards: 90% train, 10% val, files of ``rows_per_file`` rows."""
    writer = ShardWriter(root, 32, 1)
    n_val = len(images) // 10
    files: dict[str, list[str]] = {"train": [], "val": []}
    for split, lo, hi in (("train", n_val, len(images)), ("val", 0, n_val)):
        for k, start in enumerate(range(lo, hi, rows_per_file)):
            stop = min(start + rows_per_file, hi)
            ids = [f"digit-{i:06d}" for i in range(start, stop)]
            files[split].append(
                writer.write_part(split, k, ids, [i % 10 for i in range(start, stop)], images[start:stop])
            )
    writer.finish(files, {"train": len(images) - n_val, "val": n_val}, skipped=[], num_classes=10, classes=None)


def plain_loop(autoencoder: Autoencoder, meta: CodeMeta, images: list[bytes], batch_size: int, threads: int) -> float:
    """Images/s of decode -> encode -> Arrow table in this process, after one warm-up batch."""
    torch.set_num_threads(threads)
    model = autoencoder.load()
    ids = [f"digit-{i:06d}" for i in range(len(images))]

    def batch(lo: int) -> pa.Table:
        x = torch.from_numpy(decode_batch(images[lo : lo + batch_size], 1))  # (B, 1, 32, 32)
        with torch.inference_mode():
            codes = model.encode(x).codes
        return codes_to_arrow(ids[lo : lo + batch_size], None, dict(zip(model.levels, codes, strict=True)), meta)

    batch(0)
    start = time.perf_counter()
    rows = sum(batch(lo).num_rows for lo in range(0, len(images), batch_size))
    return rows / (time.perf_counter() - start)


def ray_run(tmp: str, name: str, images: list[bytes], vq_dir: str, cfg: EncodeConfig) -> float:
    """Wall seconds of the whole encode step on ``images``."""
    shard = os.path.join(tmp, f"shard-{name}")
    write_shard(shard, images)
    start = time.perf_counter()
    result = run(cfg, {"shard": shard, "train_vqvae": vq_dir}, os.path.join(tmp, f"encode-{name}"))
    seconds = time.perf_counter() - start
    assert result.metrics["rows_train"] + result.metrics["rows_val"] == len(images)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer images, for CI-sized machines")
    parser.add_argument("--images", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads on both sides (default: the step's, 1)"
    )
    args = parser.parse_args()
    n = args.images or (16384 if args.quick else 65536)
    threads = args.threads or EncodeConfig().torch_threads
    bs = args.batch_size

    torch.manual_seed(0)
    model = VQVAE2(VQVAE2Config(image_size=32, in_channels=1)).eval()
    images = digits_png(n)
    print(
        f"{n} digits 32x32, VQ-VAE-2 default ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M params), "
        f"batch {bs}, {threads} torch threads, torch {torch.__version__}, ray {ray.__version__}, "
        f"{platform.processor() or platform.machine()}, load average {os.getloadavg()[0]:.1f}"
    )
    with tempfile.TemporaryDirectory(prefix="bench-encode-") as tmp:
        vq_dir = os.path.join(tmp, "train_vqvae")
        AutoencoderWriter(vq_dir).write(checkpoint_dict(model), None, {})
        autoencoder = Autoencoder.open(vq_dir)
        meta = CodeMeta.of(autoencoder, num_classes=10)

        half = images[: n // 2]
        plain_before = plain_loop(autoencoder, meta, half, bs, threads)
        print(f"plain loop (before Ray): {plain_before:8.1f} images/s on {len(half)} images")

        # Logical CPUs beyond the actor's so read and write tasks are never starved of a slot.
        ray.init(num_cpus=threads + 2, include_dashboard=False, log_to_driver=False, configure_logging=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        cfg = EncodeConfig(batch_size=bs, num_actors=1, cpus_per_actor=float(threads))
        small = images[:bs]
        t_cold = ray_run(tmp, "cold", small, vq_dir, cfg)  # first run also starts Ray's worker processes
        print(f"ray encode step, {len(small)} images, first run: {t_cold:6.2f} s (cold start)")
        t_small = ray_run(tmp, "small", small, vq_dir, cfg)
        print(f"ray encode step, {len(small)} images: {t_small:6.2f} s (start-up dominated)")
        t_big = ray_run(tmp, "big", images, vq_dir, cfg)
        print(f"ray encode step, {n} images: {t_big:6.2f} s ({n / t_big:.1f} images/s including start-up)")
        ray.shutdown()

        plain_after = plain_loop(autoencoder, meta, images[n // 2 :], bs, threads)
        print(f"plain loop (after Ray):  {plain_after:8.1f} images/s on {n - n // 2} images")

    ray_rate = (n - len(small)) / max(t_big - t_small, 1e-9)
    startup = t_big - n / ray_rate
    plain = (plain_before + plain_after) / 2
    print(f"ray steady state: {ray_rate:8.1f} images/s; start-up {startup:.1f} s per run")
    print(f"ratio ray / plain: {ray_rate / plain:.3f} (target >= 0.8)")
    print(
        json.dumps(
            {
                "bench": "encode",
                "images": n,
                "batch_size": bs,
                "threads": threads,
                "ray_images_per_s": round(ray_rate, 1),
                "plain_images_per_s": round(plain, 1),
                "plain_before_after": [round(plain_before, 1), round(plain_after, 1)],
                "ratio": round(ray_rate / plain, 3),
                "startup_s": round(startup, 2),
                "cold_first_run_s": round(t_cold, 2),
                "load_average": round(os.getloadavg()[0], 1),
            }
        )
    )


if __name__ == "__main__":
    main()
