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
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
import torch
from ray.data import Datasink
from ray.data.block import BlockAccessor

from steps.codes import (
    CodeMeta,
    code_schema,
    codes_to_arrow,
    model_digest,
    parquet_files,
    read_ids,
    schema_code_meta,
)
from steps.common import (
    MetricsSink,
    MissingInputError,
    StepResult,
    exists,
    filesystem,
    join,
    makedirs,
    read_bytes,
    require_input,
    write_bytes,
    write_json,
)
from steps.images import SPLITS, decode_batch, image_meta
from steps.nn.checkpoint import CheckpointError, load_model, read_checkpoint

log = logging.getLogger(__name__)

STEP = "encode"
SPLIT_COL = "__split"  # int8 index into SPLITS, added by the encoder and dropped by the sink
VQ_KINDS = ("vqvae2", "vqvae")  # checkpoint kinds that make codes
BYTES_NAME = "<checkpoint bytes>"  # what steps.nn.checkpoint calls a checkpoint handed over as bytes


@dataclass(frozen=True)
class EncodeConfig:
    """How the encode step runs. Codes do not depend on any of these values, only on the checkpoint and images."""

    batch_size: int = 256
    num_actors: int = 1
    use_gpu: bool = False
    cpus_per_actor: float = 1.0
    rows_per_file: int = 4096

    def __post_init__(self) -> None:
        for name in ("batch_size", "num_actors", "rows_per_file"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"encode.{name} must be an integer >= 1, got {value!r}")
        if not isinstance(self.use_gpu, bool):
            raise ValueError(f"encode.use_gpu must be true or false, got {self.use_gpu!r}")
        cpus = self.cpus_per_actor
        if isinstance(cpus, bool) or not isinstance(cpus, (int, float)) or not cpus > 0:
            raise ValueError(f"encode.cpus_per_actor must be a number > 0, got {cpus!r}")

    @property
    def torch_threads(self) -> int:
        """Intra-op threads per actor: the CPUs Ray reserved for it, at least one."""
        return max(1, int(self.cpus_per_actor))


