"""Decoder ablation: how close to the real images a VQ-VAE's reconstructions get, with its own decoder, after more
MSE-only training of the decoder, and after the adversarial fine-tune of tune_decoder (steps/nn/adversarial.py), the
codes frozen in both. In-process, no Ray: the same model and losses as the tune_decoder step, at equal updates.

Needs a train_vqvae output and the shard output it was trained on (e.g. from ``bench/quality_fashion_mnist.py
--workdir DIR``: ``--workdir DIR`` finds both there). Scores the reconstructions of ``--images`` val images against as
many other val images in the evaluate step's feature space (EfficientNet-Lite0, :mod:`steps.evaluation.quality`), next
to the real-vs-real floor of the same counts. A final JSON line:

    {"bench": "decoder", "floor": {...}, "variants": {"base": {...}, "mse_only": {...}, "gan": {...}}}

Usage: python bench/decoder.py --workdir DIR [--steps 600] [--images 500] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from steps.artifacts.autoencoder import Autoencoder
from steps.artifacts.images import ImageShards
from steps.evaluation.quality import distances, features, reconstruction
from steps.io.pixels import to_float
from steps.nn import registry
from steps.tune_decoder import TuneDecoderConfig


def newest(root: Path, step: str) -> str:
    done = sorted((p.parent for p in (root / step).glob("*/_SUCCESS")), key=lambda p: (p / "_SUCCESS").stat().st_mtime)
    if not done:
        raise SystemExit(f"no finished {step} output under {root}")
    return str(done[-1])


def tune(base: Autoencoder, train: np.ndarray, cfg: TuneDecoderConfig, seed: int = 0) -> torch.nn.Module:
    """The tune_decoder model trained in-process for ``cfg.train.steps`` updates; returns its autoencoder."""
    torch.manual_seed(seed)
    model = registry.build(cfg.model(base.config))
    model.autoencoder.load_state_dict(base.checkpoint.state_dict())
    tc = cfg.train
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, tc.lr_factor)
    rng = np.random.default_rng(seed)
    model.train()
    for step in range(tc.steps):
        x = to_float(train[rng.integers(0, len(train), tc.batch_size)])
        out = model(x)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        sched.step()
        if (step + 1) % 100 == 0:
            print(f"  step {step + 1}: " + ", ".join(f"{k} {float(v):.4f}" for k, v in out.stats.items()), flush=True)
    return model.autoencoder.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True, help="a quality_fashion_mnist.py --workdir (its artifacts/)")
    parser.add_argument("--steps", type=int, default=600, help="decoder updates per variant")
    parser.add_argument("--images", type=int, default=500, help="val images reconstructed, and as many as reference")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    root = Path(args.workdir) / "artifacts"
    base = Autoencoder.open(newest(root, "train_vqvae"))
    shards = ImageShards.open(newest(root, "shard"))
    val = shards.read_images("val", 2 * args.images)
    real_a, real_b = val[: args.images], val[args.images :]
    train = shards.read_images("train", 20000)
    print(f"autoencoder {base.model_uri}; {len(train)} train images, {len(real_a)} + {len(real_b)} val", flush=True)

    from steps.nn.features import FeatureExtractor

    extractor, cpu = FeatureExtractor(), torch.device("cpu")
    feats_a = features(extractor, real_a, 100, cpu)
    scored = {"floor": distances(features(extractor, real_b, 100, cpu), feats_a, 50, 100, 3, 0)}
    defaults = TuneDecoderConfig()
    train_cfg = replace(defaults.train, steps=args.steps, batch_size=64)
    variants = {
        "base": None,
        "mse_only": replace(defaults, train=train_cfg, gan_weight=0.0),
        "gan": replace(defaults, train=train_cfg),
    }
    for name, cfg in variants.items():
        start = time.perf_counter()
        print(f"{name}: {'tuning' if cfg else 'as trained'}", flush=True)
        model = base.load() if cfg is None else tune(base, train, cfg)
        minutes = (time.perf_counter() - start) / 60
        rec, recons = reconstruction(model, real_b, 100, cpu)
        got = distances(features(extractor, recons, 100, cpu), feats_a, 50, 100, 3, 0)
        scored[name] = {**rec, **got, "minutes": minutes}

    floor = scored["floor"]["fd_effnet"]
    print(f"\nreconstructions of {len(real_b)} val images vs {len(real_a)} others; floor fd_effnet {floor:.2f}, "
          f"precision {scored['floor']['precision']:.3f}, recall {scored['floor']['recall']:.3f}, "
          f"coverage {scored['floor']['coverage']:.3f}; {args.steps} decoder updates per variant")  # fmt: skip
    print(f"{'decoder':<10} {'mse':>8} {'psnr':>6} {'fd':>7} {'x floor':>7} {'prec':>6} {'recall':>6} {'cover':>6} "
          f"{'min':>5}")  # fmt: skip
    for name in variants:
        m = scored[name]
        print(f"{name:<10} {m['recon_mse']:>8.5f} {m['psnr']:>6.2f} {m['fd_effnet']:>7.2f} "
              f"{m['fd_effnet'] / floor:>7.2f} {m['precision']:>6.3f} {m['recall']:>6.3f} {m['coverage']:>6.3f} "
              f"{m['minutes']:>5.1f}")  # fmt: skip
    rounded = {k: {m: round(float(v), 5) for m, v in d.items()} for k, d in scored.items()}
    print(json.dumps({"bench": "decoder", "steps": args.steps, "images": len(real_b), "floor": rounded.pop("floor"),
                      "variants": rounded}))  # fmt: skip


if __name__ == "__main__":
    main()
