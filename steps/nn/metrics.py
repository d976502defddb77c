"""Quality metrics in pure torch / numpy: image fidelity, codebook health and distances between feature sets.

- :func:`ssim`: structural similarity (Wang et al. 2004) with an 11x11 Gaussian window (sigma 1.5), valid filtering.
- :func:`codebook_stats`: fraction of codes used and the perplexity of the code histogram.
- :func:`frechet_distance`: ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) between Gaussians fitted to two feature
  sets (Heusel et al. 2017). The matrix square root needs no scipy: the trace of (S1 S2)^(1/2) equals the trace of
  (S1^(1/2) S2 S1^(1/2))^(1/2), a symmetric PSD matrix, so two symmetric eigendecompositions in float64 do it.
- :func:`kernel_inception_distance`: the unbiased MMD^2 estimate with the cubic polynomial kernel
  k(x, y) = (x.y / d + 1)^3, averaged over random subsets, with its standard deviation (Binkowski et al. 2018,
  section 4 / appendix B).
- :func:`density_coverage`: k-NN density and coverage of Naeem et al. 2020 (real balls only, robust to outliers);
- :func:`precision_recall`: k-NN precision and recall of Kynkaanniemi et al. 2019 (section 3): a sample is "covered"
  by a set when it lies inside the ball of some set member whose radius is the distance to that member's k-th
  nearest neighbour in its own set.

Feature-space metrics here are defined on whatever features they are given; the evaluate step feeds them
EfficientNet-Lite0 features (``steps.nn.features``), so its FD/KID are *not* Inception FID/KID.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


# ------------------------------------------------------------------------------------------------ images
def psnr(mse: float, data_range: float = 2.0) -> float:
    """Peak signal-to-noise ratio in dB for a mean squared error over values spanning ``data_range``."""
    return 10.0 * math.log10(data_range**2 / max(mse, 1e-12))


def _gaussian_window(size: int, sigma: float, channels: int, dtype: torch.dtype) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).to(dtype).expand(channels, 1, size, size).contiguous()  # (C, 1, k, k)


def ssim(
    x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0, window: int = 11, sigma: float = 1.5
) -> torch.Tensor:
    """Mean SSIM per image (B,) of two image batches (B, C, H, W) with values spanning ``data_range``.

    Statistics are Gaussian-weighted over ``window`` x ``window`` patches (valid positions only), averaged over
    positions and channels. Images smaller than the window use a window of their size.
    """
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(
            f"ssim needs two batches (B, C, H, W) of the same shape, got {tuple(x.shape)}, {tuple(y.shape)}"
        )
    x, y = x.double(), y.double()
    c = x.shape[1]
    k = min(window, x.shape[-1], x.shape[-2])
    w = _gaussian_window(k, sigma, c, x.dtype).to(x.device)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, w, groups=c)  # (B, C, H-k+1, W-k+1)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return s.mean(dim=(1, 2, 3)).float()  # (B,)


# ------------------------------------------------------------------------------------------------ codes
def code_histogram(codes: torch.Tensor, codebook_size: int) -> torch.Tensor:
    """How often each code occurs in an integer tensor of any shape: (codebook_size,) int64."""
    return torch.bincount(codes.reshape(-1).long(), minlength=codebook_size)


def codebook_stats(counts: torch.Tensor) -> dict[str, float]:
    """``usage``: fraction of codes seen at least once; ``perplexity``: exp(entropy) of the code histogram.

    The perplexity is the effective number of codes in use: the codebook size for uniform use, 1 for one code.
    """
    counts = counts.double()
    total = counts.sum()
    if total == 0:
        return {"usage": 0.0, "perplexity": 0.0}
    p = counts / total
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return {"usage": float((counts > 0).double().mean()), "perplexity": float(entropy.exp())}


# ------------------------------------------------------------------------------------------------ feature sets
def _as_float64(a: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().numpy()
    a = np.asarray(a, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"features must be a 2-D array (N, D), got shape {a.shape}")
    return a


def feature_stats(features: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D) of features (N, D), in float64."""
    f = _as_float64(features)
    if len(f) < 2:
        raise ValueError(f"need at least 2 feature vectors for a covariance, got {len(f)}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def _sqrt_psd(a: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix (negative rounding noise clipped to 0)."""
    vals, vecs = np.linalg.eigh((a + a.T) / 2)
    return (vecs * np.sqrt(np.clip(vals, 0, None))) @ vecs.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2).

    Tr((S1 S2)^(1/2)) is computed as Tr((S1^(1/2) S2 S1^(1/2))^(1/2)): S1 S2 is similar to that symmetric PSD
    matrix, so they share their (non-negative) eigenvalues, and no general matrix square root is needed.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"shape mismatch: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}")
    root1 = _sqrt_psd(s1)
    middle = root1 @ s2 @ root1
    vals = np.linalg.eigvalsh((middle + middle.T) / 2)
    tr_covmean = np.sqrt(np.clip(vals, 0, None)).sum()
    diff = mu1 - mu2
    return float(max(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean, 0.0))


