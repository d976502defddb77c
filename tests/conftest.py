"""Shared fixtures: the composed tiny config, one local Ray for the session, and upstream artifacts made by hand.

Test settings come from the real conf/ composed with ``debug=tiny`` plus overrides (:func:`tiny`), never from a
parallel hand-written config. Upstream outputs a test needs without running their step are written through the same
artifact writers the steps use (:class:`Artifacts`), so a test never spells a file name either.
:func:`read_four_ways` opens a dataset folder with each reader it must open in (pyarrow, pandas, duckdb, Ray Data).
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

CONF = Path(__file__).resolve().parents[1] / "conf"


def compose(*overrides: str):
    """The PipelineConfig of ``debug=tiny`` plus ``overrides`` (as on the command line)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from pipeline.config import load, register

    register()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return load(hydra_compose("config", overrides=["debug=tiny", *overrides]))


def overrides(prefix: str, **values) -> list[str]:
    """Hydra overrides ``prefix.key=value`` (strings quoted, None as null, lists as [a,b])."""

    def show(v):
        if v is None:
            return "null"
        if isinstance(v, str):
            return "'" + v.replace("\\", "\\\\").replace("'", "\\'") + "'"
        if isinstance(v, (list, tuple)):
            return "[" + ",".join(show(x) for x in v) + "]"
        return str(v).lower() if isinstance(v, bool) else str(v)

    return [f"{prefix}.{k}={show(v)}" for k, v in values.items()]


class Tiny:
    """``tiny(*overrides)``: the composed ``debug=tiny`` PipelineConfig; ``tiny.shard(**settings)`` and the like:
    one step's settings with ``settings`` overridden (the step's user key: data.*, sample.*, ...)."""

    overrides = staticmethod(overrides)
    # The one set of overrides that makes the debug=tiny model smaller still, for tests that build or train one:
    # 1-channel images, 32 codes of 8 dimensions per level.
    SMALL = ("data.channels=1", "model.quantizer.codebook_size=32", "model.quantizer.dim=8")

    def __call__(self, *args: str):
        return compose(*args)

    def shard(self, *args: str, **kw):
        return compose(*args, *overrides("data", **kw)).shard

    def sample(self, *args: str, **kw):
        return compose(*args, *overrides("sample", **kw)).sample

    def encode(self, *args: str, **kw):
        return compose(*args, *overrides("encode", **kw)).encode

    def evaluate(self, *args: str, **kw):
        kw.setdefault("feature_cache", "")  # off unless a test asks: the default is under ./outputs
        return compose(*args, *overrides("evaluate", **kw)).evaluate

    def train_vqvae(self, *args: str, **train):
        return compose(*args, *overrides("train_vqvae.train", **train)).train_vqvae

    def train_prior(self, *args: str, **train):
        return compose(*args, *overrides("train_prior.train", **train)).train_prior


@pytest.fixture(scope="session")
def tiny() -> Tiny:
    return Tiny()


