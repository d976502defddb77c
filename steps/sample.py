"""The sample step: draw new images from the trained models at scale (VQ-VAE-2, Razavi et al. 2019, sections 3.2, 4).

What one image is, and how its seed makes it reproducible, is :mod:`steps.generation.generator`; classifier-based
rejection is :mod:`steps.generation.rejection`; the output layout and what an interrupted run may keep is
:mod:`steps.artifacts.samples`. This module is the Ray part around them:

1. :func:`make_plan` (driver): open the autoencoder, the priors and the classifier, check that they belong together
   (:func:`steps.artifacts.compat.check_compatible`) and fit the settings, before any actor starts;
2. the ``num_samples`` samples are cut into shards of ``shard_size``; :class:`ShardSampler` actors (one per GPU with
   ``use_gpu``) load the models once and draw whole shards, each writing its PNGs, its Parquet part of sampled codes
   and, last, its record, returning only small metadata (plus the pixels that go into the grid);
3. the driver logs progress as shards finish, then writes the grid and ``samples.json``.

Sample ``i`` attempt ``a`` uses seed :func:`steps.generation.generator.sample_seed` ``(seed, i, a)`` and label
``labels[i % len(labels)]``: a sample does not depend on the shard it lands in, the number of actors or the order in
which shards finish, and the same settings give byte-identical images. A rerun after an interruption keeps the
finished shards of the same settings and checkpoints and draws the rest, with the same result.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import pyarrow as pa
import ray
import torch
from ray.util import ActorPool

from steps.artifacts.autoencoder import Autoencoder, decoding
from steps.artifacts.checkpoints import CheckpointFile
from steps.artifacts.code_format import CodeMeta
from steps.artifacts.compat import check_classifier, check_compatible
from steps.artifacts.priors import Priors
from steps.artifacts.samples import REJECTION, SamplesWriter, sample_id, sampled_codes
from steps.core.step import MetricsSink, StepResult, require_input
from steps.core.watchdog import Heartbeat, watched
from steps.generation.generator import ImageGenerator, sample_seed
from steps.generation.rejection import Rejection, draw_accepted
from steps.io import storage
from steps.io.pixels import chw, encode_png, grid_png, to_uint8
from steps.nn.config import ConfigBase, no_effect
from steps.nn.draw import ControlError, SamplingControls

log = logging.getLogger(__name__)
REJECTED = tuple(f.name for f in REJECTION)  # the rejection outcome per sample, beside its codes

STEP = "sample"


@dataclass(frozen=True)
class SampleConfig(ConfigBase):
    """Settings of the sample step.

    Attributes:
        num_samples: how many images to draw.
        shard_size: samples per work unit (and per batch); samples have their own seeds, so it does not change
            the images beyond float rounding of batched arithmetic.
        seed: base seed; sample ``i``'s attempt ``a`` uses :func:`sample_seed` ``(seed, i, a)``.
        temperature: divides the priors' logits (scales the VAE's latent draws); < 1 gives safer samples.
        top_k: keep only the ``top_k`` most likely codes at each position (0: off).
        top_p: keep the smallest set of most likely codes whose probability reaches ``top_p`` (1.0: off).
        guidance_scale: classifier-free guidance (1.0: off; > 1 follows the class more closely, at some cost in
            diversity); needs class-conditional priors trained with ``prior.<level>.class_dropout > 0``.
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
        grid_size: the first ``grid_size`` samples are tiled into ``grid.png``; for class-conditional priors with one
            column per label of the cycle (so each column shows one class), in whole rows.
        stall_timeout_s: writing a shard's files without progress for this long fails the shard, naming it (a hung
            mount); 0: no limit.
    """

    num_samples: int = 64
    shard_size: int = 32
    seed: int = 0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    guidance_scale: float = 1.0
    labels: Optional[list[int]] = None  # noqa: UP045 - OmegaConf structured configs need typing.Optional
    classifier: Optional[str] = None  # noqa: UP045
    reject_threshold: float = 0.0
    max_attempts: int = 10
    num_actors: int = no_effect(2)
    cpus_per_actor: int = no_effect(1)
    use_gpu: bool = False
    write_pngs: bool = True
    grid_size: int = 64
    stall_timeout_s: float = no_effect(600.0)  # writing a shard without progress this long fails, naming it (0: off)

    def validate(self) -> None:
        self.require_min(1, "num_samples", "shard_size", "num_actors", "cpus_per_actor", "grid_size", "max_attempts")
        self.require("seed", 0 <= self.seed < 2**32, "an int in [0, 2**32)")
        self.require("stall_timeout_s", self.stall_timeout_s >= 0, "seconds >= 0 (0: no limit)")
        try:
            self.controls  # noqa: B018 - the controls' own check, named as this config's fields
        except ControlError as exc:
            raise self.error(exc.field, exc.problem) from None
        self.require("reject_threshold", 0 <= self.reject_threshold < 1, "a number in [0, 1)")
        self.require("classifier", self.classifier is None or bool(self.classifier), "None or a checkpoint URI")
        if self.reject_threshold > 0 and self.classifier is None:
            raise self.error("reject_threshold", "> 0 needs sample.classifier (a classifier checkpoint URI)")
        if self.labels is not None:
            ok = bool(self.labels) and all(v >= 0 for v in self.labels)
            self.require("labels", ok, "None or a non-empty list of ints >= 0")

    @property
    def controls(self) -> SamplingControls:
        return SamplingControls(**{name: getattr(self, name) for name in SamplingControls.names()})


# ------------------------------------------------------------------------------------------------ plan (driver)
@dataclass(frozen=True)
class SamplePlan:
    """What the driver checked and every actor needs: the artifacts (checkpoints travel without their bytes and are
    re-read, digest-checked, where they load) and the label cycle."""

    autoencoder: Autoencoder
    priors: Priors | None
    classifier: CheckpointFile | None
    label_cycle: Optional[list[int]]  # noqa: UP045
    num_classes: int = 0

    @property
    def levels(self) -> tuple[str, ...]:
        return self.autoencoder.levels

    def labels_of(self, indices: list[int]) -> list[int] | None:
        """Labels of the samples at global ``indices``, or None without class conditioning."""
        cycle = self.label_cycle
        return None if cycle is None else [cycle[i % len(cycle)] for i in indices]

    def digests(self) -> dict[str, str]:
        """The checkpoints the samples depend on."""
        out = {"model": self.autoencoder.digest}
        out.update({lv: self.priors.checkpoint(lv).digest for lv in self.levels})
        if self.classifier is not None:
            out["classifier"] = self.classifier.digest
        return out

    @property
    def meta(self) -> CodeMeta:
        """What the sampled codes are (the code format of the code dataset)."""
        return CodeMeta.of(self.autoencoder, self.num_classes or None)


def make_plan(cfg: SampleConfig, inputs: Mapping[str, str]) -> SamplePlan:
    """Open the models and check that they belong together and fit ``cfg`` (before any actor starts).

    Raises:
        MissingInputError: an upstream output, prior or classifier checkpoint is missing.
        CheckpointError: the checkpoints do not belong together (digest, level, shape, codebook or class mismatch).
        ValueError: ``cfg.labels`` or ``cfg.classifier`` do not fit the models.
    """
    autoencoder = decoding(inputs, STEP)
    if not autoencoder.makes_codes:
        for name in ("labels", "classifier"):
            if getattr(cfg, name) is not None:
                raise ValueError(
                    f"sample.{name} given, but {autoencoder.model_uri} holds a {autoencoder.kind}, which is not "
                    "class-conditional"
                )
        return SamplePlan(autoencoder, None, None, None)
    priors = Priors.open(require_input(inputs, STEP, "train_prior"))
    num_classes = check_compatible(autoencoder, priors=priors)
    cycle = _label_cycle(cfg, num_classes)
    guidable = any(priors.guidable(lv) for lv in autoencoder.levels)
    cfg.controls.check_guidance(guidable, where=f"the priors at {priors.uri} have none (sample.guidance_scale)")
    classifier = None
    if cfg.classifier is not None:
        uri = storage.absolute(cfg.classifier)  # actors may run elsewhere
        hint = "see python -m steps.train_classifier"
        classifier = CheckpointFile.open(uri, "classifier", "sample.classifier (a classifier checkpoint)", hint)
        check_classifier(classifier, autoencoder, num_classes)
    return SamplePlan(autoencoder, priors, classifier, cycle, num_classes)


def _label_cycle(cfg: SampleConfig, num_classes: int) -> list[int] | None:
    if not num_classes:
        if cfg.labels is not None:
            raise ValueError("sample.labels given, but the priors are not class-conditional (num_classes=0)")
        return None
    if cfg.labels is None:
        return list(range(num_classes))
    bad = [v for v in cfg.labels if v >= num_classes]
    if bad:
        raise ValueError(f"sample.labels must be in [0, {num_classes}) (the priors' num_classes), got {bad}")
    return list(cfg.labels)


# ------------------------------------------------------------------------------------------------ actor
class ShardSampler:
    """Draws and writes whole shards; a Ray actor holds one, so the models load once per actor."""

    def __init__(self, cfg: SampleConfig, plan: SamplePlan, out: str) -> None:
        torch.set_num_threads(cfg.cpus_per_actor)
        self.cfg, self.plan, self.writer = cfg, plan, SamplesWriter(out)
        device = torch.device("cuda" if cfg.use_gpu else "cpu")
        self.generator = ImageGenerator(plan.autoencoder, plan.priors, device)
        self.rejection = None
        if plan.classifier is not None:
            self.rejection = Rejection(plan.classifier.load(device), cfg.reject_threshold, cfg.max_attempts)

    def run_shard(self, shard: int) -> dict[str, Any]:
        """Sample shard ``shard``, write its PNGs and codes part, and return its metadata."""
        cfg, plan = self.cfg, self.plan
        start = shard * cfg.shard_size
        count = min(cfg.shard_size, cfg.num_samples - start)
        indices = list(range(start, start + count))
        labels = plan.labels_of(indices)
        t0 = time.perf_counter()
        if self.rejection is not None:
            pixels, codes, info = draw_accepted(self.generator, self.rejection, indices, labels, cfg.seed, cfg.controls)
            seeds = info["seed"].tolist()
        else:
            seeds = [sample_seed(cfg.seed, i) for i in indices]
            images, codes = self.generator.draw(seeds, labels, cfg.controls)
            pixels, info = to_uint8(images), {"draws": count}  # (count, S, S) or (count, S, S, 3)
        rejection = {k: info[k].tolist() for k in REJECTED} if self.rejection is not None else None
        table = (
            sampled_codes([sample_id(i) for i in indices], labels, codes, plan.meta, seeds, rejection)
            if codes
            else None
        )
        what = f"writing sample shard {shard} (samples {start} to {start + count - 1}) into {self.writer.out}"
        watched(functools.partial(self._write, shard, start, pixels, table), what, cfg.stall_timeout_s)
        in_grid = max(0, min(count, cfg.grid_size - start))
        record = {
            "shard": shard,
            "start": start,
            "count": count,
            "draws": int(info["draws"]),
            "accepted": int(info["accepted"].sum()) if self.rejection is not None else count,
            "cache_bytes": dict(self.generator.cache_bytes),
            "seconds": time.perf_counter() - t0,
        }
        # last: the shard is complete
        watched(lambda beat: self.writer.write_record(shard, record), f"{what}: its record", cfg.stall_timeout_s)
        return {**record, "grid": pixels[:in_grid].copy() if in_grid else None}

    def _write(self, shard: int, start: int, pixels: np.ndarray, codes: pa.Table | None, beat: Heartbeat) -> None:
        """The shard's PNGs and codes part (its record goes last, after this returns)."""
        for i in range(len(pixels) if self.cfg.write_pngs else 0):
            beat(f"writing image {start + i}")
            self.writer.write_image(start + i, encode_png(pixels[i]))
        if codes is not None:
            beat("writing the codes part")
            self.writer.write_codes(shard, codes)


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
        inputs: ``{"train_vqvae": uri, "train_prior": uri}``, and ``tune_decoder`` when it ran (its decoder is then
            the one used); no ``train_prior`` for a VAE.
        out: output URI; emptied first, except for the finished shards of an interrupted run of the same settings.
        sink: unused; the result's metrics are logged by the orchestrator.

    Returns:
        metrics ``num_samples``, ``samples_per_s`` (and with a classifier ``acceptance_rate``,
        ``draws_per_sample``, ``failed_samples``); artifacts ``grid``, ``images`` (if written), ``codes`` (not for
        a VAE), ``metadata``.

    Raises:
        MissingInputError, CheckpointError, ValueError: see :func:`make_plan`; raised before ``out`` is touched.
    """
    t0 = time.perf_counter()
    plan = make_plan(cfg, inputs)  # every check happens before an actor starts
    num_shards = math.ceil(cfg.num_samples / cfg.shard_size)
    writer = SamplesWriter(out)
    done = writer.resume({"config": cfg.result_dict(), "files": plan.digests()}, num_shards)
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
        for meta in ActorPool(actors).map_unordered(lambda a, k: a.run_shard.remote(k), shards):
            grid = meta.pop("grid")
            if grid is not None:
                grid_parts[meta["start"]] = grid
            old = records.get(meta["shard"])  # a kept grid shard drawn again replaces its record
            for k in totals:
                totals[k] += meta[k] - (old[k] if old else 0)
            records[meta["shard"]], drawn = meta, drawn + meta["count"]
            _log_progress(len(records), num_shards, totals, cfg.num_samples, drawn / (time.perf_counter() - t0), plan)
    finally:
        for actor in actors:
            ray.kill(actor)
    seconds = time.perf_counter() - t0
    samples_per_s = drawn / seconds  # this run's rate: shards kept from an interrupted run are not counted
    metrics = {"num_samples": float(cfg.num_samples), "samples_per_s": samples_per_s}
    rejection = _rejection_summary(cfg, plan, totals, metrics)
    ae = plan.autoencoder
    meta = {
        "num_samples": cfg.num_samples,
        "seed": cfg.seed,
        "seeds": "per sample: steps.generation.generator.sample_seed(seed, index, attempt)",
        "shard_size": cfg.shard_size,
        "num_shards": num_shards,
        "resumed_shards": kept,
        **cfg.controls.to_dict(),
        "labels": plan.label_cycle,  # cycled over the samples; per-sample labels are in the codes
        "kind": ae.kind,
        "vqvae": ae.digest,
        "priors": {lv: plan.priors.checkpoint(lv).digest for lv in plan.levels},
        "levels": list(plan.levels),
        "shapes": {lv: list(s) for lv, s in ae.shapes.items()} or {"latent": list(ae.config.latent_shape)},
        "codebook_size": ae.codebook_sizes,
        "image_shape": list(ae.image_shape),
        "sampler": "cached" if plan.levels else None,
        # the largest sampler caches of one shard, per level
        "cache_bytes": {lv: max(r["cache_bytes"][lv] for r in records.values()) for lv in plan.levels},
        **rejection,
        "num_actors": num_actors,
        "seconds": seconds,
        "shard_seconds": totals["seconds"],
        "samples_per_s": samples_per_s,
        "config": cfg.to_dict(),
    }
    pixels = np.concatenate([grid_parts[s] for s in sorted(grid_parts)])
    cycle = plan.label_cycle
    # Class-conditional samples: one column per label of the cycle (column j: label cycle[j]), whole rows only.
    columns = len(cycle) if cycle and 1 < len(cycle) <= 16 and len(pixels) >= len(cycle) else None
    if columns:
        pixels = pixels[: len(pixels) // columns * columns]
    meta["grid_columns"] = cycle if columns else None
    grid = grid_png(chw(pixels), nrow=columns)  # exact: uint8 tiled as is
    artifacts = writer.finish(grid, meta, pngs=cfg.write_pngs, codes=bool(plan.levels))
    log.info("sample: %d samples in %.1f s (%.2f samples/s)", cfg.num_samples, seconds, samples_per_s)
    info = {"num_shards": num_shards, "resumed_shards": kept, "vqvae": ae.digest}
    return StepResult(metrics=metrics, artifacts=artifacts, info=info)


def _log_progress(
    done: int, shards: int, totals: dict[str, float], num_samples: int, rate: float, plan: SamplePlan
) -> None:
    accept = f", acceptance {totals['accepted'] / totals['draws']:.1%}" if plan.classifier is not None else ""
    left = (num_samples - totals["count"]) / rate
    log.info(
        "sample: %d/%d shards, %d/%d samples, %.2f samples/s, ~%.0f s left%s",
        *(done, shards, totals["count"], num_samples, rate, left, accept),
    )


def _rejection_summary(
    cfg: SampleConfig, plan: SamplePlan, totals: dict[str, float], metrics: dict[str, float]
) -> dict[str, Any]:
    """The rejection figures for ``samples.json`` (and into ``metrics``); a warning if samples never passed."""
    if plan.classifier is None:
        return {"classifier": None}
    failed = cfg.num_samples - totals["accepted"]
    metrics["acceptance_rate"] = totals["accepted"] / totals["draws"]
    metrics["draws_per_sample"] = totals["draws"] / cfg.num_samples
    metrics["failed_samples"] = float(failed)
    if failed:
        log.warning(
            "sample: %d of %d samples never reached class probability %.3f in %d attempts (acceptance rate "
            "%.1f%%); they keep their most likely draw and accepted=false in the codes. Lower "
            "sample.reject_threshold or raise sample.max_attempts.",
            *(failed, cfg.num_samples, cfg.reject_threshold, cfg.max_attempts, 100 * metrics["acceptance_rate"]),
        )
    return {
        "classifier": plan.classifier.digest,
        "reject_threshold": cfg.reject_threshold,
        "max_attempts": cfg.max_attempts,
        "draws": totals["draws"],
        "accepted": totals["accepted"],
        "acceptance_rate": metrics["acceptance_rate"],
        "failed_samples": failed,
    }
