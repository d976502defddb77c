"""The sample step: draw new images from the trained priors (VQ-VAE-2, Razavi et al. 2019, sections 3.2 and 4).

For a VQ-VAE-2, every sample draws a top code map from the top prior, then a bottom code map from the bottom prior
conditioned on those top codes, then decodes both to pixels; a one-level VQ-VAE has only the top prior, and the VAE
baseline decodes N(0, temperature^2 I) draws with no prior at all. Codes come from the cached sampler
(:mod:`steps.nn.sampler`), with temperature, top-k and top-p filtering.

Seeds. Sample ``i`` draws all its randomness (top codes, then bottom codes, or the VAE latent) from its own CPU
generator seeded with :func:`sample_seed` ``(seed, i, attempt)``, and labels come from the global sample index. A
sample therefore does not depend on the shard it lands in, the number of actors, the order in which shards finish or
the device (up to float rounding); the same config gives byte-identical images.

Rejection (section 4 of the paper). With ``classifier`` (a checkpoint from ``python -m steps.train_classifier``) and
class-conditional priors, a sample is redrawn (attempt 1, 2, ...) until the classifier gives its label a probability
of at least ``reject_threshold``, for at most ``max_attempts`` attempts; a sample that never passes keeps its most
likely attempt and is marked ``accepted=false`` (with a warning). The acceptance rate (passing draws / draws) is in the
result metrics and ``samples.json``.

The ``num_samples`` samples are cut into shards of ``shard_size``. Shards run on a pool of Ray actors (one per GPU
with ``use_gpu``) that load the checkpoints once; each writes its PNGs and its Parquet part of sampled codes straight
under ``out`` and returns only small metadata (plus the pixels of the samples that go into the grid), so the driver
never holds all samples. The driver logs progress as shards finish.

Outputs: ``images/{index:06d}.png``, ``codes/part-{shard:05d}.parquet`` (not for the VAE), ``grid.png`` and, last,
``samples.json``.

Resuming. Each shard's files are written atomically and its record ``shards/part-{shard:05d}.json`` goes last, so a
shard with a record is complete. A run that finds records from an interrupted run of the same settings and
checkpoints (``shards/settings.json``) keeps those shards and draws only the rest; since samples depend only on their
index and seed, the result is the same as an uninterrupted run. Anything else in ``out`` is cleared first.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
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

from steps.codes import model_digest
from steps.common import (
    MetricsSink,
    MissingInputError,
    StepResult,
    exists,
    filesystem,
    join,
    read_bytes,
    read_json,
    require_input,
    write_bytes,
    write_json,
)
from steps.images import encode_png, grid_png, to_uint8
from steps.nn.checkpoint import CheckpointError, load_model
from steps.nn.sampler import CachedSampler

log = logging.getLogger(__name__)

STEP = "sample"
SAMPLES_META_KEY = b"vqvae2.samples"
AUTOENCODER_KINDS = ("vqvae2", "vqvae", "vae")


@dataclass(frozen=True)
class SampleConfig:
    """Settings of the sample step.

    Attributes:
        num_samples: how many images to draw.
        shard_size: samples per work unit (and per batch); samples have their own seeds, so it does not change
            the images beyond float rounding of batched arithmetic.
        seed: base seed; sample ``i``'s attempt ``a`` uses :func:`sample_seed` ``(seed, i, a)``.
        temperature: divides the priors' logits (scales the VAE's latent draws); < 1 gives safer samples.
        top_k: keep only the ``top_k`` most likely codes at each position (0: off).
        top_p: keep the smallest set of most likely codes whose probability reaches ``top_p`` (1.0: off).
        labels: class label per sample, cycled over the samples; only for class-conditional priors. None with
            class-conditional priors cycles ``0 .. num_classes - 1``.
        classifier: URI of a classifier checkpoint (``python -m steps.train_classifier``) for classifier-based
            rejection; needs class-conditional priors. None: no rejection.
        reject_threshold: keep a draw when the classifier gives its label at least this probability.
        max_attempts: draws per sample at most; a sample that never passes keeps its most likely draw.
        num_actors: size of the Ray actor pool (capped at the number of shards); with ``use_gpu``, one actor per
            GPU of the cluster instead (``num_actors`` while the cluster shows no GPU).
        cpus_per_actor: CPUs each actor reserves, and its torch thread count.
        use_gpu: give each actor one GPU and sample on it (random streams stay on the CPU, so the codes match
            CPU ones up to float rounding).
        write_pngs: write one PNG per sample under ``images/``.
        grid_size: the first ``grid_size`` samples are tiled into ``grid.png``.
    """

    num_samples: int = 64
    shard_size: int = 32
    seed: int = 0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    labels: Optional[list[int]] = None  # noqa: UP045 - OmegaConf structured configs need typing.Optional
    classifier: Optional[str] = None  # noqa: UP045
    reject_threshold: float = 0.0
    max_attempts: int = 10
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
        _check_int("top_k", self.top_k, 0)
        _check_int("max_attempts", self.max_attempts, 1)
        if self.seed >= 2**32:
            raise ValueError(f"sample.seed must be < 2**32, got {self.seed}")
        if type(self.temperature) not in (int, float) or not self.temperature > 0:
            raise ValueError(f"sample.temperature must be a number > 0, got {self.temperature!r}")
        if type(self.top_p) not in (int, float) or not 0 < self.top_p <= 1:
            raise ValueError(f"sample.top_p must be a number in (0, 1] (1: off), got {self.top_p!r}")
        if type(self.reject_threshold) not in (int, float) or not 0 <= self.reject_threshold < 1:
            raise ValueError(f"sample.reject_threshold must be a number in [0, 1), got {self.reject_threshold!r}")
        if self.classifier is not None and (not isinstance(self.classifier, str) or not self.classifier):
            raise ValueError(f"sample.classifier must be None or a checkpoint URI, got {self.classifier!r}")
        if self.reject_threshold > 0 and self.classifier is None:
            raise ValueError("sample.reject_threshold > 0 needs sample.classifier (a classifier checkpoint URI)")
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


def sample_seed(seed: int, index: int, attempt: int = 0) -> int:
    """The generator seed of attempt ``attempt`` of sample ``index``: a fixed hash (never Python's salted ``hash``).

    Below 2**63, so it fits the int64 ``seed`` column; ``torch.Generator().manual_seed(...)`` on it reproduces the
    sample (top codes, then bottom codes, from the one generator).
    """
    digest = hashlib.sha256(f"vqvae2-sample/{seed}/{index}/{attempt}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


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
    files: dict[str, tuple[str, str]] = field(default_factory=dict)  # "model" / level / "classifier" -> (uri, digest)

    @property
    def rejection(self) -> bool:
        return "classifier" in self.files

    def labels_of(self, indices: list[int]) -> list[int] | None:
        """Labels of the samples at global ``indices``, or None without class conditioning."""
        cycle = self.label_cycle
        return None if cycle is None else [cycle[i % len(cycle)] for i in indices]

    def schema(self) -> pa.Schema:
        """Arrow schema of a codes part: id, label, seed, [attempt, class_prob, accepted,] one int16 list per level."""
        cols = [pa.field("id", pa.string()), pa.field("label", pa.int32()), pa.field("seed", pa.int64())]
        if self.rejection:
            cols += [pa.field("attempt", pa.int32()), pa.field("class_prob", pa.float32())]
            cols += [pa.field("accepted", pa.bool_())]
        cols += [pa.field(lv, pa.list_(pa.int16(), math.prod(self.shapes[lv]))) for lv in self.levels]
        meta = {"vqvae": self.vqvae, "levels": list(self.levels), "codebook_size": self.codebook_size}
        meta.update({f"{lv}_shape": self.shapes[lv] for lv in self.levels})
        return pa.schema(cols, metadata={SAMPLES_META_KEY: json.dumps(meta, sort_keys=True).encode()})


def make_plan(cfg: SampleConfig, inputs: Mapping[str, str]) -> SamplePlan:
    """Read the checkpoints and check that they belong together and fit ``cfg``."""
    model_uri = join(require_input(inputs, STEP, "train_vqvae"), "model.pt")
    data = read_bytes(model_uri)
    model, _ = load_model(data, expect=AUTOENCODER_KINDS)
    mcfg, digest = model.config, model_digest(data)
    files = {"model": (model_uri, digest)}
    image_shape = [mcfg.in_channels, mcfg.image_size, mcfg.image_size]
    if model.kind == "vae":
        for name in ("labels", "classifier"):
            if getattr(cfg, name) is not None:
                raise ValueError(f"sample.{name} given, but {model_uri} holds a VAE, which is not class-conditional")
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
        files[lv] = (uri, model_digest(data))
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
    if cfg.classifier is not None:
        files["classifier"] = _check_classifier(cfg.classifier, image_shape, max(num_classes.values()))
    return SamplePlan(model.kind, digest, levels, shapes, sizes, image_shape, cycle, conditional, files)


def _check_classifier(uri: str, image_shape: list[int], num_classes: int) -> tuple[str, str]:
    """(uri, digest) of a classifier that fits the images and the priors' classes."""
    if num_classes == 0:
        raise ValueError(
            "sample.classifier given, but the priors are not class-conditional: rejection keeps samples whose "
            "label the classifier confirms; train the priors with train_prior.class_conditional=true"
        )
    uri = uri if "://" in uri else os.path.abspath(os.path.expanduser(uri))  # actors may run elsewhere
    try:
        data = read_bytes(uri)
    except FileNotFoundError:
        raise MissingInputError(
            f"sample.classifier {uri} does not exist; see python -m steps.train_classifier"
        ) from None
    cc = load_model(data, expect="classifier")[0].config
    if [cc.in_channels, cc.image_size, cc.image_size] != image_shape or cc.num_classes != num_classes:
        raise CheckpointError(
            f"sample.classifier {uri} takes {cc.in_channels}x{cc.image_size}x{cc.image_size} images and "
            f"{cc.num_classes} classes, but the models make {'x'.join(map(str, image_shape))} images of "
            f"{num_classes} classes"
        )
    return uri, model_digest(data)


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
        self.samplers = {lv: CachedSampler(self._load(lv, "prior")) for lv in plan.levels}
        self.classifier = self._load("classifier", "classifier") if plan.rejection else None
        self.cache_bytes = dict.fromkeys(plan.levels, 0)  # the largest sampler caches so far, per level

    def _load(self, name: str, expect: str | tuple[str, ...]) -> torch.nn.Module:
        """A checkpoint the driver checked; refuses one that was replaced since."""
        uri, digest = self.plan.files[name]
        data = read_bytes(uri)
        if (got := model_digest(data)) != digest:
            raise CheckpointError(f"{uri} changed after the driver checked it (digest {got}, checked {digest})")
        return load_model(data, expect=expect)[0].to(self.device)

    @torch.no_grad()
    def draw(self, indices: list[int], seeds: list[int]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Images (n, C, S, S) in [-1, 1] and code maps per level (n, H, W) of the samples at ``indices``."""
        cfg, plan = self.cfg, self.plan
        # CPU generators: the same random streams whatever the device. Each level continues the streams.
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        if plan.kind == "vae":
            shape = self.model.config.latent_shape
            z = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(self.device)  # (n, *latent)
            return self.model.decode(z * cfg.temperature), {}
        labels = plan.labels_of(indices)
        labels_t = torch.tensor(labels, device=self.device) if labels is not None else None
        codes: dict[str, torch.Tensor] = {}
        cond = None
        for lv in plan.levels:
            sampler = self.samplers[lv]
            lab = labels_t if plan.conditional[lv] else None
            controls = dict(temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p)
            codes[lv] = sampler.sample(len(indices), lab, cond, generator=gens, **controls)  # (n, H, W)
            self.cache_bytes[lv] = max(self.cache_bytes[lv], sampler.cache_bytes)
            cond = codes[lv]
        return self.model.decode_codes(*codes.values()), codes

    def _class_prob(self, pixels: np.ndarray, indices: list[int]) -> np.ndarray:
        """Classifier probability (n,) of each sample's label, on the uint8 pixels that are written."""
        x = torch.from_numpy(pixels).float().div(127.5).sub(1.0)  # (n, S, S) or (n, S, S, 3)
        x = x[:, None] if x.dim() == 3 else x.permute(0, 3, 1, 2)  # (n, C, S, S)
        labels = torch.tensor(self.plan.labels_of(indices), device=self.device)
        return self.classifier.class_probability(x.to(self.device), labels).cpu().numpy().astype(np.float64)

    def draw_accepted(self, indices: list[int]) -> tuple[np.ndarray, dict[str, torch.Tensor], dict[str, Any]]:
        """Redraw each sample until its class probability reaches the threshold (at most ``max_attempts``).

        Returns:
            uint8 pixels, codes per level, and per sample ``seed``, ``attempt``, ``class_prob``, ``accepted``
            (numpy arrays) plus ``draws``, the number of samples drawn in all.
        """
        cfg, n = self.cfg, len(indices)
        info = {"seed": np.zeros(n, np.int64), "attempt": np.zeros(n, np.int32), "class_prob": np.full(n, -1.0)}
        pixels, codes, draws = None, {}, 0
        pending = np.arange(n)
        for attempt in range(cfg.max_attempts):
            idx = [indices[j] for j in pending]
            seeds = [sample_seed(cfg.seed, i, attempt) for i in idx]
            images, drawn = self.draw(idx, seeds)
            px = to_uint8(images)
            prob = self._class_prob(px, idx)
            draws += len(idx)
            if pixels is None:  # the first attempt covers every sample
                pixels, codes = px.copy(), {lv: c.clone() for lv, c in drawn.items()}
            better = prob > info["class_prob"][pending]  # keep each sample's most likely draw so far
            slots = pending[better]
            pixels[slots] = px[better]
            for lv, c in drawn.items():
                codes[lv][torch.from_numpy(slots).to(c.device)] = c[torch.from_numpy(better).to(c.device)]
            info["seed"][slots] = np.asarray(seeds, dtype=np.int64)[better]
            info["attempt"][slots], info["class_prob"][slots] = attempt, prob[better]
            pending = pending[prob < cfg.reject_threshold]
            if not len(pending):
                break
        info["accepted"] = info["class_prob"] >= cfg.reject_threshold
        info["draws"] = draws
        return pixels, codes, info

    def run_shard(self, shard: int) -> dict[str, Any]:
        """Sample shard ``shard``, write its PNGs and codes part, and return its metadata."""
        cfg, plan = self.cfg, self.plan
        start = shard * cfg.shard_size
        count = min(cfg.shard_size, cfg.num_samples - start)
        indices = list(range(start, start + count))
        t0 = time.perf_counter()
        if plan.rejection:
            pixels, codes, info = self.draw_accepted(indices)
            seeds = info["seed"].tolist()
        else:
            seeds = [sample_seed(cfg.seed, i) for i in indices]
            images, codes = self.draw(indices, seeds)
            pixels, info = to_uint8(images), {"draws": count}  # (count, S, S) or (count, S, S, 3)
        if cfg.write_pngs:
            for i in range(count):
                write_bytes(join(self.out, "images", f"{start + i:06d}.png"), encode_png(pixels[i]))
        if codes:
            columns = {
                "id": [f"sample-{i:06d}" for i in indices],
                "label": plan.labels_of(indices) or [None] * count,
                "seed": seeds,
            }
            if plan.rejection:
                columns.update({k: info[k].tolist() for k in ("attempt", "class_prob", "accepted")})
            columns.update({lv: _code_column(c, math.prod(plan.shapes[lv])) for lv, c in codes.items()})
            sink = pa.BufferOutputStream()
            pq.write_table(pa.table(columns, schema=plan.schema()), sink)
            write_bytes(join(self.out, "codes", f"part-{shard:05d}.parquet"), sink.getvalue().to_pybytes())
        in_grid = max(0, min(count, cfg.grid_size - start))
        accepted = int(info["accepted"].sum()) if plan.rejection else count
        record = {
            "shard": shard,
            "start": start,
            "count": count,
            "draws": int(info["draws"]),
            "accepted": accepted,
            "cache_bytes": dict(self.cache_bytes),
            "seconds": time.perf_counter() - t0,
        }
        write_json(shard_record(self.out, shard), record)  # last: the shard is complete
        return {**record, "grid": pixels[:in_grid].copy() if in_grid else None}


def _code_column(codes: torch.Tensor, size: int) -> pa.FixedSizeListArray:
    flat = codes.reshape(-1).cpu().numpy().astype(np.int16)  # (count * H * W,), raster order per sample
    return pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.int16()), size)


