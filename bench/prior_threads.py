"""train_prior's wall time on a CPU, three ways to use the cores: the levels side by side with one thread each (the
baseline), the same with ``train_prior.share_threads`` (the level that finishes first hands its threads to the other),
and one level after the other with every thread.

The code dataset: Fashion-MNIST 32x32 through the fashion_mnist32 recipe's VQ-VAE-2 shape, trained only
``--vqvae-steps`` (40: the code maps have the recipe's shapes and sizes, which is all a prior's step time depends on;
the codes themselves are not the recipe's, so the validation bits printed are only for comparing the variants with
each other). Each variant then trains the recipe's priors for ``--steps`` on those codes, in a new pipeline process
(``steps=[train_prior]``; each variant is its own cached output, so a rerun with ``--workdir`` reuses finished ones
only when ``--fresh`` is not given).

    python bench/prior_threads.py                  # about 20 minutes on a 2-core CPU
    python bench/prior_threads.py --quick          # 100 prior steps: checks the bench, times little
    python bench/prior_threads.py --repeat 2       # each variant twice, round-robin (the mean is printed)
    python bench/prior_threads.py --steps 2400     # the recipe's length
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
sys.path.insert(0, str(ROOT))
from quality_fashion_mnist import DATA, SUMMARY, have_data  # noqa: E402  (bench/ is the script's folder)

from steps.artifacts.priors import Priors  # noqa: E402

VARIANTS = {
    "side by side, 1 thread each": ["train_prior.share_threads=false"],
    "side by side, share_threads": ["train_prior.share_threads=true"],
    "one after the other, 2 threads": ["train_prior.parallel=false", "train_prior.train.cpus_per_worker=2"],
}


def pipeline(work: Path, args: list[str]) -> dict[str, dict[str, str | float]]:
    """One ``python -m pipeline`` in ``work``; its closing summary {step: {status, seconds, out}}."""
    cmd = [
        sys.executable, "-m", "pipeline", "experiment=fashion_mnist32", f"artifacts.root={work / 'artifacts'}",
        f"mlflow.tracking_uri=sqlite:///{work / 'mlflow.db'}", "mlflow.register_models=false", *args,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(":")}
    print(f"running: {' '.join(cmd[3:])}", flush=True)
    proc = subprocess.run(cmd, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    (work / "logs").mkdir(exist_ok=True)
    (work / "logs" / f"{time.strftime('%H%M%S')}.log").write_text(proc.stdout)
    if proc.returncode != 0:
        print(proc.stdout[-4000:])
        raise SystemExit(f"the pipeline failed (exit {proc.returncode})")
    rows = (SUMMARY.match(line.strip()) for line in proc.stdout.splitlines())
    return {r["step"]: {"status": r["status"], "seconds": float(r["seconds"]), "out": r["out"]} for r in rows if r}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=800, help="prior training steps per level (recipe: 2400)")
    parser.add_argument("--vqvae-steps", type=int, default=40, help="VQ-VAE-2 steps that make the code dataset")
    parser.add_argument("--workdir", help="keep the artifacts here (default: a temporary directory)")
    parser.add_argument("--fresh", action="store_true", help="retrain every variant even if --workdir holds it")
    parser.add_argument("--repeat", type=int, default=1, help="train each variant this many times (--fresh)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 100 prior steps (about 5 minutes)")
    args = parser.parse_args()
    if args.quick:
        args.steps = 100
    if not have_data():
        print(json.dumps({"bench": "prior_threads", "skipped": f"no Fashion-MNIST idx files under {DATA}"}))
        return
    tmp = None if args.workdir else tempfile.TemporaryDirectory(prefix="bench-prior-threads-")
    work = Path(args.workdir or tmp.name).absolute()
    work.mkdir(parents=True, exist_ok=True)
    codes = [f"train_vqvae.train.steps={args.vqvae_steps}", f"train_vqvae.train.checkpoint_every={args.vqvae_steps}"]
    pipeline(work, [*codes, "steps=[shard,train_vqvae,encode]"])
    prior = [f"train_prior.train.steps={args.steps}", f"train_prior.train.checkpoint_every={max(args.steps // 2, 1)}"]
    rows: dict[str, dict] = {}
    for attempt in range(args.repeat):  # round-robin, so a slower spell of the machine hits every variant alike
        for name, overrides in VARIANTS.items():
            extra = ["force=[train_prior]"] if args.fresh or attempt else []
            step = pipeline(work, [*codes, *prior, *overrides, "steps=[train_prior]", *extra])["train_prior"]
            summary = Priors.open(str(step["out"])).summary
            bits = {lv: m.get("val_nll_bits", float("nan")) for lv, m in summary["metrics"].items()}
            row = rows.setdefault(name, {"runs": [], **{f"bits_{k}": v for k, v in bits.items()}})
            if step["status"] == "run":  # a cached output (an earlier bench on this --workdir) times nothing
                row["runs"].append(step["seconds"])
            row["seconds"] = sum(row["runs"]) / len(row["runs"]) if row["runs"] else float("nan")
            print(f"{name}: {step['seconds']:.1f} s ({step['status']})", flush=True)

    base = rows[next(iter(VARIANTS))]["seconds"]
    for row in rows.values():
        row["ratio"] = round(row["seconds"] / base, 3)
    print(f"\ntrain_prior, {args.steps} steps per level, {os.cpu_count()} CPUs; seconds: the mean of {args.repeat} "
          "run(s), ratio: to the first row's")  # fmt: skip
    print(f"{'variant':<32} {'seconds':>8} {'ratio':>6} {'bits top':>8} {'bottom':>7}  runs")
    for name, row in rows.items():
        top, bottom = row.get("bits_top", float("nan")), row.get("bits_bottom", float("nan"))
        runs = " ".join(f"{r:.1f}" for r in row["runs"]) or "cached: time it with --fresh"
        print(f"{name:<32} {row['seconds']:>8.1f} {row['ratio']:>6.2f} {top:>8.3f} {bottom:>7.3f}  {runs}")
    print(json.dumps({"bench": "prior_threads", "steps": args.steps, "cpus": os.cpu_count(), "variants": rows}))


if __name__ == "__main__":
    main()
