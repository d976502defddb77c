"""GPU figures in one prepared run: the CUDA-graph sampler against the eager one, and train_vqvae's step throughput.

    python3 bench/gpu.py --device cuda      # one GPU, <= 6 minutes on an H200 (add --compile for torch.compile)
    python3 bench/gpu.py --device cpu       # dry run with tiny sizes, ~1 minute on 2 CPU cores

Sections (``--only sampler,train``; all by default):

* ``sampler``: the default-size top prior at 32x32 (conf/prior/pixelsnail.yaml: 512 codes, channels 128, 10 layers,
  kernel 5, 4 attention heads after every 2nd layer), random weights as in bench/sample.py. For batches 1, 64 and 512:
  one full map (1024 positions) with the eager cached sampler (``attention="auto"``), then with CUDA graphs for
  both ways to attend, "sdpa" and "bmm" (the first call captures; three replays after it are timed, the median
  reported). Reports ms per position, maps/s, the speedup, capture seconds and cache bytes, and the GPU kernels per
  position (profiler, on a 2x32 map of the same prior). Exactness: the graph codes of the attention the eager call
  used must equal the eager codes (the same kernels replayed), in float32; reported, not fatal. Plus graph = eager =
  naive in float64 on small top and bottom priors.
  Goals for an H200: >= 10x the eager maps/s at batch 512, <= 0.3 ms per position at batch 1. What bounds batch 512:
  every position's attention reads the float32 keys and values of all earlier positions, 512 x 512 x 2 x 128 x 4 B
  per block on average, 1.3 GB per position for 5 blocks, ~0.28 ms at the H200's 4.8 TB/s, ~0.29 s per map at best.
  The eager sampler itself got ~2x faster with this change (half the kernels per position), so the speedup over
  the eager sampler of the same code should cap near 6x at batch 512; "speedup_vs_old_eager_h100" compares with
  the eager figures in the issue (H100: 0.34 maps/s at batch 1, 102 at 512).
* ``train``: train_vqvae's step on the ffhq256 recipe's VQ-VAE-2 at 256 px (conf/experiment/ffhq256.yaml), batch 32,
  in a plain torch loop mirroring steps/training/loop.py (AdamW, grad-norm clip 1.0, ``out = model(x);
  out.loss.backward()``, the loss read back every step as the training loop's window does), on synthetic images.
  Variants: fp32, bf16 autocast, + channels_last, + fused AdamW, both, and with ``--compile`` torch.compile (a failed
  compile is reported and the run goes on). Reports images/s, achieved TFLOP/s (FLOPs of one forward + backward
  counted by torch.utils.flop_counter: convolutions and matrix products only) and the fraction of the GPU's dense
  bf16 peak (``--peak-tflops``, 989 for H100 / H200 SXM).
* ``encode``, ``pipeline``: the encode step (Ray, one GPU actor) against a plain loop, and the ffhq256 recipe shrunk
  through ``python -m pipeline`` with every step on the GPU, then ``pipeline.verify`` (bench/gpu_pipeline.py). They
  need Ray, MLflow and Hydra, and report ``{"skipped": ...}`` where those are not installed.

Prints a human line per measurement and, last, one JSON line: ``{"bench": "gpu", "env": {...}, "sampler": {...},
"train": {...}, "encode": {...}, "pipeline": {...}}``; environment facts (device, torch, CUDA, TF32 settings) are in
"env". Exits 1 if a section failed (its entry then holds the error). The sampler and train sections need only
torch, numpy and ``steps.nn`` (pure torch).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import gpu_pipeline  # noqa: E402
import torch  # noqa: E402

from steps.nn.pixelcnn import PixelCNNConfig, PixelCNNPrior  # noqa: E402
from steps.nn.prior import sample_naive  # noqa: E402
from steps.nn.sampler import CachedSampler  # noqa: E402

SECTIONS = ("sampler", "train", "encode", "pipeline")
TOP_32 = PixelCNNConfig(
    num_codes=512, shape=(32, 32), channels=128, layers=10, kernel_size=5, attn_heads=4, attn_every=2
)
TINY_TOP = PixelCNNConfig(num_codes=32, shape=(4, 8), channels=16, layers=2, kernel_size=3, attn_heads=2, attn_every=1)
# Small priors for the float64 exactness check: a class-conditional top with attention, a bottom on top codes.
EXACT_TOP = PixelCNNConfig(num_codes=64, shape=(8, 8), channels=32, layers=4, attn_heads=4, attn_every=2, num_classes=3)
EXACT_BOTTOM = PixelCNNConfig(
    num_codes=64,
    shape=(8, 8),
    channels=32,
    layers=4,
    kernel_size=3,
    cond_num_codes=64,
    cond_shape=(4, 4),
    cond_channels=16,
    cond_res_blocks=1,
)


def log(line: str) -> None:
    print(line, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    """(result, wall seconds) of one call, the device's queue drained before and after."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def environment(device: torch.device) -> dict[str, Any]:
    env: dict[str, Any] = {
        "device_type": device.type,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "tf32_cudnn": torch.backends.cudnn.allow_tf32,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "cpu_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(
            device=props.name,
            capability=f"{props.major}.{props.minor}",
            multiprocessors=props.multi_processor_count,
            memory_gib=round(props.total_memory / 2**30, 1),
            gpus=torch.cuda.device_count(),
        )
    else:
        env["device"] = platform.processor() or platform.machine()
    return env


