"""The sample step: draw new images from the trained priors (VQ-VAE-2, Razavi et al. 2019, section 3.2).

For a VQ-VAE-2, every sample draws a top code map from the top prior, then a bottom code map from the bottom prior
conditioned on those top codes, then decodes both to pixels; a one-level VQ-VAE has only the top prior, and the VAE
baseline decodes N(0, temperature^2 I) draws with no prior at all.

The ``num_samples`` samples are cut into shards of ``shard_size``. Shard ``k`` draws from its own generator seeded by
:func:`shard_seed` ``(seed, k)`` and labels come from the global sample index, so a config gives the same images
whatever the number of actors or the order in which shards finish. Shards run on a pool of Ray actors that load the
checkpoints once; each writes its PNGs and its Parquet part of sampled codes straight under ``out`` and returns only
small metadata (plus the pixels of the samples that go into the grid), so the driver never holds all samples.

Outputs: ``images/{index:06d}.png``, ``codes/part-{shard:05d}.parquet`` (not for the VAE), ``grid.png`` and, last,
``samples.json``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
import torch
from ray.util import ActorPool

from steps.common import (
    MetricsSink,
    MissingInputError,
    StepResult,
    filesystem,
    join,
    read_bytes,
    require_input,
    write_bytes,
    write_json,
)
from steps.images import encode_png, grid_png, to_uint8
from steps.nn.checkpoint import CheckpointError, load_model
from steps.nn.prior import sample_naive

log = logging.getLogger(__name__)

STEP = "sample"
SAMPLES_META_KEY = b"vqvae2.samples"
AUTOENCODER_KINDS = ("vqvae2", "vqvae", "vae")
_SEED_STRIDE = 1_000_003  # a prime larger than any realistic shard count, so (seed, k) pairs do not collide


@dataclass(frozen=True)
class SampleConfig:
    """Settings of the sample step.

    Attributes:
        num_samples: how many images to draw.
        shard_size: samples per work unit; each shard has its own seed, so changing it changes the images.
        seed: base seed; shard ``k`` uses :func:`shard_seed` ``(seed, k)``.
        temperature: divides the priors' logits (scales the VAE's latent draws); < 1 gives safer samples.
        labels: class label per sample, cycled over the samples; only for class-conditional priors. None with
            class-conditional priors cycles ``0 .. num_classes - 1``.
        num_actors: size of the Ray actor pool (capped at the number of shards).
        cpus_per_actor: CPUs each actor reserves, and its torch thread count.
        use_gpu: give each actor one GPU and sample on it (seeded draws then differ from CPU ones).
        write_pngs: write one PNG per sample under ``images/``.
        grid_size: the first ``grid_size`` samples are tiled into ``grid.png``.
    """

    num_samples: int = 64
    shard_size: int = 32
    seed: int = 0
    temperature: float = 1.0
    labels: Optional[list[int]] = None  # noqa: UP045 - OmegaConf structured configs need typing.Optional
    num_actors: int = 2
    cpus_per_actor: int = 1
    use_gpu: bool = False
    write_pngs: bool = True
    grid_size: int = 64

    def __post_init__(self) -> None:
        for name, minimum in (("num_samples", 1), ("shard_size", 1), ("num_actors", 1), ("cpus_per_actor", 1)):
            _check_int(name, getattr(self, name), minimum)
        _check_int("grid_size", self.grid_size, 1)
        _check_int("seed", self.seed, 0)
        if self.seed >= 2**32:
            raise ValueError(f"sample.seed must be < 2**32, got {self.seed}")
        if type(self.temperature) not in (int, float) or not self.temperature > 0:
            raise ValueError(f"sample.temperature must be a number > 0, got {self.temperature!r}")
        for name in ("use_gpu", "write_pngs"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"sample.{name} must be a bool, got {getattr(self, name)!r}")
        if self.labels is not None:
            labels = list(self.labels)  # a ListConfig or tuple becomes a plain list
            if not labels or not all(_is_int(v) and v >= 0 for v in labels):
                raise ValueError(f"sample.labels must be None or a non-empty list of ints >= 0, got {self.labels!r}")
            object.__setattr__(self, "labels", labels)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_int(name: str, value: Any, minimum: int) -> None:
    if not _is_int(value) or value < minimum:
        raise ValueError(f"sample.{name} must be an int >= {minimum}, got {value!r}")


def shard_seed(seed: int, shard: int) -> int:
    """The generator seed of shard ``shard``: a fixed integer mix (never Python's salted ``hash``)."""
    return seed * _SEED_STRIDE + shard


def _digest(data: bytes) -> str:
    """Identity of a checkpoint file: the first 16 hex chars of the sha256 of its bytes.

    Same definition as ``steps.codes.model_digest``; kept local until that module lands.
    """
    return hashlib.sha256(data).hexdigest()[:16]


# ------------------------------------------------------------------------------------------------ plan (driver)
@dataclass(frozen=True)
class SamplePlan:
    """What the driver checked and every actor needs: model kind, levels, shapes, label cycle, checkpoint files."""

    kind: str
    vqvae: str  # digest of model.pt
    levels: tuple[str, ...]  # prior levels, top first; () for the VAE
    shapes: dict[str, list[int]]  # level -> [H, W]
    codebook_size: dict[str, int]
    image_shape: list[int]  # [C, S, S]
    label_cycle: Optional[list[int]]  # noqa: UP045
    conditional: dict[str, bool]  # level -> prior takes labels
    files: dict[str, tuple[str, str]] = field(default_factory=dict)  # "model" / level -> (uri, digest)

    def labels_for(self, start: int, count: int) -> list[int] | None:
        """Labels of samples ``start .. start + count - 1``, or None without class conditioning."""
        if self.label_cycle is None:
            return None
        cycle = self.label_cycle
        return [cycle[i % len(cycle)] for i in range(start, start + count)]

    def schema(self) -> pa.Schema:
        """Arrow schema of a codes part: id, label, seed, one fixed-size int16 list per level."""
        cols = [pa.field("id", pa.string()), pa.field("label", pa.int32()), pa.field("seed", pa.int64())]
        cols += [pa.field(lv, pa.list_(pa.int16(), math.prod(self.shapes[lv]))) for lv in self.levels]
        meta = {"vqvae": self.vqvae, "levels": list(self.levels), "codebook_size": self.codebook_size}
        meta.update({f"{lv}_shape": self.shapes[lv] for lv in self.levels})
        return pa.schema(cols, metadata={SAMPLES_META_KEY: json.dumps(meta, sort_keys=True).encode()})


def make_plan(cfg: SampleConfig, inputs: Mapping[str, str]) -> SamplePlan:
    """Read the checkpoints and check that they belong together and fit ``cfg``."""
    model_uri = join(require_input(inputs, STEP, "train_vqvae"), "model.pt")
    data = read_bytes(model_uri)
    model, _ = load_model(data, expect=AUTOENCODER_KINDS)
    mcfg, digest = model.config, _digest(data)
    files = {"model": (model_uri, digest)}
    image_shape = [mcfg.in_channels, mcfg.image_size, mcfg.image_size]
    if model.kind == "vae":
        if cfg.labels is not None:
            raise ValueError(f"sample.labels given, but {model_uri} holds a VAE, which is not class-conditional")
        if "train_prior" in inputs:
            log.info("sample: %s holds a VAE; ignoring the train_prior input", model_uri)
        shapes = {"latent": list(mcfg.latent_shape)}
        return SamplePlan("vae", digest, (), shapes, {}, image_shape, None, {}, files)

    prior_dir = require_input(inputs, STEP, "train_prior")
    levels = tuple(model.levels)
    shapes = {lv: list(mcfg.shapes[lv]) for lv in levels}
    sizes = {lv: mcfg.level(lv)[0] for lv in levels}
    if max(sizes.values()) > 2**15:
        raise ValueError(f"{model_uri}: codebooks of more than 32768 codes do not fit the int16 codes column")
    num_classes = {}
    for i, lv in enumerate(levels):
        uri = join(prior_dir, f"{lv}.pt")
        try:
            data = read_bytes(uri)
        except FileNotFoundError:
            raise MissingInputError(
                f"{uri} does not exist: the {model.kind} model has levels {list(levels)}; rerun train_prior"
            ) from None
        prior, payload = load_model(data, expect="prior")
        files[lv] = (uri, _digest(data))
        pc = prior.config
        if payload.get("level") != lv:
            raise CheckpointError(f"{uri} holds a prior for level {payload.get('level')!r}, expected {lv!r}")
        if payload.get("vqvae") != digest:
            raise CheckpointError(
                f"{uri}: priors were trained on codes of VQ-VAE {payload.get('vqvae')}, but train_vqvae holds "
                f"{digest}: rerun train_prior"
            )
        if list(pc.shape) != shapes[lv] or pc.num_codes != sizes[lv]:
            raise CheckpointError(
                f"{uri} models {pc.num_codes} codes on a {list(pc.shape)} map, but {model_uri} has "
                f"{sizes[lv]} codes on a {shapes[lv]} map at level {lv!r}"
            )
        above = levels[i - 1] if i else None  # each level is conditioned on the one above it
        want_cond = (sizes[above], shapes[above]) if above else (0, None)
        got_cond = (pc.cond_num_codes, list(pc.cond_shape) if pc.cond_num_codes else None)
        if got_cond != want_cond:
            raise CheckpointError(
                f"{uri} is conditioned on {got_cond[0]} codes on a {got_cond[1]} map, expected "
                + (f"{want_cond[0]} codes on the {above} map {want_cond[1]}" if above else "no code map")
            )
        num_classes[lv] = pc.num_classes
    conditional = {lv: k > 0 for lv, k in num_classes.items()}
    cycle = _label_cycle(cfg, num_classes)
    return SamplePlan(model.kind, digest, levels, shapes, sizes, image_shape, cycle, conditional, files)


def _label_cycle(cfg: SampleConfig, num_classes: dict[str, int]) -> list[int] | None:
    counts = {k for k in num_classes.values() if k > 0}
    if len(counts) > 1:
        raise CheckpointError(f"the priors disagree on the number of classes: {num_classes}; rerun train_prior")
    if not counts:
        if cfg.labels is not None:
            raise ValueError("sample.labels given, but the priors are not class-conditional (num_classes=0)")
        return None
    (k,) = counts
    if cfg.labels is None:
        return list(range(k))
    bad = [v for v in cfg.labels if v >= k]
    if bad:
        raise ValueError(f"sample.labels must be in [0, {k}) (the priors' num_classes), got {bad}")
    return list(cfg.labels)


# ------------------------------------------------------------------------------------------------ actor
class ShardSampler:
    """Draws and writes whole shards; a Ray actor holds one, so the checkpoints load once per actor."""

    def __init__(self, cfg: SampleConfig, plan: SamplePlan, out: str) -> None:
        torch.set_num_threads(cfg.cpus_per_actor)
        self.cfg, self.plan, self.out = cfg, plan, out
        self.device = torch.device("cuda" if cfg.use_gpu else "cpu")
        self.model = self._load("model", AUTOENCODER_KINDS)
        self.priors = {lv: self._load(lv, "prior") for lv in plan.levels}

    def _load(self, name: str, expect: str | tuple[str, ...]) -> torch.nn.Module:
        """A checkpoint the driver checked; refuses one that was replaced since."""
        uri, digest = self.plan.files[name]
        data = read_bytes(uri)
        if (got := _digest(data)) != digest:
            raise CheckpointError(f"{uri} changed after the driver checked it (digest {got}, checked {digest})")
        return load_model(data, expect=expect)[0].to(self.device)

    @torch.no_grad()
    def draw(self, start: int, count: int, seed: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Images (count, C, S, S) in [-1, 1] and code maps per level (count, H, W) of one shard."""
        cfg, plan = self.cfg, self.plan
        if plan.kind == "vae":
            g = torch.Generator().manual_seed(seed)  # VAE.sample draws on the CPU: same images on any device
            return self.model.sample(count, generator=g, temperature=cfg.temperature), {}
        g = torch.Generator(device=self.device).manual_seed(seed)
        labels = plan.labels_for(start, count)
        labels_t = torch.tensor(labels, device=self.device) if labels is not None else None
        codes: dict[str, torch.Tensor] = {}
        cond = None
        for lv in plan.levels:
            lab = labels_t if plan.conditional[lv] else None
            codes[lv] = sample_naive(
                self.priors[lv], count, labels=lab, cond=cond, temperature=cfg.temperature, generator=g
            )  # (count, H, W)
            cond = codes[lv]
        return self.model.decode_codes(*codes.values()), codes

    def run_shard(self, shard: int) -> dict[str, Any]:
        """Sample shard ``shard``, write its PNGs and codes part, and return its metadata."""
        cfg, plan = self.cfg, self.plan
        start = shard * cfg.shard_size
        count = min(cfg.shard_size, cfg.num_samples - start)
        seed = shard_seed(cfg.seed, shard)
        t0 = time.perf_counter()
        images, codes = self.draw(start, count, seed)
        pixels = to_uint8(images)  # (count, S, S) or (count, S, S, 3)
        if cfg.write_pngs:
            for i in range(count):
                write_bytes(join(self.out, "images", f"{start + i:06d}.png"), encode_png(pixels[i]))
        if codes:
            table = pa.table(
                {
                    "id": [f"sample-{start + i:06d}" for i in range(count)],
                    "label": plan.labels_for(start, count) or [None] * count,
                    "seed": [seed] * count,
                    **{lv: _code_column(c, math.prod(plan.shapes[lv])) for lv, c in codes.items()},
                },
                schema=plan.schema(),
            )
            sink = pa.BufferOutputStream()
            pq.write_table(table, sink)
            write_bytes(join(self.out, "codes", f"part-{shard:05d}.parquet"), sink.getvalue().to_pybytes())
        in_grid = max(0, min(count, cfg.grid_size - start))
        return {
            "shard": shard,
            "start": start,
            "count": count,
            "seconds": time.perf_counter() - t0,
            "grid": pixels[:in_grid].copy() if in_grid else None,
        }


def _code_column(codes: torch.Tensor, size: int) -> pa.FixedSizeListArray:
    flat = codes.reshape(-1).cpu().numpy().astype(np.int16)  # (count * H * W,), raster order per sample
    return pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.int16()), size)


def _grid(pixels: np.ndarray) -> bytes:
    """uint8 (B, S, S) or (B, S, S, 3) -> the PNG grid of :func:`steps.images.grid_png`."""
    x = torch.from_numpy(pixels)
    x = x[:, None] if x.dim() == 3 else x.permute(0, 3, 1, 2)  # (B, C, S, S)
    return grid_png(x.float() / 127.5 - 1.0)  # exact: grid_png maps back to the same uint8 values


def _reset(out: str) -> None:
    """Empty ``out``: it may hold the leftovers of a crashed attempt."""
    fs, path = filesystem(out)
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        fs.delete_dir_contents(path)
    fs.create_dir(path, recursive=True)


def _warn_resources(cfg: SampleConfig, num_actors: int) -> None:
    have = ray.cluster_resources()
    need = {"CPU": num_actors * cfg.cpus_per_actor, "GPU": num_actors if cfg.use_gpu else 0}
    for name, n in need.items():
        if n > have.get(name, 0):  # on an autoscaling cluster they may still come
            log.warning("sample: %d actors need %s %s, the cluster has %s now", num_actors, n, name, have.get(name, 0))


# ------------------------------------------------------------------------------------------------ step
def run(cfg: SampleConfig, inputs: Mapping[str, str], out: str, sink: MetricsSink | None = None) -> StepResult:
    """Draw ``cfg.num_samples`` images on a pool of Ray actors and write them under ``out``.

    Args:
        cfg: step settings.
        inputs: ``{"train_vqvae": uri, "train_prior": uri}``; no ``train_prior`` for a VAE.
        out: output URI; emptied first.
        sink: unused; the result's metrics are logged by the orchestrator.

    Returns:
        metrics ``num_samples``, ``samples_per_s``; artifacts ``grid``, ``images`` (if written), ``codes`` (not for
        a VAE), ``metadata``.

    Raises:
        MissingInputError: an upstream output or prior checkpoint is missing.
        CheckpointError: the checkpoints do not belong together (digest, level, shape or codebook mismatch).
        ValueError: ``cfg.labels`` do not fit the priors.
    """
    t0 = time.perf_counter()
    plan = make_plan(cfg, inputs)  # every check happens before an actor starts
    _reset(out)
    shards = list(range(math.ceil(cfg.num_samples / cfg.shard_size)))
    num_actors = min(cfg.num_actors, len(shards))
    _warn_resources(cfg, num_actors)
    # Actors read the checkpoints from storage, which must be shared on a cluster anyway (they write to ``out``).
    # Shards are deterministic and written atomically, so a retried shard on a restarted actor is harmless.
    actor_cls = ray.remote(ShardSampler).options(
        num_cpus=cfg.cpus_per_actor, num_gpus=1 if cfg.use_gpu else 0, max_restarts=2, max_task_retries=2
    )
    actors = [actor_cls.remote(cfg, plan, out) for _ in range(num_actors)]
    grid_parts: dict[int, np.ndarray] = {}
    shard_seconds = 0.0
    try:
        pool = ActorPool(actors)
        for done, meta in enumerate(pool.map_unordered(lambda a, k: a.run_shard.remote(k), shards), 1):
            shard_seconds += meta["seconds"]
            if meta["grid"] is not None:
                grid_parts[meta["start"]] = meta["grid"]
            log.info("sample: %d/%d shards", done, len(shards))
    finally:
        for actor in actors:
            ray.kill(actor)
    write_bytes(join(out, "grid.png"), _grid(np.concatenate([grid_parts[s] for s in sorted(grid_parts)])))
    seconds = time.perf_counter() - t0
    samples_per_s = cfg.num_samples / seconds
    write_json(
        join(out, "samples.json"),
        {
            "num_samples": cfg.num_samples,
            "seed": cfg.seed,
            "shard_size": cfg.shard_size,
            "num_shards": len(shards),
            "temperature": cfg.temperature,
            "labels": plan.label_cycle,  # cycled over the samples; per-sample labels are in the codes
            "kind": plan.kind,
            "vqvae": plan.vqvae,
            "priors": {lv: plan.files[lv][1] for lv in plan.levels},
            "levels": list(plan.levels),
            "shapes": plan.shapes,
            "codebook_size": plan.codebook_size,
            "image_shape": plan.image_shape,
            "num_actors": num_actors,
            "seconds": seconds,
            "shard_seconds": shard_seconds,
            "samples_per_s": samples_per_s,
            "config": asdict(cfg),
        },
    )
    log.info("sample: %d samples in %.1f s (%.1f samples/s)", cfg.num_samples, seconds, samples_per_s)
    artifacts = {"grid": join(out, "grid.png")}
    if cfg.write_pngs:
        artifacts["images"] = join(out, "images")
    if plan.levels:
        artifacts["codes"] = join(out, "codes")
    artifacts["metadata"] = join(out, "samples.json")
    return StepResult(
        metrics={"num_samples": float(cfg.num_samples), "samples_per_s": samples_per_s},
        artifacts=artifacts,
        info={"num_shards": len(shards), "vqvae": plan.vqvae},
    )
