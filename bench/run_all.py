"""Run every benchmark in bench/ and write bench/RESULTS.md: each figure with the machine it ran on, plus plots.

Each benchmark runs as its own subprocess (``python bench/<name>.py [--quick]``) and ends its output with one JSON
line, ``{"bench": name, <figure>: value, ...}``; a benchmark that cannot run here prints
``{"bench": name, "skipped": "<why>"}``. A benchmark script that does not exist is skipped too.

Curves: a JSON key ``"curves": {series: [{x: ..., y1: ..., y2: ...}, ...]}`` (the first key of a point is the x axis)
becomes one PNG per y quantity under ``bench/plots/``, a line per series, drawn with matplotlib when it is installed
(it is not a dependency of this project; without it the plots are skipped). ``"images": ["plots/<name>.png", ...]``
lists pictures a benchmark wrote under ``bench/plots/`` itself (a sample grid); they are shown with the plots.

Results accumulate in ``bench/results.json``: a run with ``--only`` replaces the entries of the benchmarks it ran and
keeps the others, so RESULTS.md always shows the latest figure of every benchmark with the machine and date of that
run.

``--quick`` runs every bench's ``--quick``: about 8 minutes on an idle 2-core CPU (much longer on a busy one). Quick
figures show that everything works and roughly how fast; the full runs are the ones to quote.

Usage: python bench/run_all.py [--quick] [--only codebook,encode] [--timeout SECONDS]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
BENCHES = (
    "codebook",
    "encode",
    "train",
    "sample",
    "sample_cuda",
    "gpu",
    "serve",
    "faults",
    "scale",
    "quality_fashion_mnist",
    "quality_fashion_mnist_60",
    "quality_fashion_mnist_decoder",
    "quality_fashion_mnist_codes",
    "quality_fashion_mnist_sampling",
    "levels",
    "prior_threads",
)
# Benchmarks that run another one's script with extra arguments (--quick runs skip those marked full-only).
VARIANTS = {
    "sample_cuda": ("sample", ["--device", "cuda"]),
    "quality_fashion_mnist_60": ("quality_fashion_mnist", ["--long"]),
    "quality_fashion_mnist_decoder": ("quality_fashion_mnist", ["--decoder"]),
    "quality_fashion_mnist_codes": ("quality_fashion_mnist", ["--codes"]),
    "quality_fashion_mnist_sampling": ("quality_fashion_mnist", ["--sampling"]),
}
# quick runs would repeat the recipe's
FULL_ONLY = {"quality_fashion_mnist_60", "quality_fashion_mnist_decoder", "quality_fashion_mnist_codes",
             "quality_fashion_mnist_sampling"}  # fmt: skip
# seconds, full runs: about an hour of training (--codes: three VQ-VAE-2 trainings, about two and a half hours)
TIMEOUTS = {"quality_fashion_mnist_60": 5400.0, "quality_fashion_mnist_decoder": 5400.0,
            "quality_fashion_mnist_codes": 10800.0, "quality_fashion_mnist_sampling": 5400.0}  # fmt: skip
WHAT = {
    "codebook": "fraction of the 512 codes per level in use, with and without dead-code restart (digits)",
    "encode": "encode throughput, Ray Data step vs a plain torch loop (ratio = ray / plain)",
    "train": "training throughput, Ray Train (one worker) vs a plain torch loop (ratio = ray / plain)",
    "sample": "sampler speed, fast sampler vs naive (written by the sampler's author)",
    "sample_cuda": "the sampler benchmark on a CUDA GPU (skipped on a machine without one; a GPU figure is kept)",
    "gpu": "one GPU: CUDA-graph vs eager sampler, train_vqvae step (bf16, channels_last, fused AdamW), encode step "
    "vs plain loop, the ffhq256 recipe shrunk through the pipeline (skipped without a GPU; a GPU figure is kept)",
    "serve": "the Ray Serve app, 1 and 16 concurrent clients: batched vs unbatched (batched_speedup_16: images/s)",
    "faults": "fault scenarios run through the pipeline: injected, survived, rows lost (pipeline.verify)",
    "scale": "shard -> encode -> verify at 20k and 200k images: rows/s and driver peak RSS (ratios = 200k / 20k)",
    "quality_fashion_mnist": "the Fashion-MNIST 32x32 quality recipe: recon, codes, bits, fd/kid against the floor",
    "quality_fashion_mnist_60": "the same recipe given about an hour (--long): the quality-against-minutes curve",
    "quality_fashion_mnist_decoder": "the same codes and priors decoded by the MSE decoder, by tune_decoder's "
    "adversarially tuned one and by an MSE-only tune of as many updates (--decoder)",
    "quality_fashion_mnist_codes": "codes easier to model: a 128-code top level, and FSQ (64 top, 512 bottom codes), "
    "each a new VQ-VAE-2 with its priors; bits per code, reconstructions and samples in both feature spaces (--codes)",
    "quality_fashion_mnist_sampling": "temperature, top-p and classifier-free guidance on the 800-step base, each "
    "variant scored on 2000 samples in both feature spaces (--sampling)",
    "levels": "two levels vs three, Fashion-MNIST 64x64 (same data and steps); completions scored against real images",
    "prior_threads": "train_prior's wall time on a CPU: levels side by side (1 thread each), with share_threads, and "
    "one after the other with every thread (ratio = variant / side by side)",
}


# ------------------------------------------------------------------------------------------------ machine
def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "python": platform.python_version(),
        "gpu": "none",
    }
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = f"{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"
    except ImportError:
        info["torch"] = "not installed"
    try:
        import ray

        info["ray"] = ray.__version__
    except ImportError:
        info["ray"] = "not installed"
    return info


# ------------------------------------------------------------------------------------------------ running
def last_json(output: str) -> dict[str, Any] | None:
    """The last line of ``output`` that is a JSON object with a "bench" key."""
    for line in reversed(output.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(obj, dict) and "bench" in obj:
                return obj
    return None


def run_one(name: str, quick: bool, timeout: float) -> dict[str, Any]:
    """Run bench/<name>.py in a subprocess, echoing its output, and return its entry for results.json."""
    base, extra = VARIANTS.get(name, (name, []))
    script = BENCH / f"{base}.py"
    entry: dict[str, Any] = {"bench": name, "mode": "quick" if quick else "full", "date": _now()}
    if not script.exists():
        return {**entry, "status": "skipped", "note": f"bench/{base}.py does not exist (yet)"}
    cmd = [sys.executable, str(script), *(["--quick"] if quick else []), *extra]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(":")}
    print(f"\n=== {name}: {' '.join(cmd[1:])}", flush=True)
    start = time.perf_counter()
    lines: list[str] = []
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    watchdog = threading.Timer(timeout, proc.kill)  # also fires when a hung bench prints nothing
    watchdog.start()
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            print(f"[{name}] {line}", end="", flush=True)
        proc.wait()
    finally:
        watchdog.cancel()
    if time.perf_counter() - start >= timeout and proc.returncode != 0:
        return {**entry, "status": "timeout", "seconds": round(time.perf_counter() - start, 1)}
    entry["seconds"] = round(time.perf_counter() - start, 1)
    result = last_json("".join(lines))
    if proc.returncode != 0 or result is None:
        tail = "".join(lines[-5:]).strip().replace("\n", " | ")[-300:]
        return {**entry, "status": "failed", "note": f"exit {proc.returncode}: {tail}"}
    if "skipped" in result:
        return {**entry, "status": "skipped", "note": str(result["skipped"])}
    return {**entry, "status": "ok", "result": result}


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


# ------------------------------------------------------------------------------------------------ report
def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return " / ".join(_fmt(v) for v in value)
    return str(value)


def figures(result: dict[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    """(figure, value) rows of a bench's JSON: everything but its name, curves and images, nested keys dotted."""
    rows = []
    for key, value in result.items():
        if key in ("bench", "curves", "images") and not prefix:
            continue
        if isinstance(value, dict):
            rows += figures(value, f"{prefix}{key}.")
        elif isinstance(value, (list, tuple)) and any(isinstance(v, (dict, list)) for v in value):
            continue  # a series: plotted if it is a curve, never squeezed into a table cell
        else:
            rows.append((prefix + key, _fmt(value)))
    return rows