# ------------------------------------------------------------------------------------------------ sampler
def prior(config: PixelCNNConfig, device: torch.device, dtype: torch.dtype = torch.float32, std: float = 0.05):
    torch.manual_seed(0)
    model = PixelCNNPrior(config).eval()
    torch.nn.init.normal_(model.head[-1].weight, std=std)  # random but not uniform predictions (bench/sample.py)
    return model.to(device=device, dtype=dtype)


def generators(n: int, base: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(base + i) for i in range(n)]


def exact_float64(device: torch.device) -> dict[str, Any]:
    """Graph (CUDA only), eager and naive codes on small float64 priors, batches 1 and 4, two calls each."""
    out: dict[str, Any] = {}
    for name, config in (("top", EXACT_TOP), ("bottom", EXACT_BOTTOM)):
        model = prior(config, device, torch.float64, std=1.0)
        samplers = {"eager": CachedSampler(model, cuda_graphs=False)}
        if device.type == "cuda":
            samplers["graph"] = CachedSampler(model, cuda_graphs=True)
        same = True
        for batch in (1, 4):
            for call in range(2):  # the second call of a configuration replays its graphs
                g = torch.Generator().manual_seed(100 * batch + call)
                ctx = {}
                if config.num_classes:
                    ctx["labels"] = torch.randint(0, config.num_classes, (batch,), generator=g).to(device)
                if config.cond_num_codes:
                    shape = (batch, *config.cond_shape)
                    ctx["cond"] = torch.randint(0, config.cond_num_codes, shape, generator=g).to(device)
                seeds = [1000 * call + i for i in range(batch)]
                codes = [s.sample(batch, **ctx, generator=seeds) for s in samplers.values()]
                codes.append(sample_naive(model, batch, **ctx, generator=seeds))
                same &= all(torch.equal(codes[0], c) for c in codes[1:])
        out[f"float64_{name}_codes_equal"] = same
        log(f"sampler: float64 {name} prior 8x8, {' = '.join([*samplers, 'naive'])} codes: {same}")
    return out


