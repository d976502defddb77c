"""The encode step: every image of the shards -> its discrete VQ-VAE codes, as the code dataset of ``steps.codes``.

VQ-VAE-2 (Razavi et al. 2019, section 3.2) trains its priors on the codes of the whole training set, so this step is
batch inference: a Ray Data ``map_batches`` over the shard files with a callable class that loads the checkpoint once
per actor (``compute=ActorPoolStrategy``). Both splits go through one Ray Data execution (actor start-up is paid
once).

The unit of work is one image-shard file: an actor encodes it whole into the code file of the same name in the
split's folder, written whole or not at all. So the step resumes per file: after a crash (a killed driver, a lost
node) the rerun keeps every code file that is complete (row count and code metadata) and encodes only the rest
(:meth:`~steps.artifacts.codes.CodeWriter.resume`). Before any work the step checks the inputs (checkpoint kind,
image size and channels); afterwards it proves, file by file, that each code file holds exactly the ids of its
image file, in order (memory: one file's ids), and only then writes the code dataset's record
(``steps.artifacts.codes``: its presence means the dataset is complete).
"""

from __future__ import annotations

import functools
import logging
import posixpath
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
import torch

from steps.artifacts.autoencoder import Autoencoder
from steps.artifacts.code_format import CodeMeta, codes_to_arrow
from steps.artifacts.codes import CodeDataset, CodeWriter
from steps.artifacts.images import SPLITS, ImageShards
from steps.core.progress import Progress, watch
from steps.core.step import MetricsSink, StepResult, require_input
from steps.core.watchdog import Heartbeat, watched
from steps.io import storage
from steps.io.pixels import decode_batch
from steps.nn.config import ConfigBase, no_effect

log = logging.getLogger(__name__)

STEP = "encode"


@dataclass(frozen=True)
class EncodeConfig(ConfigBase):
    """How the encode step runs. Codes depend only on the checkpoint and the images (and on float rounding of the
    batch size and device)."""

    batch_size: int = 256
    num_actors: int = no_effect(1)
    use_gpu: bool = False
    cpus_per_actor: float = no_effect(1.0)
    stall_timeout_s: float = no_effect(600.0)  # a file without progress this long fails, naming it (0: off)

    def validate(self) -> None:
        self.require_min(1, "batch_size", "num_actors")
        self.require("stall_timeout_s", self.stall_timeout_s >= 0, "seconds >= 0 (0: no limit)")
        self.require("cpus_per_actor", self.cpus_per_actor > 0, "a number > 0")

    @property
    def torch_threads(self) -> int:
        """Intra-op threads per actor: the CPUs Ray reserved for it, at least one."""
        return max(1, int(self.cpus_per_actor))


# ------------------------------------------------------------------------------------------------ Ray Data parts
@dataclass(frozen=True)
class Unit:
    """One image-shard file and the code file it becomes (``<split folder>/<name>.parquet`` of the output)."""

    split: str
    src: str
    name: str
    rows: int