def frechet_distance_features(f1: np.ndarray | torch.Tensor, f2: np.ndarray | torch.Tensor) -> float:
    """:func:`frechet_distance` between Gaussians fitted to two feature sets (N1, D) and (N2, D)."""
    return frechet_distance(*feature_stats(f1), *feature_stats(f2))


def _polynomial_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 of equal-size sets (m, d) with the kernel k(a, b) = (a.b / d + 1)^3."""
    m, d = x.shape
    kxx = (x @ x.T / d + 1) ** 3
    kyy = (y @ y.T / d + 1) ** 3
    kxy = (x @ y.T / d + 1) ** 3
    within = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    return float(within - 2 * kxy.sum() / (m * m))


def kernel_inception_distance(
    f1: np.ndarray | torch.Tensor,
    f2: np.ndarray | torch.Tensor,
    num_subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """(mean, std) over ``num_subsets`` random subsets of the unbiased polynomial-kernel MMD^2 (KID).

    Each subset draws ``subset_size`` rows without replacement from each set (capped at the smaller set's size,
    at least 2). The estimate is unbiased, so it can be slightly negative for sets from one distribution.
    """
    x, y = _as_float64(f1), _as_float64(f2)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"feature dimensions differ: {x.shape[1]} vs {y.shape[1]}")
    m = min(subset_size, len(x), len(y))
    if m < 2:
        raise ValueError(f"KID needs at least 2 samples per set, got {len(x)} and {len(y)}")
    rng = np.random.default_rng(seed)
    values = np.array(
        [
            _polynomial_mmd2(x[rng.choice(len(x), m, replace=False)], y[rng.choice(len(y), m, replace=False)])
            for _ in range(num_subsets)
        ]
    )
    return float(values.mean()), float(values.std())


def _kth_neighbour_radii(f: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    """Distance of every row of f (N, D) to its k-th nearest other row: (N,)."""
    radii = []
    for start in range(0, len(f), chunk):
        d = torch.cdist(f[start : start + chunk], f)  # (c, N)
        radii.append(d.kthvalue(k + 1, dim=1).values)  # the nearest "neighbour" at distance 0 is the row itself
    return torch.cat(radii)


def _covered(queries: torch.Tensor, refs: torch.Tensor, radii: torch.Tensor, chunk: int) -> torch.Tensor:
    """Per query row, whether it lies in some reference ball: (Q,) bool."""
    out = []
    for start in range(0, len(queries), chunk):
        d = torch.cdist(queries[start : start + chunk], refs)  # (c, R)
        out.append((d <= radii[None, :]).any(dim=1))
    return torch.cat(out)


def precision_recall(
    real: np.ndarray | torch.Tensor, fake: np.ndarray | torch.Tensor, k: int = 3, chunk: int = 1024
) -> tuple[float, float]:
    """k-NN (precision, recall) of Kynkaanniemi et al. 2019 between real (N, D) and generated (M, D) features.

    Precision: fraction of generated samples inside the real manifold (the union of balls around each real sample
    with radius its distance to the k-th nearest real neighbour). Recall: fraction of real samples inside the
    generated manifold, built the same way.
    """
    r = torch.from_numpy(_as_float64(real))
    f = torch.from_numpy(_as_float64(fake))
    if min(len(r), len(f)) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} samples per set, got {len(r)}, {len(f)}")
    precision = _covered(f, r, _kth_neighbour_radii(r, k, chunk), chunk).double().mean()
    recall = _covered(r, f, _kth_neighbour_radii(f, k, chunk), chunk).double().mean()
    return float(precision), float(recall)


def density_coverage(
    real: np.ndarray | torch.Tensor, fake: np.ndarray | torch.Tensor, k: int = 3, chunk: int = 1024
) -> tuple[float, float]:
    """k-NN (density, coverage) of Naeem et al. 2020 between real (N, D) and generated (M, D) features.

    Both use the balls around the real samples only (radius: the distance to the k-th nearest real neighbour), so an
    outlier among the samples cannot inflate them as it can recall. Density: the mean number of real balls holding a
    generated sample, over k (about 1 when the samples are distributed as the real ones; above 1 where they crowd).
    Coverage: the fraction of real balls holding at least one generated sample (diversity: which real modes the
    samples reach).
    """
    r = torch.from_numpy(_as_float64(real))
    f = torch.from_numpy(_as_float64(fake))
    if min(len(r), len(f)) <= k:
        raise ValueError(f"density/coverage with k={k} needs more than {k} samples per set, got {len(r)}, {len(f)}")
    radii = _kth_neighbour_radii(r, k, chunk)
    inside = torch.zeros(len(f), dtype=torch.float64)  # per sample: how many real balls hold it
    reached = torch.zeros(len(r), dtype=torch.bool)  # per real sample: whether some sample is in its ball
    for start in range(0, len(f), chunk):
        hits = torch.cdist(f[start : start + chunk], r) <= radii[None, :]  # (c, N)
        inside[start : start + chunk] = hits.sum(dim=1).double()
        reached |= hits.any(dim=0)
    return float(inside.sum() / (k * len(f))), float(reached.double().mean())