# ------------------------------------------------------------------------------------------------ Ray Data parts
class CodeEncoder:
    """``map_batches`` callable: image rows (pyarrow) -> code rows. The model is loaded once per actor."""

    def __init__(self, checkpoint: Any, meta_json: str, split_dirs: Mapping[str, str], use_gpu: bool, threads: int):
        if isinstance(checkpoint, ray.ObjectRef):
            checkpoint = ray.get(checkpoint)
        torch.set_num_threads(threads)
        self.meta = CodeMeta.from_json(meta_json)
        self.device = torch.device("cuda" if use_gpu else "cpu")
        model, _ = load_model(checkpoint, expect=VQ_KINDS)
        self.model = model.to(self.device).eval()
        self.channels = model.config.in_channels
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

    Files are named by the write task, so a retried task overwrites its own file, and written through
    ``steps.common.write_bytes`` (temporary file + rename locally): a file is complete or absent.
    """

    def __init__(self, out: str, meta: CodeMeta, rows_per_file: int) -> None:
        self.out = out
        self.schema = code_schema(meta)
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
            part = part.cast(self.schema).replace_schema_metadata(self.schema.metadata)
            for k, start in enumerate(range(0, part.num_rows, self.rows_per_file)):
                chunk = part.slice(start, self.rows_per_file)
                write_code_file(chunk, join(self.out, name, f"part-{ctx.task_idx:05d}-{k:03d}-{self.run_id}"))
            written[name] = part.num_rows
        return written


def write_code_file(table: pa.Table, uri_stem: str) -> None:
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf, compression="zstd")
    write_bytes(uri_stem + ".parquet", buf.getvalue().to_pybytes())


# ------------------------------------------------------------------------------------------------ the step
def run(cfg: EncodeConfig, inputs: Mapping[str, str], out: str, sink: MetricsSink | None = None) -> StepResult:
    """Encode every image of ``inputs["shard"]`` with the VQ-VAE of ``inputs["train_vqvae"]`` into ``out``.

    ``sink`` is accepted for the common step signature; encode has no curves to log.

    Raises:
        MissingInputError: an upstream output or the checkpoint ``model.pt`` is missing.
        CheckpointError: ``model.pt`` is unreadable or holds another kind of model than a VQ-VAE (e.g. a prior).
        ValueError: a VAE checkpoint, or images whose size/channels differ from the model's.
        RuntimeError: the written dataset does not have exactly one row per input row.
    """
    shard = require_input(inputs, STEP, "shard")
    vq_dir = require_input(inputs, STEP, "train_vqvae")
    ckpt_uri = join(vq_dir, "model.pt")
    if not exists(ckpt_uri):
        raise MissingInputError(
            f"encode needs the VQ-VAE checkpoint {ckpt_uri}, which does not exist; run train_vqvae first"
        )
    ckpt = read_bytes(ckpt_uri)
    model = _load_vq_model(ckpt, ckpt_uri)
    digest = model_digest(ckpt)

    in_files, in_rows, num_classes = _check_shards(shard, model.config, ckpt_uri)
    meta = CodeMeta.from_model(model, digest, num_classes)
    _clear(out, keep_clear_of=(shard, vq_dir))

    start = time.perf_counter()
    todo = [s for s in SPLITS if in_rows[s]]
    if todo:
        _encode(cfg, ckpt, meta, shard, {s: in_files[s] for s in todo}, out)
    seconds = time.perf_counter() - start
    for s in SPLITS:
        if not in_rows[s]:  # an empty split still gets a file, so readers see the schema
            write_code_file(code_schema(meta).empty_table(), join(out, s, "part-empty"))

    out_rows = _verify(out, shard, meta, in_rows)
    metadata_uri = join(out, "codes.json")
    write_json(metadata_uri, {**meta.to_dict(), "rows": out_rows})  # last: its presence means the data is complete
    total = sum(out_rows.values())
    log.info("encode: %s images -> %s codes %s in %.1f s", out_rows, list(meta.levels), meta.shapes, seconds)
    return StepResult(
        metrics={
            "rows_train": float(out_rows["train"]),
            "rows_val": float(out_rows["val"]),
            "images_per_s": total / seconds if seconds > 0 else 0.0,
        },
        artifacts={"train": join(out, "train"), "val": join(out, "val"), "metadata": metadata_uri},
        info={"vqvae": digest, "shapes": {n: list(s) for n, s in meta.shapes.items()}, "seconds": seconds},
    )


def _load_vq_model(ckpt: bytes, ckpt_uri: str) -> torch.nn.Module:
    """The VQ model of ``ckpt``, or an error naming ``ckpt_uri``, what is wrong and the kinds encode can use."""
    expected = f"expected the model.pt that train_vqvae writes (kind {' or '.join(map(repr, VQ_KINDS))})"
    try:
        payload = read_checkpoint(ckpt)
    except CheckpointError as exc:
        why = str(exc).replace(BYTES_NAME, "it").splitlines()[0]
        if exc.__cause__ is not None:  # torch.load's own text advises weights_only=False, which would run code
            why = "torch.load(weights_only=True) cannot read it (not a torch file, or one holding pickled objects)"
        raise CheckpointError(f"{ckpt_uri} is not a checkpoint encode can use: {why}; {expected}") from exc
    kind = payload["kind"]
    if kind == "vae":
        raise ValueError(f"encode needs a VQ model; model=vae has no codes (checkpoint {ckpt_uri})")
    if kind not in VQ_KINDS:
        raise CheckpointError(f"{ckpt_uri} holds a {kind!r} checkpoint, but encode needs a VQ-VAE: {expected}")
    try:
        return load_model(payload, expect=VQ_KINDS)[0]
    except CheckpointError as exc:
        raise CheckpointError(f"{ckpt_uri}: {exc}") from None


def _check_shards(shard: str, model_cfg: Any, ckpt_uri: str) -> tuple[dict[str, list[str]], dict[str, int], int | None]:
    """Parquet files and row counts per split, after checking every file's image metadata against the model."""
    files: dict[str, list[str]] = {}
    rows: dict[str, int] = {}
    max_label, declared_classes = -1, None
    want = {"image_size": model_cfg.image_size, "channels": model_cfg.in_channels}
    for split in SPLITS:
        files[split] = parquet_files(join(shard, split))
        rows[split] = 0
        for f in files[split]:
            fs, path = filesystem(f)
            md = pq.read_metadata(path, filesystem=fs)
            got = image_meta(md.schema.to_arrow_schema(), where=f)
            for key, value in want.items():
                if int(got.get(key, -1)) != value:
                    raise ValueError(
                        f"image shards {f} hold {key}={got.get(key)}, but the VQ-VAE {ckpt_uri} expects {key}={value}; "
                        "rerun shard with the model's image size, or train a model for these images"
                    )
            declared_classes = got.get("num_classes", len(got["classes"]) if "classes" in got else declared_classes)
            rows[split] += md.num_rows
            labels = pq.read_table(path, filesystem=fs, columns=["label"]).column("label")
            top = pc.max(labels).as_py()
            max_label = max(max_label, -1 if top is None else top)
    if not any(rows.values()):
        raise MissingInputError(
            f"encode found no images under {shard}/{{{','.join(SPLITS)}}}; run the shard step first"
        )
    num_classes = declared_classes if declared_classes is not None else (max_label + 1 if max_label >= 0 else None)
    return files, rows, num_classes


