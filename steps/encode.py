"""The encode step: every image of the shards -> its discrete VQ-VAE codes, as the code dataset of ``steps.codes``.

VQ-VAE-2 (Razavi et al. 2019, section 3.2) trains its priors on the codes of the whole training set, so this step is
batch inference: a Ray Data ``map_batches`` over the image shards with a callable class that loads the checkpoint
once per actor (``compute=ActorPoolStrategy``), and a datasink that writes the code Parquet files per split.

Both splits go through one Ray Data execution (actor start-up is paid once): the read tags each row with its file's
path, the encoder turns that into a split index, and the sink routes rows to ``<out>/<split>/``. Before any work the
step checks the inputs (checkpoint kind, image size and channels); afterwards it proves that every input row has
exactly one output row (counts per split, unique ids, ids drawn from the input) and only then writes ``codes.json``.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import torch
from ray.data import Datasink
from ray.data.block import BlockAccessor

from steps import storage
from steps.artifacts.autoencoder import Autoencoder
from steps.artifacts.codes import CodeDataset, CodeMeta, CodeWriter, codes_to_arrow
from steps.artifacts.images import SPLITS, ImageShards
from steps.common import MetricsSink, StepResult, require_input
from steps.nn.config import ConfigBase, no_effect
from steps.pixels import decode_batch

log = logging.getLogger(__name__)

STEP = "encode"
SPLIT_COL = "__split"  # int8 index into SPLITS, added by the encoder and dropped by the sink


@dataclass(frozen=True)
class EncodeConfig(ConfigBase):
    """How the encode step runs. Codes depend only on the checkpoint and the images (and on float rounding of the
    batch size and device)."""

    batch_size: int = 256
    num_actors: int = no_effect(1)
    use_gpu: bool = False
    cpus_per_actor: float = no_effect(1.0)
    rows_per_file: int = 4096

    def validate(self) -> None:
        self.require_min(1, "batch_size", "num_actors", "rows_per_file")
        self.require("cpus_per_actor", self.cpus_per_actor > 0, "a number > 0")

    @property
    def torch_threads(self) -> int:
        """Intra-op threads per actor: the CPUs Ray reserved for it, at least one."""
        return max(1, int(self.cpus_per_actor))


# ------------------------------------------------------------------------------------------------ Ray Data parts
class CodeEncoder:
    """``map_batches`` callable: image rows (pyarrow) -> code rows. The model is loaded once per actor."""

    def __init__(
        self, autoencoder: Autoencoder, meta: CodeMeta, split_dirs: Mapping[str, str], use_gpu: bool, threads: int
    ) -> None:
        torch.set_num_threads(threads)
        self.meta = meta
        self.device = torch.device("cuda" if use_gpu else "cpu")
        self.model = autoencoder.load(self.device)  # refuses a checkpoint that changed since the driver checked it
        self.channels = autoencoder.image_shape[0]
        self.split_dirs = {s: d.rstrip("/") + "/" for s, d in split_dirs.items()}

    def _split_index(self, paths: pa.ChunkedArray | pa.Array) -> np.ndarray:
        """Per row, the index in SPLITS of the split whose directory holds the row's file."""
        unique = pc.unique(paths).to_pylist()
        index = []
        for p in unique:
            match = [s for s, d in self.split_dirs.items() if p.startswith(d)]
            if not match:
                raise RuntimeError(f"encode: read a file outside the split directories: {p}")
            index.append(SPLITS.index(match[0]))
        return np.asarray(index, dtype=np.int8)[pc.index_in(paths, value_set=pa.array(unique)).to_numpy()]

    def __call__(self, batch: pa.Table) -> pa.Table:
        x = torch.from_numpy(decode_batch(batch.column("image").to_pylist(), self.channels))  # (B, C, S, S)
        with torch.inference_mode(), torch.autocast("cuda", torch.bfloat16, enabled=self.device.type == "cuda"):
            enc = self.model.encode(x.to(self.device, non_blocking=True))
        codes = {n: c.cpu() for n, c in zip(self.model.levels, enc.codes, strict=True)}  # each (B, H, W)
        table = codes_to_arrow(batch.column("id"), batch.column("label"), codes, self.meta)
        return table.append_column(SPLIT_COL, pa.array(self._split_index(batch.column("path"))))


