"""Quality recipe: the whole pipeline on Fashion-MNIST 32x32, ending in the evaluate step's numbers.

Runs ``python -m pipeline experiment=fashion_mnist32`` (Debian's ``dataset-fashion-mnist`` idx files under
/usr/share/datasets/fashion-mnist; ``apt-get install dataset-fashion-mnist``) with step counts that fit about 30
minutes on a 2-core CPU, then reads the evaluate step's metrics.json and the training curves from MLflow. Prints the
reconstruction error, codebook usage, prior bits per code, and fd/kid/precision/recall of the samples next to the
real-vs-real floor (two halves of the val images), then a final JSON line:

    {"bench": "quality_fashion_mnist", "recon_mse": ..., "fd_effnet": ..., "fd_effnet_real": ..., "curves": {...}}

or ``{"bench": "quality_fashion_mnist", "skipped": "..."}`` when the data is not installed. ``--quick`` is a
smoke run (4k images, 150 steps, 100 samples, about 4 minutes) that checks the recipe end to end; its numbers are
not the recipe's. The fd/kid values compare only with runs scored with the same counts (see steps/evaluate.py).

Usage: python bench/quality_fashion_mnist.py [--quick] [--workdir DIR] [-- extra hydra overrides]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = "/usr/share/datasets/fashion-mnist"
IDX = ("train-images-idx3-ubyte", "t10k-images-idx3-ubyte")

# About 30 minutes on a 2-core CPU: the experiment's recipe at 64 channels (the experiment's 128-channel VQ-VAE-2 alone
# would take longer than that), 500 samples scored against 500 + 500 held-out images.
FULL = [
    "model.channels=64",
    "prior.top.channels=64",
    "prior.bottom.channels=64",
    "train_vqvae.train.steps=1500",
    "train_vqvae.train.batch_size=64",
    "train_prior.train.steps=1200",
    "train_prior.train.batch_size=64",
    "train_prior.train.checkpoint_every=600",
    "sample.num_samples=500",
    "sample.shard_size=50",
    "evaluate.max_val_images=1000",
    "evaluate.max_samples=500",
    "evaluate.kid_subset_size=250",
]
QUICK = [  # an end-to-end smoke run of the recipe (about 4 minutes); its numbers are not the recipe's
    "data.limit=4000",
    "model.channels=64",
    "prior.top.channels=64",
    "prior.bottom.channels=64",
    "train_vqvae.train.steps=150",
    "train_vqvae.train.batch_size=64",
    "train_vqvae.train.checkpoint_every=150",
    "train_vqvae.train.log_every=15",
    "train_prior.train.steps=150",
    "train_prior.train.batch_size=64",
    "train_prior.train.checkpoint_every=150",
    "train_prior.train.log_every=15",
    "sample.num_samples=100",
    "sample.shard_size=50",
    "evaluate.max_val_images=200",
    "evaluate.max_samples=100",
    "evaluate.kid_subset_size=50",
    "evaluate.num_kid_subsets=50",
]
CURVES = {  # series -> (MLflow step name, {our name: MLflow metric})
    "train_vqvae": ("train_vqvae", {"recon_mse": "train/recon_mse"}),
    "codebook_top": ("train_vqvae", {"usage": "train/usage_top"}),
    "codebook_bottom": ("train_vqvae", {"usage": "train/usage_bottom"}),
    "prior_top": ("train_prior", {"nll_bits": "top/train/nll_bits"}),
    "prior_bottom": ("train_prior", {"nll_bits": "bottom/train/nll_bits"}),
}


def have_data() -> bool:
    return any(os.path.exists(os.path.join(DATA, f)) or os.path.exists(os.path.join(DATA, f + ".gz")) for f in IDX)


def curves(db: Path) -> dict[str, list[dict[str, float]]]:
    """Training curves of the latest pipeline run, from the runs that produced the (possibly cached) steps."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    exp = client.get_experiment_by_name("vqvae2")
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"], max_results=200)
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    children = {
        r.data.tags.get("mlflow.runName"): r.data.tags.get("produced_by") or r.info.run_id
        for r in runs
        if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
    }
    out: dict[str, list[dict[str, float]]] = {}
    for series, (step, metrics) in CURVES.items():
        if step not in children:
            continue
        points: dict[int, dict[str, float]] = {}
        for ours, theirs in metrics.items():
            for m in client.get_metric_history(children[step], theirs):
                points.setdefault(m.step, {"step": m.step})[ours] = round(m.value, 5)
        if points:
            out[series] = [points[s] for s in sorted(points)]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="an end-to-end smoke run (about 4 minutes)")
    parser.add_argument("--workdir", default=None, help="keep artifacts and MLflow here (a rerun reuses the cache)")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides, after --")
    args = parser.parse_args()
    if not have_data():
        msg = f"no Fashion-MNIST idx files under {DATA} (apt-get install dataset-fashion-mnist)"
        print(f"skipped: {msg}")
        print(json.dumps({"bench": "quality_fashion_mnist", "skipped": msg}))
        return

    tmp = None if args.workdir else tempfile.TemporaryDirectory(prefix="bench-quality-")
    work = Path(args.workdir or tmp.name).absolute()
    work.mkdir(parents=True, exist_ok=True)
    recipe = QUICK if args.quick else FULL
    cmd = [
        sys.executable,
        "-m",
        "pipeline",
        "experiment=fashion_mnist32",
        f"artifacts.root={work / 'artifacts'}",
        f"mlflow.tracking_uri=sqlite:///{work / 'mlflow.db'}",
        "mlflow.register_models=false",
        *recipe,
        *args.overrides,
    ]
    print(f"running: {' '.join(cmd[1:])}", flush=True)
    start = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(":")}
    proc = subprocess.run(cmd, cwd=work, env=env)
    minutes = (time.perf_counter() - start) / 60
    if proc.returncode != 0:
        raise SystemExit(f"the pipeline failed (exit {proc.returncode})")

    done = sorted((work / "artifacts" / "evaluate").glob("*/_SUCCESS"), key=lambda p: p.stat().st_mtime)
    report = json.loads((done[-1].parent / "metrics.json").read_text())
    m, counts = report["metrics"], report["counts"]

    def g(key: str) -> float:
        return m.get(key, float("nan"))

    print(f"\nFashion-MNIST 32x32{' (quick)' if args.quick else ''}: {minutes:.1f} min wall")
    print(f"reconstruction (val): MSE {g('recon_mse'):.5f}, PSNR {g('psnr'):.2f} dB, SSIM {g('ssim'):.3f}")
    for lv in ("top", "bottom"):
        print(
            f"codes {lv:>6}: usage {g(f'usage_{lv}'):.1%}, perplexity {g(f'perplexity_{lv}'):.1f}, "
            f"prior {g(f'nll_bits_{lv}'):.3f} bits per code"
        )
    print(f"prior: {g('bits_per_dim'):.4f} bits per dim (both levels, per image value)")
    print(
        f"samples vs real ({counts['samples']} vs {counts['real_a']} images): fd_effnet {g('fd_effnet'):.2f} "
        f"(floor {g('fd_effnet_real'):.2f}, reconstructions {g('fd_effnet_recon'):.2f}), "
        f"kid_effnet {g('kid_effnet'):.4f} +- {g('kid_effnet_std'):.4f} (floor {g('kid_effnet_real'):.4f})"
    )
    print(
        f"precision / recall (k={report['config']['knn_k']}): {g('precision'):.3f} / {g('recall'):.3f} "
        f"(floor {g('precision_real'):.3f} / {g('recall_real'):.3f})"
    )
    result = {
        "bench": "quality_fashion_mnist",
        "mode": "quick" if args.quick else "full",
        "minutes": round(minutes, 1),
        **{k: round(v, 5) for k, v in sorted(m.items())},
        "samples_scored": counts["samples"],
        "real_images": counts["real_images"],
        "curves": curves(work / "mlflow.db"),
    }
    print(json.dumps(result))
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
