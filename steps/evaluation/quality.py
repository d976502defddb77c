"""What the evaluate step measures, as functions of images, models and code datasets (no Ray, no step settings).

- :func:`reconstruction`: ``recon_mse`` (images in [-1, 1]), ``psnr`` (dB, peak-to-peak 2, from the mean MSE) and
  ``ssim`` (Gaussian 11x11 window, mean over images) of an autoencoder on real images;
- :func:`code_metrics`: per level ``usage_<level>`` (fraction of the codebook used) and ``perplexity_<level>``
  (the effective number of codes) over a code dataset, and the priors' ``nll_bits_<level>`` on it;
- :func:`features` / :func:`distances`: sample quality in the pooled 1280-d feature space of ImageNet
  EfficientNet-Lite0 (:mod:`steps.nn.features`): Frechet distance, KID, k-NN precision / recall, density / coverage.
  Named ``*_effnet``, never FID: not comparable with Inception FID from papers, only between runs evaluated the same
  way;
- :func:`feature_classifier`: the second feature space, not ImageNet-trained: the project's small image classifier
  (:mod:`steps.nn.classifier`) trained on the shards' own labelled images, its pooled features scored the same way
  (``*_clf``), so that a gain that shows in one feature space only can be told from a real one;
- :func:`class_recall`: recall per class, the samples drawn for a class against the real images of that class;
- :func:`floor_spread`: how much the real-vs-real floor moves over other random splits of the real images;
- :func:`inception_fid`: the standard Inception FID through torch-fidelity (the ``fid`` extra);
- :func:`decode_codes`: images from sampled codes, when the sample step wrote no PNGs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import torch

from steps.artifacts.code_format import batch_to_tensors
from steps.artifacts.codes import CodeDataset
from steps.evaluation.cache import ContentCache, content_key
from steps.io.pixels import to_float, to_uint8_chw
from steps.nn.classifier import ClassifierConfig, ImageClassifier, fit_classifier
from steps.nn.metrics import (
    code_histogram,
    codebook_stats,
    density_coverage,
    frechet_distance_features,
    kernel_inception_distance,
    precision_recall,
    psnr,
    ssim,
)


def batches(images: np.ndarray, batch_size: int, device: torch.device) -> Iterator[torch.Tensor]:
    """uint8 (N, C, S, S) as float batches (B, C, S, S) in [-1, 1] on ``device``."""
    for start in range(0, len(images), batch_size):
        yield to_float(images[start : start + batch_size]).to(device)


@torch.no_grad()
def reconstruction(model: torch.nn.Module, images: np.ndarray, batch_size: int, device: torch.device):
    """Metrics ``recon_mse``, ``psnr``, ``ssim`` and the reconstructions as uint8 (N, C, S, S).

    Reconstructions are clamped to [-1, 1] first, as every saved image is, so a value beyond the image range
    counts only as far as it shows.
    """
    sq_err, count, ssims, recons = 0.0, 0, [], []
    for x in batches(images, batch_size, device):
        recon = model(x).recon.float().clamp(-1, 1)  # (B, C, S, S)
        sq_err += torch.sum((recon - x) ** 2).item()
        count += x.numel()
        ssims.append(ssim(recon, x).cpu())
        recons.append(to_uint8_chw(recon))
    mse = sq_err / count
    return {"recon_mse": mse, "psnr": psnr(mse), "ssim": float(torch.cat(ssims).mean())}, np.concatenate(recons)


@torch.no_grad()
def code_metrics(
    codes: CodeDataset, priors: Mapping[str, torch.nn.Module], batch_size: int, device: torch.device
) -> tuple[dict[str, float], dict[str, Any]]:
    """Usage and perplexity per level over the val codes (train if val is empty), and the priors' bits per code on
    them (for the levels given in ``priors``, which must belong to the codes' model)."""
    meta, split = codes.meta, codes.scoring_split()
    priors = {lv: p.to(device) for lv, p in priors.items()}
    counts = {lv: torch.zeros(meta.codebook_size[lv], dtype=torch.long) for lv in meta.levels}
    bits = dict.fromkeys(meta.levels, 0.0)
    rows = 0
    for table in codes.tables(split):
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
def features(
    extractor: Callable[[torch.Tensor], torch.Tensor], images: np.ndarray, batch_size: int, device: torch.device
) -> np.ndarray:
    """Features (N, D) as float64 of uint8 images (N, C, S, S), e.g. EfficientNet-Lite0's (N, 1280)."""
    return np.concatenate([extractor(x).double().cpu().numpy() for x in batches(images, batch_size, device)])


def distances(
    fake: np.ndarray,
    real: np.ndarray,
    kid_subsets: int,
    kid_subset_size: int,
    knn_k: int,
    seed: int,
    suffix: str = "",
    space: str = "effnet",
) -> dict[str, float]:
    """FD, KID (mean, std over ``kid_subsets`` subsets), k-NN precision / recall and density / coverage of ``fake``
    against ``real`` features of feature space ``space``: ``fd_<space><suffix>``, ``kid_<space><suffix>``, and
    ``precision<suffix>`` ... for ``effnet`` (the first space keeps the plain names), ``precision_<space><suffix>``
    ... for any other."""
    kid, kid_std = kernel_inception_distance(fake, real, kid_subsets, kid_subset_size, seed)
    out = {f"fd_{space}{suffix}": frechet_distance_features(fake, real), f"kid_{space}{suffix}": kid}
    out[f"kid_{space}{suffix}_std"] = kid_std
    tag = suffix if space == "effnet" else f"_{space}{suffix}"
    if min(len(fake), len(real)) > knn_k:
        out[f"precision{tag}"], out[f"recall{tag}"] = precision_recall(real, fake, k=knn_k)
        out[f"density{tag}"], out[f"coverage{tag}"] = density_coverage(real, fake, k=knn_k)
    return out


def class_recall(
    real: np.ndarray, real_labels: np.ndarray, fake: np.ndarray, fake_labels: np.ndarray, knn_k: int
) -> dict[str, float]:
    """k-NN recall of each class: the samples drawn for class ``c`` against the real images labelled ``c``
    (``recall_class_<c>``), for every class with more than ``knn_k`` of each; and ``recall_class_min``, the class the
    generator covers worst. Unlabelled rows (label -1) are left out."""
    out: dict[str, float] = {}
    for c in sorted(set(real_labels[real_labels >= 0].tolist()) & set(fake_labels[fake_labels >= 0].tolist())):
        r, f = real[real_labels == c], fake[fake_labels == c]
        if min(len(r), len(f)) > knn_k:
            out[f"recall_class_{c}"] = precision_recall(r, f, k=knn_k)[1]
    if out:
        out["recall_class_min"] = min(out.values())
    return out


def feature_classifier(
    images: np.ndarray,
    labels: np.ndarray,
    steps: int,
    batch_size: int,
    seed: int,
    channels: int = 16,
    cache: ContentCache | None = None,
) -> ImageClassifier | None:
    """The project's image classifier trained on ``images`` uint8 (N, C, S, S) with ``labels`` (N,; -1: none), on the
    CPU with a fixed seed, so that the same shards give the same feature space in every run; None with fewer than two
    classes. Its :meth:`~steps.nn.classifier.ImageClassifier.embed` is the second feature space. ``channels`` 16 (a
    quarter of the sample step's classifier's work per image at 32) keeps its training well under a CPU minute.
    With ``cache``, a network trained before on the same images, labels and settings is loaded instead."""
    keep = labels >= 0
    classes = np.unique(labels[keep])
    if len(classes) < 2:
        return None
    size = images.shape[-1]
    stages = next(s for s in (3, 2, 1, 0) if size % 2**s == 0)
    config = ClassifierConfig(
        image_size=size,
        in_channels=images.shape[1],
        num_classes=int(classes.max()) + 1,
        channels=channels,
        stages=stages,
    )

    def train(model: ImageClassifier) -> None:
        generator = torch.Generator().manual_seed(seed)
        x, y = to_float(images[keep]), torch.from_numpy(labels[keep])
        fit_classifier(model, x, y, steps=steps, batch_size=batch_size, generator=generator)

    key = content_key("feature_classifier", config.to_dict(), images[keep], labels[keep], steps, batch_size, seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = (cache or ContentCache(None)).module(key, lambda: ImageClassifier(config), train)
    return model.eval()


def floor_spread(a: np.ndarray, b: np.ndarray, n: int, resamples: int, knn_k: int, seed: int) -> dict[str, float]:
    """How much the real-vs-real floor moves with the choice of images: FD and precision / recall of ``n`` real
    images against ``len(a)`` others, over ``resamples`` random splits of the pooled real features ``a`` and ``b``.

    Returns ``fd_effnet_real_std``, ``fd_effnet_real_min``, ``fd_effnet_real_max`` and, with enough images,
    ``precision_real_std`` / ``recall_real_std``: a difference between two runs smaller than these is not a real
    difference.
    """
    pool = np.concatenate([a, b])
    rng = np.random.default_rng(seed + 1)
    fds, precisions, recalls = [], [], []
    for _ in range(resamples):
        perm = rng.permutation(len(pool))
        half_a, half_b = pool[perm[: len(a)]], pool[perm[len(a) : len(a) + n]]
        fds.append(frechet_distance_features(half_b, half_a))
        if min(len(half_a), len(half_b)) > knn_k:
            p, r = precision_recall(half_a, half_b, k=knn_k)
            precisions.append(p)
            recalls.append(r)
    out = {"fd_effnet_real_std": float(np.std(fds)), "fd_effnet_real_min": min(fds), "fd_effnet_real_max": max(fds)}
    if precisions:
        out.update(precision_real_std=float(np.std(precisions)), recall_real_std=float(np.std(recalls)))
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


@torch.no_grad()
def decode_codes(
    model: torch.nn.Module, codes: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, int]], batch_size: int
) -> np.ndarray:
    """uint8 images (N, C, S, S) of flat code rows per level (N, H*W), decoded by ``model`` (levels top first)."""
    device = next(model.parameters()).device
    levels = list(codes)
    out = []
    for start in range(0, len(codes[levels[0]]), batch_size):
        maps = [torch.from_numpy(codes[lv][start : start + batch_size]).view(-1, *shapes[lv]) for lv in levels]
        out.append(to_uint8_chw(model.decode_codes(*(m.to(device) for m in maps))))  # each map (B, H, W)
    return np.concatenate(out)