def plot_curves(name: str, curves: dict[str, list[dict[str, Any]]], folder: Path) -> list[Path]:
    """One PNG per y quantity of a bench's curves (a line per series); [] without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    quantities: dict[str, list[str]] = {}  # y key -> series that have it
    xkeys: dict[str, str] = {}
    for series, points in curves.items():
        if not points or not isinstance(points[0], dict):
            continue
        xkeys[series] = next(iter(points[0]))
        for key, value in points[0].items():
            if key != xkeys[series] and isinstance(value, (int, float)):
                quantities.setdefault(key, []).append(series)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for y, series_list in quantities.items():
        fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
        for series in series_list:
            pts = [p for p in curves[series] if y in p]
            ax.plot([p[xkeys[series]] for p in pts], [p[y] for p in pts], marker="o", ms=3, label=series)
        values = [p[y] for s in series_list for p in curves[s] if y in p]
        if min(values) > 0 and max(values) / min(values) > 50:  # losses falling over decades
            ax.set_yscale("log")
        ax.set_xlabel(xkeys[series_list[0]])
        ax.set_ylabel(y)
        ax.set_title(f"{name}: {y}")
        ax.grid(alpha=0.3)
        if len(series_list) > 1:
            ax.legend()
        fig.tight_layout()
        path = folder / f"{name}_{y}.png"
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths


def write_report(entries: dict[str, dict[str, Any]], out: Path) -> None:
    plots_dir = out.parent / "plots"
    lines = [
        "# Benchmark results",
        "",
        "Written by `python bench/run_all.py` (each row: the latest run of that benchmark). Figures are measured on",
        "the machine named in the row; ratios compare two code paths measured in the same process on that machine.",
        "",
        "## Machines",
        "",
        "| bench | mode | date | CPU | cores | torch | ray | GPU |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, e in entries.items():
        m = e.get("machine", {})
        lines.append(
            f"| {name} | {e.get('mode', '')} | {e.get('date', '')} | {m.get('cpu', '')} | {m.get('cores', '')} | "
            f"{m.get('torch', '')} | {m.get('ray', '')} | {m.get('gpu', '')} |"
        )
    gpus = {e.get("machine", {}).get("gpu", "none") for e in entries.values()}
    if gpus <= {"none"}:
        lines += [
            "",
            "**GPU figures: none.** No GPU machine was available for these runs, so every figure below is a CPU",
            "figure. Run `python bench/run_all.py` on a CUDA machine to add GPU rows.",
        ]
    else:
        lines += [
            "",
            "Rows whose GPU column names a GPU were measured on it; every other row is a CPU figure. Only rows of",
            "the same machine compare.",
        ]
    lines += [
        "",
        "## Figures",
        "",
        "| bench | figure | value | machine | cores | torch | date |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, e in entries.items():
        if e.get("status") != "ok":
            continue
        m = e.get("machine", {})
        for fig, value in figures(e["result"]):
            lines.append(
                f"| {name} | {fig} | {value} | {m.get('cpu', '')} | {m.get('cores', '')} | {m.get('torch', '')} | "
                f"{e.get('date', '')} |"
            )
    lines += [
        "",
        "## Runs",
        "",
        "| bench | status | mode | seconds | what it measures / note |",
        "|---|---|---|---|---|",
    ]
    for name, e in entries.items():
        note = e.get("note") or WHAT.get(name, "")
        lines.append(f"| {name} | {e.get('status')} | {e.get('mode', '')} | {e.get('seconds', '')} | {note} |")
    plots = sorted(plots_dir.glob("*.png")) if plots_dir.exists() else []
    current = {p.name for e in entries.values() for p in map(Path, e.get("plots", []))}
    plots = [p for p in plots if p.name in current]
    if plots:
        lines += ["", "## Plots", ""]
        lines += [f"![{p.stem}](plots/{p.name})" for p in plots]
    elif any(e.get("result", {}).get("curves") for e in entries.values()):
        lines += ["", "Plots skipped: matplotlib is not installed (it is not a dependency of this project)."]
    out.write_text("\n".join(lines) + "\n")


# ------------------------------------------------------------------------------------------------ main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="CI-sized runs (each bench's --quick)")
    parser.add_argument("--only", default="", help="comma-separated subset of: " + ", ".join(BENCHES))
    parser.add_argument("--timeout", type=float, default=None, help="seconds per bench (default 3600, quick 900)")
    parser.add_argument("--out", default=str(BENCH / "RESULTS.md"))
    args = parser.parse_args()
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(BENCHES)
    unknown = sorted(set(names) - set(BENCHES))
    if unknown:
        parser.error(f"unknown bench(es) {unknown}; choose from {list(BENCHES)}")
    timeout = args.timeout or (900.0 if args.quick else 3600.0)
    if args.quick:
        names = [n for n in names if n not in FULL_ONLY]

    out = Path(args.out)
    store = out.parent / "results.json"
    entries: dict[str, dict[str, Any]] = json.loads(store.read_text()) if store.exists() else {}
    info = machine()
    print(f"machine: {info}", flush=True)
    start = time.perf_counter()
    for name in names:
        entry = run_one(name, args.quick, timeout if args.timeout or args.quick else TIMEOUTS.get(name, timeout))
        entry["machine"] = info
        if entry["status"] == "skipped" and entries.get(name, {}).get("status") == "ok":
            print(f"=== {name}: skipped here ({entry.get('note')}); keeping the figure of {entries[name]['date']}")
            continue
        if entry.get("status") == "ok" and entry["result"].get("curves"):
            paths = plot_curves(name, entry["result"]["curves"], out.parent / "plots")
            entry["plots"] = [str(p.relative_to(out.parent)) for p in paths]
        if entry.get("status") == "ok":  # images a bench wrote itself (e.g. a sample grid), shown with the plots
            entry["plots"] = entry.get("plots", []) + list(entry["result"].get("images", []))
        entries[name] = entry
        print(f"=== {name}: {entry['status']} in {entry.get('seconds', 0)} s {entry.get('note', '')}", flush=True)
        store.write_text(json.dumps(entries, indent=1) + "\n")  # after every bench: a crash keeps what is done
        write_report({n: entries[n] for n in BENCHES if n in entries}, out)
    print(f"\nall done in {time.perf_counter() - start:.0f} s; wrote {out} and {store}", flush=True)


if __name__ == "__main__":
    main()