def _grid(pixels: np.ndarray) -> bytes:
    """uint8 (B, S, S) or (B, S, S, 3) -> the PNG grid of :func:`steps.images.grid_png`."""
    x = torch.from_numpy(pixels)
    x = x[:, None] if x.dim() == 3 else x.permute(0, 3, 1, 2)  # (B, C, S, S)
    return grid_png(x.float() / 127.5 - 1.0)  # exact: grid_png maps back to the same uint8 values


# Settings that only place the work; a run interrupted under other values of these still resumes.
PLACEMENT_ONLY = ("num_actors", "cpus_per_actor")


def shard_record(out: str, shard: int) -> str:
    return join(out, "shards", f"part-{shard:05d}.json")


def _settings(cfg: SampleConfig, plan: SamplePlan) -> dict[str, Any]:
    """What the samples depend on: the settings and the checkpoints' digests."""
    config = {k: v for k, v in asdict(cfg).items() if k not in PLACEMENT_ONLY}
    return {"config": config, "files": {name: digest for name, (_, digest) in sorted(plan.files.items())}}


def _prepare(out: str, cfg: SampleConfig, plan: SamplePlan, num_shards: int) -> dict[int, dict[str, Any]]:
    """The finished shards of an interrupted run of the same settings in ``out`` (kept), after clearing anything
    else there; records ``shards/settings.json`` for the next attempt."""
    fs, path = filesystem(out)
    settings = json.loads(json.dumps(_settings(cfg, plan), default=str))
    done: dict[int, dict[str, Any]] = {}
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        try:
            same = read_json(join(out, "shards", "settings.json")) == settings
        except (FileNotFoundError, OSError, ValueError):
            same = False
        if same:  # one listing, then only the records that exist are read (object stores: no miss per shard)
            listed = fs.get_file_info(pafs.FileSelector(filesystem(join(out, "shards"))[1], allow_not_found=True))
            for info in listed:
                name = info.base_name
                if not (name.startswith("part-") and name.endswith(".json") and name[5:-5].isdigit()):
                    continue
                shard = int(name[5:-5])
                if shard < num_shards:
                    try:
                        done[shard] = read_json(shard_record(out, shard))
                    except (OSError, ValueError):
                        continue
        if not done:
            fs.delete_dir_contents(path)
        else:  # keep the finished shards; drop what an unfinished one or the last run's ending left behind
            for name in ("grid.png", "samples.json"):
                if exists(join(out, name)):
                    fs.delete_file(filesystem(join(out, name))[1])
    fs.create_dir(path, recursive=True)
    write_json(join(out, "shards", "settings.json"), settings)
    return done


