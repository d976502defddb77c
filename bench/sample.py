"""Sampling speed: the cached sampler (steps/nn/sampler.py) against naive full recompute (prior.sample_naive).

Both samplers draw from the same random-weight model with the same per-sample seeds and the same batch, in the same
process with the same torch thread count, so they return the same codes (checked below); only the work differs. With
``--device cuda`` in float32 the check can print False: the full and the incremental passes run different GPU kernels
(cuDNN convolutions in TF32 among them) whose rounding differs, which flips near-tied draws. In float64 the two match
on the GPU as well (tests/gpu/test_cuda.py).

* ``32x32``: the top prior at the paper's 256-px code-map shape (top 32x32, 512 codes) with the pipeline's default
  top-prior hyper-parameters (conf/prior/pixelsnail.yaml: channels 128, 10 layers, kernel 5, 4 attention heads after
  every 2nd layer). A naive sample reruns the whole prior 1024 times. By default both samplers run to the end (one
  sample: several minutes for the naive one). With ``--quick`` (or ``--naive-positions P``) the naive sampler is
  timed on the first P positions only and its full time is EXTRAPOLATED linearly, which the output says: each naive
  step is one full forward pass over the whole 32x32 map whatever the position, so its cost per position is
  constant. The cached sampler always runs in full.
* ``demo``: conf/experiment/digits32.yaml, both levels: class-conditional top 4x4 (channels 64, 6 layers, kernel 3,
  4 heads every 2nd layer), then the bottom 8x8 conditioned on it (channels 64, 6 layers, kernel 3, cond_channels 32,
  1 res block); both samplers run in full.

The cache memory is the bytes of every cache tensor (vertical row windows, horizontal row buffers, per-row vertical
terms, attention keys / values, conditioning features); they are allocated up front, so this is their peak.
Prints a line per measurement and a final JSON line:

    {"bench": "sample", "speedup_32x32": ..., "speedup_demo": ..., ...}

Usage: python bench/sample.py [--quick] [--threads 1] [--naive-positions P] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

from steps.nn.draw import draw_codes, uniforms
from steps.nn.pixelcnn import PixelCNNConfig, PixelCNNPrior
from steps.nn.prior import sample_naive
from steps.nn.sampler import CachedSampler

TOP_32 = PixelCNNConfig(
    num_codes=512, shape=(32, 32), channels=128, layers=10, kernel_size=5, attn_heads=4, attn_every=2
)
DEMO_TOP = PixelCNNConfig(
    num_codes=512, shape=(4, 4), channels=64, layers=6, kernel_size=3, attn_heads=4, attn_every=2, num_classes=10
)
DEMO_BOTTOM = PixelCNNConfig(
    num_codes=512,
    shape=(8, 8),
    channels=64,
    layers=6,
    kernel_size=3,
    num_classes=10,
    cond_num_codes=512,
    cond_shape=(4, 4),
    cond_channels=32,
    cond_res_blocks=1,
)


DEVICE = torch.device("cpu")  # --device


def build(config: PixelCNNConfig, seed: int) -> PixelCNNPrior:
    torch.manual_seed(seed)
    model = PixelCNNPrior(config).eval()
    torch.nn.init.normal_(model.head[-1].weight, std=0.05)  # random but not uniform predictions
    return model.to(DEVICE)


def generators(n: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(1000 + i) for i in range(n)]


def timed(fn, repeats: int = 1):
    """(result of the last call, best wall seconds over ``repeats`` calls)."""
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return out, best


def naive_prefix(
    model: PixelCNNPrior, n: int, positions: int, gens: list[torch.Generator]
) -> tuple[torch.Tensor, float]:
    """Naive sampling of the first ``positions`` raster positions: (codes of those positions (n, P), seconds)."""
    _, width = model.config.shape
    full = model.config.shape[0] * width
    # sample_naive cannot stop early; this is its loop body (a full forward pass per position, the same draw).
    u = uniforms(n, full, gens, DEVICE)
    codes = torch.zeros(n, *model.config.shape, dtype=torch.long, device=DEVICE)
    t0 = time.perf_counter()
    with torch.no_grad():
        for i in range(positions):
            r, c = divmod(i, width)
            codes[:, r, c] = draw_codes(model(codes)[:, :, r, c], u[:, i])
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
    return codes.flatten(1)[:, :positions], time.perf_counter() - t0


def bench_32x32(n: int, positions: int) -> dict:
    model = build(TOP_32, seed=0)
    sampler = CachedSampler(model)
    sampler.sample(1, generator=generators(1))  # warm-up
    cached, cached_s = timed(lambda: sampler.sample(n, generator=generators(n)))
    cache_bytes = sampler.cache_bytes
    total = TOP_32.shape[0] * TOP_32.shape[1]
    full = not 0 < positions < total
    if full:
        naive, naive_s = timed(lambda: sample_naive(model, n, generator=generators(n)))
        match, how = torch.equal(naive, cached), "measured in full"
    else:
        prefix, prefix_s = naive_prefix(model, n, positions, generators(n))
        naive_s = prefix_s / positions * total
        match = torch.equal(prefix, cached.flatten(1)[:, :positions])
        how = f"EXTRAPOLATED from {positions} of {total} positions ({prefix_s:.1f} s measured)"
    cached_rate, naive_rate = n / cached_s, n / naive_s
    print(f"32x32 top prior, batch {n}: cached {cached_rate:.4f} samples/s ({cached_s:.1f} s, measured in full)")
    print(f"32x32 top prior, batch {n}: naive  {naive_rate:.6f} samples/s ({naive_s:.0f} s, {how})")
    print(f"32x32 top prior: speedup {cached_rate / naive_rate:.0f}x; same codes: {match}")
    print(
        f"32x32 top prior: cache memory {cache_bytes / 2**20:.1f} MiB for {n} samples "
        f"({cache_bytes / n / 2**20:.2f} MiB each)"
    )
    return {
        "speedup_32x32": cached_rate / naive_rate,
        "cached_samples_per_s_32x32": cached_rate,
        "naive_samples_per_s_32x32": naive_rate,
        "naive_32x32_extrapolated": not full,
        "naive_32x32_positions_timed": total if full else positions,
        "batch_32x32": n,
        "cache_bytes_32x32": cache_bytes,
        "codes_match_32x32": match,
    }


def bench_batched(n: int) -> dict:
    """Cached throughput at a larger batch (the sample step's shard), for reference; no naive counterpart."""
    sampler = CachedSampler(build(TOP_32, seed=0))
    _, seconds = timed(lambda: sampler.sample(n, generator=generators(n)))
    rate = n / seconds
    print(
        f"32x32 top prior, batch {n}: cached {rate:.3f} samples/s; cache memory {sampler.cache_bytes / 2**20:.1f} MiB"
    )
    return {
        "cached_samples_per_s_32x32_batched": rate,
        "batch_32x32_batched": n,
        "cache_bytes_32x32_batched": sampler.cache_bytes,
    }


def bench_demo(n: int, repeats: int) -> dict:
    top, bottom = build(DEMO_TOP, seed=1), build(DEMO_BOTTOM, seed=2)
    st, sb = CachedSampler(top), CachedSampler(bottom)
    labels = (torch.arange(n) % 10).to(DEVICE)

    def cached() -> torch.Tensor:
        gens = generators(n)
        return sb.sample(n, labels, st.sample(n, labels, generator=gens), generator=gens)

    def naive() -> torch.Tensor:
        gens = generators(n)
        return sample_naive(bottom, n, labels, sample_naive(top, n, labels, generator=gens), generator=gens)

    cached()  # warm-up
    codes_cached, cached_s = timed(cached, repeats)
    codes_naive, naive_s = timed(naive, repeats)
    match = torch.equal(codes_cached, codes_naive)
    cache_bytes = st.cache_bytes + sb.cache_bytes
    cached_rate, naive_rate = n / cached_s, n / naive_s
    print(f"demo 4x4 top + 8x8 bottom, batch {n}: cached {cached_rate:.2f} samples/s, naive {naive_rate:.2f} samples/s")
    print(
        f"demo: speedup {cached_rate / naive_rate:.1f}x; same codes: {match}; "
        f"cache memory {cache_bytes / 2**20:.2f} MiB"
    )
    return {
        "speedup_demo": cached_rate / naive_rate,
        "cached_samples_per_s_demo": cached_rate,
        "naive_samples_per_s_demo": naive_rate,
        "batch_demo": n,
        "cache_bytes_demo": cache_bytes,
        "codes_match_demo": match,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller batches, naive 32x32 extrapolated (< 1 min)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for both samplers")
    parser.add_argument(
        "--naive-positions", type=int, default=None, help="time the naive 32x32 sampler on P positions (0: in full)"
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda (both samplers run there)")
    args = parser.parse_args()
    global DEVICE
    DEVICE = torch.device(args.device)
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        print(json.dumps({"bench": "sample", "skipped": "no CUDA GPU on this machine"}))
        return
    torch.set_num_threads(args.threads)
    n32, positions, batched, n_demo, repeats = (2, 16, 8, 16, 1) if args.quick else (1, 0, 32, 32, 3)
    positions = positions if args.naive_positions is None else args.naive_positions
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    where = torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else f"{args.threads} thread(s)"
    print(f"torch {torch.__version__}, {where}, {platform.machine()}, {os.cpu_count()} cores, load average {load:.1f}")
    result = {"bench": "sample", "quick": args.quick, "threads": args.threads, "device": where}
    result.update(bench_demo(n_demo, repeats))
    result.update(bench_32x32(n32, positions))
    result.update(bench_batched(batched))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
