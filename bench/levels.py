"""Two levels against three on the same data, and image completion: Fashion-MNIST at 64x64 on a CPU.

Runs ``python -m pipeline experiment=fashion_mnist64`` twice in one work directory (the shards are shared through the
cache): with the recipe's three levels (``model.factors=[4,2,2]``: top 4x4, middle 8x8, bottom 16x16) and with two
(``model.factors=[4,2]``: top 8x8, bottom 16x16, the same bottom resolution), each with the same training steps. For
each it reads the evaluate step's metrics and prints the prior's bits per image (bits per code times codes, summed over
the levels), the reconstructions (PSNR, fd_effnet against real images), the samples (fd_effnet, precision, recall,
density, coverage, each beside the real-vs-real floor) and the minutes per step.

Then completion (``pipeline.Generator.complete``) on the three-level run: for ``val`` images not seen in training
it keeps the first rows (a quarter and a half of the image) and draws the rest, scoring the completions against other
real images with the same feature network and counts as evaluate, beside the same number of reconstructions and new
samples. A picture of completions (the kept rows, then several completions per image) goes to bench/plots/. A final
JSON line:

    {"bench": "levels", "two": {...}, "three": {...}, "completion": {...}}

or ``{"bench": "levels", "skipped": "..."}`` when the data is not installed (``apt-get install
dataset-fashion-mnist``). ``--quick`` is a smoke run (2000 images, 60 steps) that checks the bench end to end; its
numbers are not the recipe's.

Usage: python bench/levels.py [--quick] [--workdir DIR] [-- overrides]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.quality_fashion_mnist import have_data, run_pipeline

ROOT = Path(__file__).resolve().parents[1]
PLOTS = ROOT / "bench" / "plots"
PICTURE = "completion_fashion_mnist64.png"
MODELS = {"three": ["model.factors=[4,2,2]"], "two": ["model.factors=[4,2]"]}
# The bench's budget: both models on the same 10k images, each about 20 minutes on a 2-core CPU (the 16x16 bottom
# prior, which both have, takes most of it); scored with 300 samples against 300 + 300 real val images.
FULL = [
    "data.limit=10000",
    "train_vqvae.train.steps=600",
    "train_vqvae.train.checkpoint_every=300",
    "train_prior.train.steps=500",
    "train_prior.train.batch_size=32",
    "train_prior.train.checkpoint_every=250",
    "sample.num_samples=300",
    "sample.shard_size=50",
    "evaluate.max_val_images=600",
    "evaluate.max_samples=300",
    "evaluate.kid_subset_size=150",
]
QUICK = [
    "data.limit=2000",
    "train_vqvae.train.steps=60",
    "train_vqvae.train.checkpoint_every=30",
    "train_prior.train.steps=60",
    "train_prior.train.checkpoint_every=30",
    "sample.num_samples=60",
    "sample.shard_size=30",
    "evaluate.max_val_images=120",
    "evaluate.max_samples=60",
    "evaluate.kid_subset_size=30",
    "sample.grid_size=20",
]
KEEP = (0.25, 0.5)  # kept fraction of the image rows


def figures(steps: dict[str, dict[str, Any]], minutes: float) -> dict[str, Any]:
    """What the comparison shows for one run, from its evaluate metrics and code shapes."""
    from steps.artifacts.autoencoder import Autoencoder

    m = json.loads((Path(steps["evaluate"]["out"]) / "metrics.json").read_text())["metrics"]
    shapes = Autoencoder.open(steps["train_vqvae"]["out"]).shapes
    bits = {lv: m[f"nll_bits_{lv}"] * h * w for lv, (h, w) in shapes.items()}
    floor = m["fd_effnet_real"]
    out = {
        "levels": {lv: list(s) for lv, s in shapes.items()},
        "bits_per_image": round(sum(bits.values()), 1),
        "bits_per_level": {lv: round(b, 1) for lv, b in bits.items()},
        "psnr": round(m["psnr"], 2),
        "fd_recon_ratio": round(m["fd_effnet_recon"] / floor, 2),
        "fd_ratio": round(m["fd_effnet"] / floor, 2),
        "fd_effnet": round(m["fd_effnet"], 2),
        "fd_floor": round(floor, 2),
        "minutes": round(minutes, 1),
        "step_seconds": {s: v["seconds"] for s, v in steps.items()},
    }
    for key in ("precision", "recall", "density", "coverage"):
        out[key] = round(m.get(key, float("nan")), 3)
        out[f"{key}_floor"] = round(m.get(f"{key}_real", float("nan")), 3)
    return out


def completion(steps: dict[str, dict[str, Any]], count: int, picture: Path | None) -> dict[str, Any]:
    """Completions of ``count`` val images at each kept fraction, scored against other val images (as evaluate
    scores samples), beside reconstructions and new samples of the same count."""
    from pipeline import Generator
    from steps.artifacts.images import ImageShards
    from steps.evaluation.quality import distances, features
    from steps.io.pixels import grid_png
    from steps.nn.features import FeatureExtractor

    gen = Generator.load(steps["train_prior"]["out"], device="cpu")
    real, classes = ImageShards.open(steps["shard"]["out"]).read_labelled("val")
    perm = np.random.default_rng(0).permutation(len(real))[: 3 * count]
    reference, held, labels = real[perm[count:]], real[perm[:count]], classes[perm[:count]].tolist()
    extractor = FeatureExtractor()
    device = torch.device("cpu")
    ref = features(extractor, reference, 64, device)

    def score(images: np.ndarray) -> dict[str, float]:
        d = distances(features(extractor, images, 64, device), ref, 10, max(count // 2, 2), 3, 0)
        return {k: round(v, 3) for k, v in d.items() if k in ("fd_effnet", "precision", "recall", "coverage")}

    size = gen.image_shape[-1]
    out: dict[str, Any] = {"count": count, "reference": len(reference), "real": score(held)}
    labels = labels if gen.num_classes else None  # each image completed with its own class
    out["reconstructions"] = score(gen.complete(held, keep_rows=size, seed=1, labels=labels).numpy())
    out["samples"] = score(gen.complete(held, keep_rows=0, seed=1, labels=labels).numpy())  # new images, same classes
    for fraction in KEEP:
        rows = int(size * fraction)
        filled = gen.complete(held, keep_rows=rows, seed=1, labels=labels).numpy()
        out[f"keep_{fraction}"] = {"keep_rows": rows, **score(filled)}
    if picture is not None:
        shown, per = 6, 7
        rows = size // 2
        masked = held[:shown].copy()
        masked[:, :, rows:] = 0
        some = labels[:shown] if labels else None
        filled = gen.complete(held[:shown], keep_rows=rows, n=per, seed=2, labels=some).numpy()
        filled = filled.reshape(shown, per, *held.shape[1:])
        tiles = np.concatenate([held[:shown, None], masked[:, None], filled], axis=1)  # (shown, per + 2, C, S, S)
        picture.parent.mkdir(parents=True, exist_ok=True)
        picture.write_bytes(grid_png(tiles.reshape(-1, *held.shape[1:]), nrow=per + 2))
        out["picture"] = str(picture.relative_to(ROOT / "bench"))
    return out


def print_report(results: dict[str, dict[str, Any]], comp: dict[str, Any]) -> None:
    print("\nlevels  | codes                     | bits/image | PSNR  | recon fd | sample fd | prec  | recall | dens. "
          "| cover | minutes")  # fmt: skip
    for name, r in results.items():
        codes = " ".join(f"{lv} {h}x{w}" for lv, (h, w) in r["levels"].items())
        print(
            f"{name:<7} | {codes:<25} | {r['bits_per_image']:>10} | {r['psnr']:>5} | {r['fd_recon_ratio']:>7}x | "
            f"{r['fd_ratio']:>8}x | {r['precision']:>5} | {r['recall']:>6} | {r['density']:>5} | {r['coverage']:>5} | "
            f"{r['minutes']:>7}"
        )
    r = next(iter(results.values()))
    print(
        f"floor (real vs real): fd {r['fd_floor']}, precision {r['precision_floor']}, recall {r['recall_floor']}, "
        f"density {r['density_floor']}, coverage {r['coverage_floor']}"
    )
    print(f"\ncompletion ({comp['count']} val images against {comp['reference']} others):")
    for key in ("real", "reconstructions", *[f"keep_{f}" for f in KEEP], "samples"):
        v = comp[key]
        print(f"  {key:<16} fd {v['fd_effnet']:>8}  precision {v.get('precision')}  recall {v.get('recall')}  "
              f"coverage {v.get('coverage')}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="an end-to-end smoke run (minutes)")
    parser.add_argument("--workdir", default=None, help="keep artifacts and MLflow here (a rerun reuses the cache)")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides, after --")
    args = parser.parse_args()
    if not have_data():
        print(json.dumps({"bench": "levels", "skipped": "Fashion-MNIST not installed (dataset-fashion-mnist)"}))
        return
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-levels-"))
    work.mkdir(parents=True, exist_ok=True)
    base = [sys.executable, "-m", "pipeline", "experiment=fashion_mnist64", f"artifacts.root={work / 'artifacts'}",
            f"mlflow.tracking_uri=sqlite:///{work / 'mlflow.db'}", *(QUICK if args.quick else FULL)]  # fmt: skip
    results, runs = {}, {}
    for name, settings in MODELS.items():
        runs[name], minutes = run_pipeline([*base, *settings, *args.overrides], work)
        results[name] = figures(runs[name], minutes)
    picture = None if args.quick else PLOTS / PICTURE
    comp = completion(runs["three"], 60 if args.quick else 300, picture)
    print_report(results, comp)
    images = {"images": [comp["picture"]]} if "picture" in comp else {}  # shown by bench/run_all.py with the plots
    print(json.dumps({"bench": "levels", "quick": args.quick, **results, "completion": comp, **images}))


if __name__ == "__main__":
    main()