def _pool_size(cfg: SampleConfig, num_shards: int) -> int:
    """Actors to start: one per GPU of the cluster with ``use_gpu``, else ``num_actors``; never more than shards."""
    have = ray.cluster_resources()
    gpus = int(have.get("GPU", 0)) if cfg.use_gpu else 0
    num_actors = min(gpus or cfg.num_actors, num_shards)
    need = {"CPU": num_actors * cfg.cpus_per_actor, "GPU": num_actors if cfg.use_gpu else 0}
    for name, n in need.items():
        if n > have.get(name, 0):  # on an autoscaling cluster they may still come
            log.warning("sample: %d actors need %s %s, the cluster has %s now", num_actors, n, name, have.get(name, 0))
    return num_actors


# ------------------------------------------------------------------------------------------------ step
def run(cfg: SampleConfig, inputs: Mapping[str, str], out: str, sink: MetricsSink | None = None) -> StepResult:
    """Draw ``cfg.num_samples`` images on a pool of Ray actors and write them under ``out``.

    Args:
        cfg: step settings.
        inputs: ``{"train_vqvae": uri, "train_prior": uri}``; no ``train_prior`` for a VAE.
        out: output URI; emptied first, except for the finished shards of an interrupted run of the same settings.
        sink: unused; the result's metrics are logged by the orchestrator.

    Returns:
        metrics ``num_samples``, ``samples_per_s`` (and with a classifier ``acceptance_rate``,
        ``draws_per_sample``, ``failed_samples``); artifacts ``grid``, ``images`` (if written), ``codes`` (not for
        a VAE), ``metadata``.

    Raises:
        MissingInputError: an upstream output, prior or classifier checkpoint is missing.
        CheckpointError: the checkpoints do not belong together (digest, level, shape, codebook or class mismatch).
        ValueError: ``cfg.labels`` or ``cfg.classifier`` do not fit the models.
    """
    t0 = time.perf_counter()
    plan = make_plan(cfg, inputs)  # every check happens before an actor starts
    num_shards = math.ceil(cfg.num_samples / cfg.shard_size)
    done = _prepare(out, cfg, plan, num_shards)
    # Shards that feed the grid are drawn again (a few, and cheap): their pixels are not kept on disk.
    shards = [k for k in range(num_shards) if k not in done or k * cfg.shard_size < cfg.grid_size]
    kept = len(set(done) - set(shards))
    if done:
        log.info("sample: resuming: %d of %d shards were already written", len(done), num_shards)
    num_actors = _pool_size(cfg, len(shards))
    # Actors read the checkpoints from storage, which must be shared on a cluster anyway (they write to ``out``).
    # Shards are deterministic and written atomically, so a retried shard on a restarted actor is harmless.
    actor_cls = ray.remote(ShardSampler).options(
        num_cpus=cfg.cpus_per_actor, num_gpus=1 if cfg.use_gpu else 0, max_restarts=2, max_task_retries=2
    )
    actors = [actor_cls.remote(cfg, plan, out) for _ in range(num_actors)]
    grid_parts: dict[int, np.ndarray] = {}
    records = dict(done)  # shard -> its record, finished before or in this run
    totals = {k: sum(r[k] for r in records.values()) for k in ("count", "draws", "accepted", "seconds")}
    drawn = 0  # samples drawn by this run
    try:
        pool = ActorPool(actors)
        for meta in pool.map_unordered(lambda a, k: a.run_shard.remote(k), shards):
            grid = meta.pop("grid")
            if grid is not None:
                grid_parts[meta["start"]] = grid
            old = records.get(meta["shard"])  # a kept grid shard drawn again replaces its record
            for k in totals:
                totals[k] += meta[k] - (old[k] if old else 0)
            records[meta["shard"]], drawn = meta, drawn + meta["count"]
            rate = drawn / (time.perf_counter() - t0)
            accept = f", acceptance {totals['accepted'] / totals['draws']:.1%}" if plan.rejection else ""
            log.info(
                "sample: %d/%d shards, %d/%d samples, %.2f samples/s, ~%.0f s left%s",
                *(
                    len(records),
                    num_shards,
                    totals["count"],
                    cfg.num_samples,
                    rate,
                    (cfg.num_samples - totals["count"]) / rate,
                    accept,
                ),
            )
    finally:
        for actor in actors:
            ray.kill(actor)
    cache_bytes = {lv: max(r["cache_bytes"][lv] for r in records.values()) for lv in plan.levels}
    write_bytes(join(out, "grid.png"), _grid(np.concatenate([grid_parts[s] for s in sorted(grid_parts)])))
    seconds = time.perf_counter() - t0
    samples_per_s = drawn / seconds  # this run's rate: shards kept from an interrupted run are not counted
    metrics = {"num_samples": float(cfg.num_samples), "samples_per_s": samples_per_s}
    rejection: dict[str, Any] = {"classifier": None}
    if plan.rejection:
        failed = cfg.num_samples - totals["accepted"]
        metrics["acceptance_rate"] = totals["accepted"] / totals["draws"]
        metrics["draws_per_sample"] = totals["draws"] / cfg.num_samples
        metrics["failed_samples"] = float(failed)
        rejection = {
            "classifier": plan.files["classifier"][1],
            "reject_threshold": cfg.reject_threshold,
            "max_attempts": cfg.max_attempts,
            "draws": totals["draws"],
            "accepted": totals["accepted"],
            "acceptance_rate": metrics["acceptance_rate"],
            "failed_samples": failed,
        }
        if failed:
            log.warning(
                "sample: %d of %d samples never reached class probability %.3f in %d attempts (acceptance rate "
                "%.1f%%); they keep their most likely draw and accepted=false in the codes. Lower "
                "sample.reject_threshold or raise sample.max_attempts.",
                *(failed, cfg.num_samples, cfg.reject_threshold, cfg.max_attempts, 100 * metrics["acceptance_rate"]),
            )
    write_json(
        join(out, "samples.json"),
        {
            "num_samples": cfg.num_samples,
            "seed": cfg.seed,
            "seeds": "per sample: steps.sample.sample_seed(seed, index, attempt)",
            "shard_size": cfg.shard_size,
            "num_shards": num_shards,
            "resumed_shards": kept,
            "temperature": cfg.temperature,
            "top_k": cfg.top_k,
            "top_p": cfg.top_p,
            "labels": plan.label_cycle,  # cycled over the samples; per-sample labels are in the codes
            "kind": plan.kind,
            "vqvae": plan.vqvae,
            "priors": {lv: plan.files[lv][1] for lv in plan.levels},
            "levels": list(plan.levels),
            "shapes": plan.shapes,
            "codebook_size": plan.codebook_size,
            "image_shape": plan.image_shape,
            "sampler": "cached" if plan.levels else None,
            "cache_bytes": cache_bytes,  # the largest sampler caches of one shard, per level
            **rejection,
            "num_actors": num_actors,
            "seconds": seconds,
            "shard_seconds": totals["seconds"],
            "samples_per_s": samples_per_s,
            "config": asdict(cfg),
        },
    )
    log.info("sample: %d samples in %.1f s (%.2f samples/s)", cfg.num_samples, seconds, samples_per_s)
    artifacts = {"grid": join(out, "grid.png")}
    if cfg.write_pngs:
        artifacts["images"] = join(out, "images")
    if plan.levels:
        artifacts["codes"] = join(out, "codes")
    artifacts["metadata"] = join(out, "samples.json")
    return StepResult(
        metrics=metrics,
        artifacts=artifacts,
        info={"num_shards": num_shards, "resumed_shards": kept, "vqvae": plan.vqvae},
    )