class CodeSink(Datasink):
    """Writes bundles of at least ``rows_per_file`` code rows as files of at most that many rows, per split.

    Files are named by the write task, so a retried task overwrites its own file, and written whole or not at all
    (:class:`~steps.artifacts.codes.CodeWriter`).
    """

    def __init__(self, writer: CodeWriter, rows_per_file: int) -> None:
        self.writer = writer
        self.rows_per_file = rows_per_file
        self.run_id = uuid.uuid4().hex[:8]

    @property
    def min_rows_per_write(self) -> int:
        return self.rows_per_file

    def write(self, blocks, ctx) -> dict[str, int]:
        tables = [t for t in (BlockAccessor.for_block(b).to_arrow() for b in blocks) if t.num_rows]
        written = dict.fromkeys(SPLITS, 0)
        if not tables:
            return written
        table = pa.concat_tables(tables)
        split = table.column(SPLIT_COL)
        for i, name in enumerate(SPLITS):
            part = table.filter(pc.equal(split, i)).drop_columns([SPLIT_COL])
            for k, start in enumerate(range(0, part.num_rows, self.rows_per_file)):
                chunk = part.slice(start, self.rows_per_file)
                self.writer.write_part(chunk, name, f"part-{ctx.task_idx:05d}-{k:03d}-{self.run_id}")
            written[name] = part.num_rows
        return written


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
    writer.clear(keep_clear_of=(shards.uri, autoencoder.uri))

    start = time.perf_counter()
    todo = [s for s in SPLITS if in_rows[s]]
    _encode(cfg, autoencoder, shards, todo, writer)
    seconds = time.perf_counter() - start
    for s in SPLITS:
        if not in_rows[s]:
            writer.write_empty(s)

    out_rows = _verify(CodeDataset(out, meta), shards, in_rows)
    artifacts = writer.finish(out_rows)  # last: its presence means the data is complete
    total = sum(out_rows.values())
    log.info("encode: %s images -> %s codes %s in %.1f s", out_rows, list(meta.levels), meta.shapes, seconds)
    return StepResult(
        metrics={
            "rows_train": float(out_rows["train"]),
            "rows_val": float(out_rows["val"]),
            "images_per_s": total / seconds if seconds > 0 else 0.0,
        },
        artifacts=artifacts,
        info={"vqvae": meta.vqvae, "shapes": {n: list(s) for n, s in meta.shapes.items()}, "seconds": seconds},
    )


def _encode(cfg: EncodeConfig, autoencoder: Autoencoder, shards: ImageShards, splits: list[str], writer: CodeWriter):
    if ray.is_initialized():  # an actor that can never be placed would make Ray Data wait forever
        have = ray.cluster_resources()
        if cfg.use_gpu and have.get("GPU", 0) < 1:
            raise ValueError("encode.use_gpu=true, but the Ray cluster has no GPU")
        if have.get("CPU", 0) < cfg.cpus_per_actor:
            raise ValueError(
                f"encode.cpus_per_actor={cfg.cpus_per_actor}, but the Ray cluster has {have.get('CPU', 0)} CPUs"
            )
    fs, _ = storage.filesystem(shards.uri)
    split_dirs = {s: storage.filesystem(shards.split_uri(s))[1] for s in splits}  # how Ray names each row's file
    paths = [storage.filesystem(u)[1] for s in splits for u in shards.files(s)]
    ds = ray.data.read_parquet(paths, filesystem=fs, columns=["id", "label", "image"], include_paths=True)
    ds = ds.map_batches(
        CodeEncoder,
        compute=ray.data.ActorPoolStrategy(size=cfg.num_actors),
        batch_size=cfg.batch_size,
        batch_format="pyarrow",
        num_cpus=cfg.cpus_per_actor,
        num_gpus=1 if cfg.use_gpu else None,
        fn_constructor_kwargs={
            "autoencoder": autoencoder,
            "meta": writer.meta,
            "split_dirs": split_dirs,
            "use_gpu": cfg.use_gpu,
            "threads": cfg.torch_threads,
        },
    )
    ds.write_datasink(CodeSink(writer, cfg.rows_per_file))


def _verify(codes: CodeDataset, shards: ImageShards, in_rows: dict[str, int]) -> dict[str, int]:
    """Row counts per split of the written dataset, after proving one output row per input row."""
    out_rows = codes.check_files()
    for split in SPLITS:
        if out_rows[split] != in_rows[split]:
            raise RuntimeError(
                f"encode wrote {out_rows[split]} {split} rows for {in_rows[split]} input images; not writing codes.json"
            )
    splits = [s for s in SPLITS if in_rows[s]]
    written = pa.chunked_array([c for s in splits for c in codes.ids(s).chunks], pa.string())
    given = pa.chunked_array([c for s in splits for c in shards.ids(s).chunks], pa.string())
    distinct = pc.count_distinct(written).as_py()
    if distinct != len(written):
        why = "the input ids are not unique" if pc.count_distinct(given).as_py() != len(given) else "duplicated rows"
        raise RuntimeError(f"encode wrote {len(written)} rows but {distinct} distinct ids ({why})")
    if not pc.all(pc.is_in(written, value_set=given.combine_chunks())).as_py():
        raise RuntimeError("encode wrote ids that are not in its input")
    return out_rows