class FileEncoder:
    """``map_batches`` callable: each row names one image-shard file, which the actor encodes whole, ``batch_size``
    images at a time, into its code file. The model is loaded once per actor."""

    def __init__(
        self, autoencoder: Autoencoder, writer: CodeWriter, batch_size: int, use_gpu: bool, threads: int,
        stall_s: float = 0.0,
    ):  # fmt: skip
        torch.set_num_threads(threads)
        self.writer, self.batch_size, self.stall_s = writer, batch_size, stall_s
        self.device = torch.device("cuda" if use_gpu else "cpu")
        self.model = autoencoder.load(self.device)  # refuses a checkpoint that changed since the driver checked it
        self.channels = autoencoder.image_shape[0]

    def encode(self, images: pa.Table) -> pa.Table:
        x = torch.from_numpy(decode_batch(images.column("image").to_pylist(), self.channels))  # (B, C, S, S)
        with torch.inference_mode(), torch.autocast("cuda", torch.bfloat16, enabled=self.device.type == "cuda"):
            enc = self.model.encode(x.to(self.device, non_blocking=True))
        codes = {n: c.cpu() for n, c in zip(self.model.levels, enc.codes, strict=True)}  # each (B, H, W)
        return codes_to_arrow(images.column("id"), images.column("label"), codes, self.writer.meta)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = []
        for split, src, name in zip(batch["split"], batch["src"], batch["name"], strict=True):
            what = f"encoding {src} into {self.writer.split_uri(str(split))}"
            rows.append(watched(functools.partial(self._file, str(split), str(src), str(name)), what, self.stall_s))
        return {"rows": np.asarray(rows, dtype=np.int64)}

    def _file(self, split: str, src: str, name: str, beat: Heartbeat) -> int:
        """Encode one image-shard file whole into its code file; returns its rows."""
        beat("reading the image file")
        images = storage.read_parquet(src, columns=["id", "label", "image"])
        parts = []
        for i in range(0, images.num_rows, self.batch_size):
            beat(f"encoding rows {i} to {min(i + self.batch_size, images.num_rows)}")
            parts.append(self.encode(images.slice(i, self.batch_size)))
        table = pa.concat_tables(parts) if parts else self.writer.schema.empty_table()
        beat("writing the code file")
        self.writer.write_part(table, split, name)
        return table.num_rows


# ------------------------------------------------------------------------------------------------ the step
def run(cfg: EncodeConfig, inputs: Mapping[str, str], out: str, sink: MetricsSink | None = None) -> StepResult:
    """Encode every image of ``inputs["shard"]`` with the VQ-VAE of ``inputs["train_vqvae"]`` into ``out``.

    ``sink`` is accepted for the common step signature; encode has no curves to log.

    Raises:
        MissingInputError: an upstream output or the VQ-VAE checkpoint is missing.
        CheckpointError: the checkpoint is unreadable or holds another kind of model than an autoencoder.
        ValueError: a VAE (no codes), or images whose size/channels differ from the model's.
        RuntimeError: the written dataset does not have exactly one row per input row.
    """
    shards = ImageShards.open(require_input(inputs, STEP, "shard"))
    autoencoder = Autoencoder.open(require_input(inputs, STEP, "train_vqvae"))
    if not autoencoder.makes_codes:
        raise ValueError(f"encode needs a VQ model; model={autoencoder.kind} has no codes ({autoencoder.model_uri})")
    channels, size = autoencoder.image_shape[0], autoencoder.image_size
    shards.check_images(size, channels, consumer=f"the VQ-VAE {autoencoder.model_uri}")
    in_rows = {s: shards.rows(s) for s in SPLITS}
    if not any(in_rows.values()):
        raise ValueError(f"encode found no images in the shards at {shards.uri}; rerun the shard step")
    meta = CodeMeta.of(autoencoder, shards.num_classes)
    writer = CodeWriter(out, meta)
    units = _units(shards)
    done = writer.resume({(u.split, u.name): u.rows for u in units}, keep_clear_of=(shards.uri, autoencoder.uri))
    todo = [u for u in units if (u.split, u.name) not in done]
    if done:
        log.info("encode: resuming: %d of %d files already encoded, %d to go", len(done), len(units), len(todo))

    start = time.perf_counter()
    kept = sum(u.rows for u in units if (u.split, u.name) in done)  # the rate counts this run's rows only
    progress = Progress(STEP, sum(in_rows.values()), kept, unit="rows", rate_unit="rows/s")
    with watch(progress, _rows_written(writer, [s for s in SPLITS if in_rows[s]]), log):
        _encode(cfg, autoencoder, todo, writer)
    seconds = time.perf_counter() - start
    for s in SPLITS:
        if not in_rows[s]:
            writer.write_empty(s)

    out_rows = _verify(CodeDataset(out, meta), units, in_rows)
    artifacts = writer.finish(out_rows)  # last: its presence means the data is complete
    total = sum(out_rows.values())
    codes = ", ".join(f"{level} {h}x{w}" for level, (h, w) in meta.shapes.items())
    log.info("%s  -> codes %s", progress.line(total), codes)
    return StepResult(
        metrics={
            "rows_train": float(out_rows["train"]),
            "rows_val": float(out_rows["val"]),
            "images_per_s": total / seconds if seconds > 0 else 0.0,
        },
        artifacts=artifacts,
        info={"vqvae": meta.vqvae, "shapes": {n: list(s) for n, s in meta.shapes.items()}, "seconds": seconds},
    )