def kernels_per_position(run: Callable[[], Any], positions: int, device: torch.device) -> float | None:
    """Work items launched per position by ``run()``: GPU kernels (incl. memcpy / memset) on CUDA, top-level aten
    operators on CPU; row starts and per-call setup are included, spread over the positions."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        run()
        sync(device)
    events = prof.events()
    if device.type == "cuda":
        count = sum(1 for e in events if e.device_type == DeviceType.CUDA)
    else:
        count = sum(1 for e in events if e.name.startswith("aten::") and e.cpu_parent is None)
    return count / positions if count else None


def graph_timings(
    model: PixelCNNPrior, n: int, attention: str, eager_codes: torch.Tensor, positions: int, device: torch.device
) -> dict[str, Any]:
    """One batch size with CUDA graphs: the first call (capture + replay), then three timed replays."""
    graphs = CachedSampler(model, cuda_graphs=True, attention=attention)
    _, first_s = timed(lambda: graphs.sample(n, generator=generators(n, 10_000)), device)
    replays, equal = [], None
    for seed in (10_000, 20_000, 30_000):  # the eager call's seeds first: its codes are compared
        codes, seconds = timed(lambda seed=seed: graphs.sample(n, generator=generators(n, seed)), device)
        replays.append(seconds)
        equal = torch.equal(codes, eager_codes) if equal is None else equal
    median = sorted(replays)[len(replays) // 2]
    return {
        "s": median,
        "s_min": min(replays),
        "ms_per_position": 1e3 * median / positions,
        "maps_per_s": n / median,
        "first_call_s": first_s,
        "capture_s": graphs.capture_seconds,
        "cache_bytes": graphs.cache_bytes,
        "float32_codes_equal_eager": equal,
        "replayed": graphs.cuda_graphs and graphs.captures == 1,  # False: capture failed, timings are eager
    }


def section_sampler(device: torch.device, batches: list[int], graphs: bool) -> dict[str, Any]:
    """Eager vs CUDA graphs (both ways to attend, if ``graphs``) per batch size; see the module docstring."""
    cuda = device.type == "cuda"
    config = TOP_32 if cuda else TINY_TOP
    positions = config.shape[0] * config.shape[1]
    result: dict[str, Any] = {"config": config.to_dict(), "positions": positions, "batches": batches}
    result.update(exact_float64(device))

    model = prior(config, device)
    eager = CachedSampler(model, cuda_graphs=False)  # attention="auto", like the graphs timed as the default
    _, warm_s = timed(lambda: eager.sample(1, generator=generators(1, 0)), device)  # cuBLAS / cuDNN start-up
    log(f"sampler: eager warm-up map at batch 1: {warm_s:.2f} s")

    # Kernels per position at batch 1 on a 2-row map of the same prior (the count does not depend on the height).
    short = prior(PixelCNNConfig(**{**config.to_dict(), "shape": [2, config.shape[1]]}), device)
    short_positions, counts = 2 * config.shape[1], {}
    try:
        for attention in ("sdpa", "bmm"):
            for graphed in (False, True) if graphs else (False,):
                sampler = CachedSampler(short, cuda_graphs=graphed, attention=attention)
                sampler.sample(1, generator=generators(1, 0))  # warm-up / capture
                run = lambda sampler=sampler: sampler.sample(1, generator=generators(1, 0))  # noqa: E731
                counts[f"{'graph' if graphed else 'eager'}_{attention}"] = kernels_per_position(
                    run, short_positions, device
                )
        result["kernels_per_position"] = counts
        what = "GPU kernels" if cuda else "aten operators"
        log(f"sampler: {what} per position (2x{config.shape[1]} map, batch 1, incl. row starts): {counts}")
    except Exception as e:  # the profiler is a nice-to-have: never lose the timings for it
        result["kernels_per_position_error"] = f"{type(e).__name__}: {e}"
        log(f"sampler: counting kernels failed: {result['kernels_per_position_error']}")
    del short
    free(device)

    for n in batches:
        codes_eager, eager_s = timed(lambda n=n: eager.sample(n, generator=generators(n, 10_000)), device)
        auto = eager.attention_for(n)
        row: dict[str, Any] = {
            "eager_s": eager_s,
            "eager_ms_per_position": 1e3 * eager_s / positions,
            "eager_maps_per_s": n / eager_s,
            "eager_attention": auto,
            "cache_bytes": eager.cache_bytes,
        }
        log(
            f"sampler: batch {n}: eager ({auto}) {1e3 * eager_s / positions:.3f} ms/position, {n / eager_s:.1f} "
            f"maps/s; cache {eager.cache_bytes / 2**20:.1f} MiB"
        )
        if graphs:
            for attention in ("sdpa", "bmm"):
                graph = graph_timings(model, n, attention, codes_eager, positions, device)
                graph["speedup_vs_eager"] = eager_s / graph["s"]
                row[f"graph_{attention}"] = graph
                same = "codes equal eager's" if attention == auto else "codes equal eager's (other kernels)"
                log(
                    f"sampler: batch {n}: graphs ({attention}) {graph['ms_per_position']:.3f} ms/position, "
                    f"{graph['maps_per_s']:.1f} maps/s, {graph['speedup_vs_eager']:.1f}x eager, capture "
                    f"{graph['capture_s']:.2f} s, first call {graph['first_call_s']:.2f} s; float32 {same}: "
                    f"{graph['float32_codes_equal_eager']}"
                )
                free(device)
            row["graph_default"] = auto  # what attention="auto" picks for this batch
            row["graph_fastest"] = min(("sdpa", "bmm"), key=lambda a: row[f"graph_{a}"]["s"])
            row["speedup"] = row[f"graph_{auto}"]["speedup_vs_eager"]
        result[f"batch_{n}"] = row
        del codes_eager
        free(device)
    if graphs and 1 in batches and 512 in batches:
        one, big = result["batch_1"], result["batch_512"]
        result["goal_speedup_512_ge_10"] = big["speedup"] >= 10
        result["goal_batch1_ms_per_position_le_0.3"] = one[f"graph_{one['graph_default']}"]["ms_per_position"] <= 0.3
        # The figures for the eager sampler before this change (H100): ~0.34 maps/s at 1, ~102 at 512.
        result["speedup_vs_old_eager_h100"] = {
            "batch_1": one[f"graph_{one['graph_default']}"]["maps_per_s"] / 0.34,
            "batch_512": big[f"graph_{big['graph_default']}"]["maps_per_s"] / 102,
        }
        log(
            f"sampler: goals (attention='auto'): >= 10x eager at 512: {result['goal_speedup_512_ge_10']}; "
            f"<= 0.3 ms/position at batch 1: {result['goal_batch1_ms_per_position_le_0.3']}; vs the old eager "
            f"sampler's H100 figures: {result['speedup_vs_old_eager_h100']}"
        )
    return result


# ------------------------------------------------------------------------------------------------ train
def vqvae(tiny: bool) -> torch.nn.Module:
    """The ffhq256 recipe's VQ-VAE-2 (conf/experiment/ffhq256.yaml), or a tiny one for the CPU dry run."""
    from steps.nn.quantize import EMAQuantizerConfig
    from steps.nn.vqvae import VQVAE2, VQVAE2Config

    if tiny:
        quantizer = EMAQuantizerConfig(codebook_size=64, dim=16)
        config = VQVAE2Config(
            image_size=32, in_channels=3, channels=32, res_blocks=1, res_channels=16, quantizer=quantizer
        )
    else:
        quantizer = EMAQuantizerConfig(codebook_size=512, dim=64)
        config = VQVAE2Config(
            image_size=256, in_channels=3, channels=128, res_blocks=2, res_channels=64, quantizer=quantizer
        )
    return VQVAE2(config)


