"""Serving throughput and latency: the Ray Serve app (pipeline/serving/ray_serve.py) batched against unbatched, same
replica.

The generator has the default recipe's shapes (conf/experiment/digits32.yaml: a 32x32 VQ-VAE-2, top prior 4x4 with
attention, bottom prior 8x8 on the top codes, 10 classes; random weights: the cost does not depend on them). One
replica on local Ray serves it twice: with ``max_batch_size=16`` (concurrent requests drawn as one sampler batch)
and with ``max_batch_size=1`` (each request alone). For 1 and 16 concurrent HTTP clients, each sending requests for
one image back to back, it reports images/s and the p50 / p95 latency of a request. The last line is JSON:

    {"bench": "serve", "batched": {...}, "unbatched": {...}, "batched_speedup_16": images/s batched / unbatched}

Usage: python bench/serve.py [--quick] [--requests N]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def make_generator(root: str) -> str:
    """The recipe's models with random weights, written as the pipeline writes them; returns the priors folder."""
    import torch

    from steps.artifacts import records
    from steps.artifacts.autoencoder import Autoencoder, AutoencoderWriter
    from steps.artifacts.code_format import CodeMeta
    from steps.artifacts.priors import PriorsWriter
    from steps.io import storage
    from steps.nn import registry
    from steps.nn.checkpoint import checkpoint_dict
    from steps.nn.quantize import EMAQuantizerConfig
    from steps.nn.vqvae import VQVAE2Config
    from steps.train_prior import TrainPriorConfig, prior_config

    torch.manual_seed(0)
    vq = os.path.join(root, "train_vqvae")
    model_cfg = VQVAE2Config(image_size=32, in_channels=1, channels=64, quantizer=EMAQuantizerConfig())
    AutoencoderWriter(vq).write(checkpoint_dict(registry.build(model_cfg)), None, {})
    autoencoder = Autoencoder.open(vq)
    meta = CodeMeta.of(autoencoder, num_classes=10)
    recipe = {"channels": 64, "layers": 6, "kernel_size": 3, "dropout": 0.1}
    cfg = TrainPriorConfig(class_conditional=True, prior={"top": {**recipe, "attn_heads": 4},
                                                          "bottom": {**recipe, "cond_channels": 32}})  # fmt: skip
    priors, encode = os.path.join(root, "train_prior"), os.path.join(root, "encode")
    writer = PriorsWriter(priors)
    for level in meta.levels:
        prior = registry.build(prior_config(cfg, meta, level)).eval()
        torch.nn.init.normal_(prior.head[-1].weight, std=0.05)  # random but not uniform predictions
        writer.write_level(level, checkpoint_dict(prior), vqvae=autoencoder.digest)
    writer.finish(list(meta.levels), autoencoder.digest, {})
    storage.write_json(os.path.join(encode, records.SUCCESS), {"inputs": {"train_vqvae": vq}})
    storage.write_json(os.path.join(priors, records.SUCCESS), {"inputs": {"encode": encode}})
    return priors


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as response:
        return json.loads(response.read())


def load(url: str, clients: int, per_client: int) -> dict[str, float]:
    """``clients`` threads, each sending ``per_client`` one-image requests back to back."""
    latencies: list[float] = []
    lock = threading.Lock()

    def client(c: int) -> None:
        for k in range(per_client):
            t0 = time.perf_counter()
            post(url, {"label": k % 10, "seed": 1000 * c + k})
            with lock:
                latencies.append(time.perf_counter() - t0)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ms = np.asarray(latencies) * 1000
    return {"images_per_s": len(latencies) / wall, "p50_ms": float(np.percentile(ms, 50)),
            "p95_ms": float(np.percentile(ms, 95)), "requests": len(latencies)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests")
    parser.add_argument("--requests", type=int, default=None, help="requests per client at 16 clients")
    args = parser.parse_args()
    per_client = args.requests or (3 if args.quick else 6)

    import ray
    from ray import serve

    from pipeline.serving.ray_serve import server

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result: dict = {"bench": "serve", "cores": os.cpu_count(), "requests_per_client_16": per_client}
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        model = make_generator(tmp)
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        url = f"http://127.0.0.1:{port}/"
        try:
            for mode, batch in (("batched", 16), ("unbatched", 1)):
                serve.run(server(model, batch, 0.02, "cpu"), name=mode, route_prefix="/")
                post(url, {"label": 0, "seed": 0})  # warm-up: the replica has loaded the models
                result[mode] = {"max_batch_size": batch}
                for clients, n in ((1, 4 * per_client), (16, per_client)):
                    row = load(url, clients, n)
                    result[mode][str(clients)] = row
                    print(f"{mode:>9}, {clients:>2} clients: {row['images_per_s']:.2f} images/s, "
                          f"p50 {row['p50_ms']:.0f} ms, p95 {row['p95_ms']:.0f} ms", flush=True)  # fmt: skip
                serve.delete(mode)
        finally:
            serve.shutdown()
            ray.shutdown()
    for clients in ("1", "16"):
        speedup = result["batched"][clients]["images_per_s"] / result["unbatched"][clients]["images_per_s"]
        result[f"batched_speedup_{clients}"] = round(speedup, 2)
    print(f"batched / unbatched images/s at 16 clients: {result['batched_speedup_16']}x (goal >= 3)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
