"""Scale: shard -> encode -> verify on synthetic 32x32 datasets of 20k and 200k images, as a user runs them.

Each size is a Parquet table of generated grayscale images (smooth random shapes, unique ids), run through
``python -m pipeline data=parquet ... 'steps=[shard,train_vqvae,encode]'`` (a tiny VQ-VAE trained for a few steps:
its cost does not depend on the dataset size) and then ``python -m pipeline.verify`` on the artifacts root. Per size
it prints the rows per second of shard, encode and verify (each step's own seconds, from its ``_SUCCESS`` record; the
verify wall time) and the peak resident memory of the driver process (``python -m pipeline``, polled with psutil; the
Ray workers are other processes) and of verify. The last line is JSON:

    {"bench": "scale", "rows_per_s_ratio": rate(200k) / rate(20k), "driver_rss_ratio": rss(200k) / rss(20k), ...}

where rate = rows / (shard + encode + verify seconds). Goals: a rate that holds (ratio >= 0.9) and driver memory that
does not grow with the data (ratio <= 1.3).

Usage: python bench/scale.py [--quick] [--sizes 20000,200000] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("shard", "encode")


def synthetic(path: Path, n: int, seed: int = 0, chunk: int = 10_000) -> None:
    """``n`` 32x32 grayscale PNGs: a random 4x4 pattern upsampled smoothly (small PNGs, unlike noise)."""
    rng = np.random.default_rng(seed)
    writer = None
    for start in range(0, n, chunk):
        rows = min(chunk, n - start)
        low = rng.integers(0, 256, size=(rows, 4, 4), dtype=np.uint8)
        images = []
        for tile in low:
            buf = io.BytesIO()
            Image.fromarray(tile).resize((32, 32), Image.BILINEAR).save(buf, format="PNG")
            images.append(buf.getvalue())
        table = pa.table(
            {
                "id": [f"img-{i:07d}" for i in range(start, start + rows)],
                "label": pa.array(rng.integers(0, 10, rows), pa.int32()),
                "image": pa.array(images, pa.binary()),
            }
        )
        writer = writer or pq.ParquetWriter(path, table.schema)
        writer.write_table(table)
    writer.close()


def run_watched(cmd: list[str], log: Path) -> tuple[float, int]:
    """Run ``cmd``; returns (wall seconds, peak RSS in bytes of that one process)."""
    peak = 0
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        watched = psutil.Process(proc.pid)
        stop = threading.Event()

        def poll() -> None:
            nonlocal peak
            while not stop.is_set():
                try:
                    peak = max(peak, watched.memory_info().rss)
                except psutil.Error:
                    return
                stop.wait(0.1)

        thread = threading.Thread(target=poll, daemon=True)
        thread.start()
        rc = proc.wait()
        stop.set()
        thread.join()
    if rc != 0:
        sys.exit(f"{' '.join(cmd[:4])} ... failed (rc {rc}); see {log}")
    return time.perf_counter() - start, peak


def one_size(n: int, workdir: Path) -> dict:
    data, root = workdir / f"images-{n}.parquet", workdir / f"root-{n}"
    t0 = time.perf_counter()
    synthetic(data, n)
    print(f"[scale] {n} images generated in {time.perf_counter() - t0:.1f} s ({data.stat().st_size / 2**20:.1f} MiB)")
    settings = [
        "debug=tiny",
        "data=parquet",
        f"data.path={data}",
        "data.image_size=32",
        "data.channels=1",
        "data.limit=null",
        "data.rows_per_shard=10000",
        "encode.batch_size=256",
        "steps=[shard,train_vqvae,encode]",
        f"artifacts.root={root}",
        f"mlflow.tracking_uri=sqlite:///{workdir / 'mlflow.db'}",
        "mlflow.register_models=false",
        f"hydra.run.dir={workdir / '_hydra'}",
    ]
    wall, driver_rss = run_watched([sys.executable, "-m", "pipeline", *settings], workdir / f"pipeline-{n}.log")
    seconds = {}
    for step in STEPS:
        (record,) = (json.loads(p.read_text()) for p in (root / step).glob("*/_SUCCESS"))
        seconds[step] = float(record["seconds"])
    verify_s, verify_rss = run_watched(
        [sys.executable, "-m", "pipeline.verify", str(root)], workdir / f"verify-{n}.log"
    )
    seconds["verify"] = verify_s
    result = {
        "images": n,
        **{f"{k}_rows_per_s": round(n / v, 1) for k, v in seconds.items()},
        "rows_per_s": round(n / sum(seconds.values()), 1),
        "driver_peak_rss_mib": round(driver_rss / 2**20, 1),
        "verify_peak_rss_mib": round(verify_rss / 2**20, 1),
        "pipeline_wall_s": round(wall, 1),
    }
    print(f"[scale] {json.dumps(result)}", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2k and 20k images")
    parser.add_argument("--sizes", default=None, help="comma-separated image counts (small first)")
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    sizes = (
        [int(s) for s in args.sizes.split(",")]
        if args.sizes
        else ([2_000, 20_000] if args.quick else [20_000, 200_000])
    )
    with tempfile.TemporaryDirectory(prefix="scale-") as tmp:
        workdir = Path(args.workdir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        results = [one_size(n, workdir) for n in sizes]
    small, large = results[0], results[-1]
    print(
        json.dumps(
            {
                "bench": "scale",
                "cpus": os.cpu_count(),
                "sizes": results,
                "rows_per_s_ratio": round(large["rows_per_s"] / small["rows_per_s"], 3),
                "driver_rss_ratio": round(large["driver_peak_rss_mib"] / small["driver_peak_rss_mib"], 3),
                "verify_rss_ratio": round(large["verify_peak_rss_mib"] / small["verify_peak_rss_mib"], 3),
            }
        )
    )


if __name__ == "__main__":
    main()