class Artifacts:
    """Upstream outputs written by hand, through the artifact writers."""

    @staticmethod
    def shards(out: Path, splits: dict[str, tuple[list[str], list[int | None], list[bytes]]], size: int, channels: int,
               num_classes: int | None = None, rows_per_file: int | None = None) -> str:  # fmt: skip
        """Image shards from ``{split: (ids, labels, pngs)}``; ``rows_per_file`` rows per part (default: one part)."""
        from steps.artifacts.images import SPLITS, ShardWriter

        writer = ShardWriter(str(out), size, channels)
        writer.clear()
        files, rows = {s: [] for s in SPLITS}, dict.fromkeys(SPLITS, 0)
        for split, (ids, labels, pngs) in splits.items():
            step = rows_per_file or max(len(ids), 1)
            for part, start in enumerate(range(0, len(ids), step)):
                end = start + step
                files[split].append(writer.write_part(split, part, ids[start:end], labels[start:end], pngs[start:end]))
            rows[split] = len(ids)
        writer.finish(files, rows, skipped=[], num_classes=num_classes, classes=None)
        return str(out)

    @staticmethod
    def autoencoder(out: Path, model: torch.nn.Module, step: int = 1) -> str:
        """A train_vqvae output holding ``model``."""
        from steps.artifacts.autoencoder import AutoencoderWriter
        from steps.nn.checkpoint import checkpoint_dict

        AutoencoderWriter(str(out)).write(checkpoint_dict(model, step=step), None, {"step": step})
        return str(out)

    @staticmethod
    def priors(out: Path, vqvae: str, seed: int = 0, **configs) -> str:
        """A train_prior output with a randomly initialised prior per level (``top=PixelCNNConfig(...), ...``)."""
        from steps.artifacts.priors import PriorsWriter
        from steps.nn import registry
        from steps.nn.checkpoint import checkpoint_dict

        writer = PriorsWriter(str(out))
        for level, config in configs.items():
            torch.manual_seed(seed + len(level))
            writer.write_level(level, checkpoint_dict(registry.build(config).eval(), step=1), vqvae=vqvae)
        writer.finish(list(configs), vqvae, {})
        return str(out)

    @staticmethod
    def codes(out: Path, meta, splits: dict[str, tuple[list[str], object, dict[str, np.ndarray]]]) -> str:
        """A code dataset from ``{split: (ids, labels, {level: codes (N, H, W)})}``."""
        from steps.artifacts.code_format import codes_to_arrow
        from steps.artifacts.codes import CodeWriter

        writer = CodeWriter(str(out), meta)
        writer.clear()
        rows = {}
        for split, (ids, labels, codes) in splits.items():
            writer.write_part(codes_to_arrow(ids, labels, codes, meta), split, "part-00000")
            rows[split] = len(ids)
        writer.finish(rows)
        return str(out)

    @staticmethod
    def samples(out: Path, images: np.ndarray, codes: dict[str, torch.Tensor] | None, pngs: bool = True,
                labels: list[int] | None = None) -> str:  # fmt: skip
        """A sample output of uint8 ``images`` (N, C, S, S) and, optionally, the codes per level (N, H, W) and the
        class each sample was drawn for."""

        from steps.artifacts.code_format import CodeMeta
        from steps.artifacts.samples import SamplesWriter, sample_id, sampled_codes
        from steps.io.pixels import encode_png, grid_png, hwc

        writer = SamplesWriter(str(out))
        writer.resume({}, 1)  # an empty folder
        if pngs:
            for i, pixels in enumerate(hwc(images)):
                writer.write_image(i, encode_png(pixels))
        if codes:
            shapes = {lv: tuple(c.shape[1:]) for lv, c in codes.items()}
            sizes = {lv: int(c.max()) + 1 for lv, c in codes.items()}
            meta = CodeMeta(tuple(codes), shapes, sizes, vqvae="0" * 16, image_size=images.shape[-1])
            ids, seeds = [sample_id(i) for i in range(len(images))], list(range(len(images)))
            writer.write_codes(0, sampled_codes(ids, labels, codes, meta, seeds))
        writer.finish(grid_png(images), {"num_samples": len(images)}, pngs=pngs, codes=bool(codes))
        return str(out)

    @staticmethod
    def small_vqvae2(seed: int = 0, **overrides):
        """The debug=tiny VQ-VAE-2 on 1-channel 32 px images with 32 codes of 8 dims per level (``Tiny.SMALL``)."""
        from steps.nn import registry

        torch.manual_seed(seed)
        cfg = compose(*Tiny.SMALL).train_vqvae.model
        return registry.build(replace(cfg, **overrides)).eval()


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from threads, and threads waiting on each other crawl on a busy machine
    (``pytestmark = pytest.mark.usefixtures("one_thread")`` in a module of tiny models)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def artifacts() -> type[Artifacts]:
    return Artifacts


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray instance shared by every test that asks for it (integration and e2e)."""
    import ray

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    if not ray.is_initialized():
        # More logical CPUs than cores: Ray Data actors and Ray Train workers mostly wait on each other in tests.
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def digit_shards(ray_local, tmp_path_factory) -> str:
    """240 bundled digits at 32x32, 1 channel, sharded by the real shard step (about 20 % val)."""
    from steps.shard import run

    cfg = compose("data.limit=240", "data.val_fraction=0.2", "data.rows_per_shard=100").shard
    out = tmp_path_factory.mktemp("shards")
    run(cfg, {}, str(out))
    return str(out)


def _read_four_ways(folder: str) -> dict[str, dict]:
    """The Parquet dataset at ``folder`` as pyarrow.dataset, pandas, duckdb and Ray Data each open it (the folder as
    one dataset, hive partitions on): per reader ``{"columns": [...], "rows": {split: n}}``, rows counted by the
    ``split`` column (``{None: n}`` without one)."""
    from collections import Counter

    import duckdb
    import pandas as pd
    import pyarrow.dataset as pads
    import ray

    def seen(columns, split_column, rows: int) -> dict:
        splits = [str(s) for s in split_column()] if "split" in columns else [None] * rows
        return {"columns": list(columns), "rows": dict(Counter(splits))}

    table = pads.dataset(folder, format="parquet", partitioning="hive").to_table()
    frame = pd.read_parquet(folder)
    sql = f"select * from read_parquet('{folder}/**/*.parquet', hive_partitioning=true)"
    columns = duckdb.sql(sql).columns
    ds = ray.data.read_parquet(folder)
    names = ds.schema().names
    return {
        "pyarrow": seen(table.column_names, lambda: table.column("split").to_pylist(), table.num_rows),
        "pandas": seen(frame.columns, lambda: frame["split"].tolist(), len(frame)),
        "duckdb": seen(
            columns,
            lambda: [r[0] for r in duckdb.sql(f"select split from ({sql})").fetchall()],
            duckdb.sql(f"select count(*) from ({sql})").fetchall()[0][0],
        ),
        "ray": seen(names, lambda: [r["split"] for r in ds.select_columns(["split"]).take_all()], ds.count()),
    }


@pytest.fixture(scope="session")
def read_four_ways(ray_local):
    """``read_four_ways(folder)``: how each of the four readers a dataset folder must open in sees it (Ray: the
    session's local instance)."""
    return _read_four_ways


def _png_claiming(width: int, height: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (4, 4)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    ihdr = bytearray(data[12:29])  # chunk type + 13 bytes of IHDR data
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return bytes(data)


@pytest.fixture(scope="session")
def png_claiming():
    """``png_claiming(width, height)``: a 4x4 PNG whose IHDR claims that size, CRC fixed so Pillow trusts the
    header: a decompression bomb in a few bytes."""
    return _png_claiming