def _units(shards: ImageShards) -> list[Unit]:
    """Every non-empty image-shard file, with its row count (from its footer)."""
    units = []
    for split in SPLITS:
        for uri in shards.files(split):
            fs, path = storage.filesystem(uri)
            rows = pq.read_metadata(path, filesystem=fs).num_rows
            if rows:
                units.append(Unit(split, uri, posixpath.basename(path).removesuffix(".parquet"), rows))
    return units


def _encode(cfg: EncodeConfig, autoencoder: Autoencoder, units: list[Unit], writer: CodeWriter) -> None:
    if ray.is_initialized():  # an actor that can never be placed would make Ray Data wait forever
        have = ray.cluster_resources()
        if cfg.use_gpu and have.get("GPU", 0) < 1:
            raise ValueError("encode.use_gpu=true, but the Ray cluster has no GPU")
        if have.get("CPU", 0) < cfg.cpus_per_actor:
            raise ValueError(
                f"encode.cpus_per_actor={cfg.cpus_per_actor}, but the Ray cluster has {have.get('CPU', 0)} CPUs"
            )
    if not units:
        return
    ds = ray.data.from_items([{"split": u.split, "src": u.src, "name": u.name} for u in units])
    ds = ds.map_batches(
        FileEncoder,
        compute=ray.data.ActorPoolStrategy(size=min(cfg.num_actors, len(units))),
        batch_size=1,  # one file per call: a retried task redoes one file
        num_cpus=cfg.cpus_per_actor,
        num_gpus=1 if cfg.use_gpu else None,
        fn_constructor_kwargs={
            "autoencoder": autoencoder,
            "writer": writer,
            "batch_size": cfg.batch_size,
            "use_gpu": cfg.use_gpu,
            "threads": cfg.torch_threads,
            "stall_s": cfg.stall_timeout_s,
        },
    )
    written = sum(int(b["rows"].sum()) for b in ds.iter_batches(batch_size=None, batch_format="numpy"))
    if written != sum(u.rows for u in units):
        raise RuntimeError(f"encode wrote {written} rows for the {sum(u.rows for u in units)} images it was given")


def _rows_written(writer: CodeWriter, splits: list[str]) -> Callable[[], int]:
    """Rows in the code files written so far, each file's footer read once: the progress of a running encode."""
    rows: dict[str, int] = {}

    def poll() -> int:
        for uri in (f for s in splits for f in storage.parquet_files(writer.split_uri(s))):
            if uri not in rows:
                fs, path = storage.filesystem(uri)
                rows[uri] = pq.read_metadata(path, filesystem=fs).num_rows
        return sum(rows.values())

    return poll


def _verify(codes: CodeDataset, units: list[Unit], in_rows: dict[str, int]) -> dict[str, int]:
    """Row counts per split of the written dataset, after proving one output row per input row: the code files are
    exactly the image files' names, and each holds its image file's ids in order (one file's ids in memory)."""
    out_rows = codes.check_files()
    for split in SPLITS:
        if out_rows[split] != in_rows[split]:
            raise RuntimeError(
                f"encode wrote {out_rows[split]} {split} rows for {in_rows[split]} input images; not finishing the "
                "code dataset"
            )
    by_name = {(u.split, u.name): u for u in units}
    for split in SPLITS:
        for name, uri in codes.parts(split).items():
            unit = by_name.get((split, name))
            if unit is None:
                raise RuntimeError(f"encode: {uri} has no image file of that name; not finishing the code dataset")
            written, given = storage.read_column([uri], "id"), storage.read_column([unit.src], "id")
            if len(written) != len(given) or not pc.all(pc.equal(written, given)).as_py():
                raise RuntimeError(f"encode: {uri} does not hold the ids of {unit.src}; not finishing the code dataset")
    return out_rows