def images(batch: int, size: int, device: torch.device) -> torch.Tensor:
    """Smooth random images in [-1, 1] (blurred noise), (B, 3, S, S): structure for the codebooks to fit."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 3, size // 8, size // 8, generator=g)
    return (torch.nn.functional.interpolate(x, size=size, mode="bilinear") * 2 - 1).to(device)


def step_flops(tiny: bool, x: torch.Tensor) -> int:
    """FLOPs of one forward + backward (convolutions and matrix products), counted on a fresh fp32 model."""
    from torch.utils.flop_counter import FlopCounterMode

    model = vqvae(tiny).to(x.device).train()
    counter = FlopCounterMode(display=False)
    with counter:
        model(x).loss.backward()
    return counter.get_total_flops()


def train_variant(
    options: dict[str, bool], x: torch.Tensor, tiny: bool, seconds: float, warm_up: int
) -> dict[str, Any]:
    """Steady-state throughput of one variant: a fresh model and optimiser, ``warm_up`` steps, then >= ``seconds``."""
    device = x.device
    torch.manual_seed(0)
    model = vqvae(tiny).to(device).train()
    if options["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.0, fused=options["fused"])
    run = torch.compile(model) if options["compile"] else model
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=options["bf16"])

    def step() -> float:  # steps/training/loop.py: forward under autocast, backward, clip, step, the loss read back
        with autocast:
            out = run(x)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return float(out.loss.detach())

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _, first_s = timed(step, device)  # compiles, with --compile
    for _ in range(warm_up - 1):
        step()
    sync(device)
    steps, t0 = 0, time.perf_counter()
    while steps < 3 or time.perf_counter() - t0 < seconds:
        loss = step()
        steps += 1
    sync(device)
    elapsed = time.perf_counter() - t0
    result = {
        "steps_timed": steps,
        "seconds": elapsed,
        "step_ms": 1e3 * elapsed / steps,
        "images_per_s": steps * x.shape[0] / elapsed,
        "first_step_s": first_s,
        "final_loss": loss,
        "loss_finite": math.isfinite(loss),
    }
    if device.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return result


def section_train(device: torch.device, batch: int, seconds: float, compile_: bool, peak_tflops: float):
    cuda = device.type == "cuda"
    tiny = not cuda
    size = 32 if tiny else 256
    batch = batch if cuda else 4
    seconds = seconds if cuda else 0.5
    warm_up = 5 if cuda else 1
    x = images(batch, size, device)
    flops = step_flops(tiny, x)
    free(device)
    result: dict[str, Any] = {
        "image_size": size,
        "batch": batch,
        "flops_per_step": flops,
        "peak_tflops": peak_tflops,
        "variants": {},
    }
    log(f"train: VQ-VAE-2 at {size} px, batch {batch}: {flops / 1e12:.3f} TFLOP per step (forward + backward)")
    variants = {
        "fp32": dict(bf16=False, channels_last=False, fused=False, compile=False),
        "bf16": dict(bf16=True, channels_last=False, fused=False, compile=False),
        "bf16+channels_last": dict(bf16=True, channels_last=True, fused=False, compile=False),
        "bf16+fused_adamw": dict(bf16=True, channels_last=False, fused=True, compile=False),
        "bf16+channels_last+fused_adamw": dict(bf16=True, channels_last=True, fused=True, compile=False),
    }
    if compile_:
        variants["bf16+channels_last+fused_adamw+compile"] = dict(
            bf16=True, channels_last=True, fused=True, compile=True
        )
    for name, options in variants.items():
        try:
            row = train_variant(options, x, tiny, seconds, warm_up)
        except Exception as e:  # a variant that fails (a compile error, say) is reported; the others still run
            row = {"error": f"{type(e).__name__}: {e}"[:2000]}
            log(f"train: {name}: FAILED {row['error'][:300]}")
            traceback.print_exc(file=sys.stderr)
            if options["compile"]:
                torch._dynamo.reset()
        else:
            tflops = flops * row["images_per_s"] / batch / 1e12
            row.update(achieved_tflops=tflops, fraction_of_peak=tflops / peak_tflops)
            log(
                f"train: {name}: {row['images_per_s']:.1f} images/s ({row['step_ms']:.1f} ms/step over "
                f"{row['steps_timed']} steps), {tflops:.1f} TFLOP/s = {100 * tflops / peak_tflops:.1f}% of "
                f"{peak_tflops:.0f}; first step {row['first_step_s']:.1f} s"
            )
        result["variants"][name] = row
        free(device)
    base = result["variants"]["fp32"].get("images_per_s")
    for row in result["variants"].values():
        if base and "images_per_s" in row:
            row["speedup_vs_fp32"] = row["images_per_s"] / base
    return result


# ------------------------------------------------------------------------------------------------ main
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: a dry run with tiny sizes")
    parser.add_argument(
        "--quick", action="store_true", help="accepted for bench/run_all.py: the run is minutes already"
    )
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections of {SECTIONS}")
    parser.add_argument("--batches", default="1,64,512", help="sampler batch sizes (cpu: 1,4)")
    parser.add_argument("--train-batch", type=int, default=32, help="train_vqvae batch size (the ffhq256 recipe's)")
    parser.add_argument("--train-seconds", type=float, default=5.0, help="timed seconds per training variant")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile in the train section")
    parser.add_argument("--pipeline-timeout", type=float, default=480.0, help="seconds the pipeline section may run")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the GPU (H100/H200 SXM)")
    args = parser.parse_args()
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(only) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown section(s) {unknown}; choose from {SECTIONS}")
    device = torch.device(args.device)
    result: dict[str, Any] = {"bench": "gpu", "device": args.device}
    if device.type == "cuda" and not torch.cuda.is_available():
        result["skipped"] = "no CUDA GPU on this machine"
        print(json.dumps(result))
        return 0
    env = environment(device)
    result["env"] = env
    log(f"gpu bench: {env.get('device')}, torch {env['torch']}, CUDA {env['cuda']}, TF32 matmul {env['tf32_matmul']}")
    batches = [int(b) for b in args.batches.split(",")] if device.type == "cuda" else [1, 4]
    sections = {
        "sampler": lambda: section_sampler(device, batches, graphs=device.type == "cuda"),
        "train": lambda: section_train(device, args.train_batch, args.train_seconds, args.compile, args.peak_tflops),
        "encode": lambda: gpu_pipeline.section_encode(device, device.type != "cuda", vqvae(device.type != "cuda")),
        "pipeline": lambda: gpu_pipeline.section_pipeline(device, device.type != "cuda", args.pipeline_timeout),
    }
    failed = False
    t_all = time.perf_counter()
    for name in SECTIONS:
        if name not in only:
            continue
        t0 = time.perf_counter()
        try:
            result[name] = sections[name]()
        except Exception as e:
            failed = True
            result[name] = {"error": f"{type(e).__name__}: {e}"[:2000]}
            log(f"{name}: FAILED {result[name]['error'][:300]}")
            traceback.print_exc(file=sys.stderr)
        if isinstance(result[name], dict) and "skipped" in result[name]:
            log(f"{name}: {json.dumps(result[name])}")
        result[name]["section_s"] = time.perf_counter() - t0
        free(device)
    result["total_s"] = time.perf_counter() - t_all
    print(json.dumps(result))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