def _clear(out: str, keep_clear_of: tuple[str, ...]) -> None:
    """Empty ``out`` (a crashed attempt may have left files), refusing to touch an input directory."""
    fs, path = filesystem(out)
    for uri in keep_clear_of:
        other = filesystem(uri)[1].rstrip("/") + "/"
        if other.startswith(path.rstrip("/") + "/"):
            raise ValueError(f"encode output {out} must not contain its input {uri}")
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        fs.delete_dir_contents(path)
    makedirs(out)


def _encode(cfg: EncodeConfig, ckpt: bytes, meta: CodeMeta, shard: str, files: dict[str, list[str]], out: str) -> None:
    if ray.is_initialized():  # an actor that can never be placed would make Ray Data wait forever
        have = ray.cluster_resources()
        if cfg.use_gpu and have.get("GPU", 0) < 1:
            raise ValueError("encode.use_gpu=true, but the Ray cluster has no GPU")
        if have.get("CPU", 0) < cfg.cpus_per_actor:
            raise ValueError(
                f"encode.cpus_per_actor={cfg.cpus_per_actor}, but the Ray cluster has {have.get('CPU', 0)} CPUs"
            )
    fs, _ = filesystem(shard)
    split_dirs = {s: filesystem(join(shard, s))[1] for s in files}  # Ray reports each row's file by this path
    paths = [filesystem(u)[1] for uris in files.values() for u in uris]
    ds = ray.data.read_parquet(paths, filesystem=fs, columns=["id", "label", "image"], include_paths=True)
    ds = ds.map_batches(
        CodeEncoder,
        compute=ray.data.ActorPoolStrategy(size=cfg.num_actors),
        batch_size=cfg.batch_size,
        batch_format="pyarrow",
        num_cpus=cfg.cpus_per_actor,
        num_gpus=1 if cfg.use_gpu else None,
        fn_constructor_kwargs={
            "checkpoint": ray.put(ckpt),
            "meta_json": meta.to_json(),
            "split_dirs": split_dirs,
            "use_gpu": cfg.use_gpu,
            "threads": cfg.torch_threads,
        },
    )
    ds.write_datasink(CodeSink(out, meta, cfg.rows_per_file))


def _verify(out: str, shard: str, meta: CodeMeta, in_rows: dict[str, int]) -> dict[str, int]:
    """Row counts per split of the written dataset, after proving one output row per input row."""
    out_rows: dict[str, int] = {}
    out_ids, in_ids = [], []
    for split in SPLITS:
        files = parquet_files(join(out, split))
        out_rows[split] = 0
        for f in files:
            fs, path = filesystem(f)
            md = pq.read_metadata(path, filesystem=fs)
            if schema_code_meta(md.schema.to_arrow_schema(), where=f) != meta:
                raise RuntimeError(f"encode wrote {f} with metadata other than {meta}")
            out_rows[split] += md.num_rows
        if out_rows[split] != in_rows[split]:
            raise RuntimeError(
                f"encode wrote {out_rows[split]} {split} rows for {in_rows[split]} input images; not writing codes.json"
            )
        if in_rows[split]:
            out_ids.append(read_ids(files))
            in_ids.append(read_ids(parquet_files(join(shard, split))))
    if out_ids:
        written = pa.chunked_array([c for a in out_ids for c in a.chunks], pa.string())
        given = pa.chunked_array([c for a in in_ids for c in a.chunks], pa.string())
        distinct = pc.count_distinct(written).as_py()
        if distinct != len(written):
            why = (
                "the input ids are not unique" if pc.count_distinct(given).as_py() != len(given) else "duplicated rows"
            )
            raise RuntimeError(f"encode wrote {len(written)} rows but {distinct} distinct ids ({why})")
        if not pc.all(pc.is_in(written, value_set=given.combine_chunks())).as_py():
            raise RuntimeError("encode wrote ids that are not in its input")
    return out_rows
