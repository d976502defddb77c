"""Quality metrics against answers known in closed form or from a brute-force reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from steps.nn.metrics import (
    _polynomial_mmd2,
    code_histogram,
    codebook_stats,
    density_coverage,
    feature_stats,
    frechet_distance,
    frechet_distance_features,
    kernel_inception_distance,
    precision_recall,
    psnr,
    ssim,
)


def gaussian(n: int, d: int, seed: int, shift: float = 0.0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, d)) + shift


# ------------------------------------------------------------------------------------------------ Frechet
def test_fd_of_a_set_with_itself_is_zero():
    f = gaussian(200, 16, 0)
    assert frechet_distance_features(f, f) == pytest.approx(0.0, abs=1e-8)


def test_fd_of_shifted_copies_is_the_squared_mean_difference():
    f = gaussian(300, 8, 1)
    shift = np.linspace(-1, 2, 8)
    assert frechet_distance_features(f, f + shift) == pytest.approx(float(shift @ shift), rel=1e-9)


def test_fd_of_diagonal_gaussians_in_closed_form():
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 0.25])
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)


def test_fd_matches_the_general_matrix_square_root():
    """Non-commuting covariances: compare with Tr sqrt(S1 S2) from the eigenvalues of the non-symmetric product."""
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
    s1, s2 = a @ a.T + 0.1 * np.eye(6), b @ b.T + 0.1 * np.eye(6)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    tr_sqrt = np.sqrt(np.linalg.eigvals(s1 @ s2).real).sum()
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)


def test_fd_is_symmetric_and_handles_singular_covariances():
    f1, f2 = gaussian(10, 32, 3), gaussian(12, 32, 4)  # fewer samples than dimensions: rank-deficient covariances
    d12, d21 = frechet_distance_features(f1, f2), frechet_distance_features(f2, f1)
    assert d12 == pytest.approx(d21, rel=1e-8) and d12 > 0 and math.isfinite(d12)
    mu, sigma = feature_stats(torch.from_numpy(f1).float())
    assert mu.shape == (32,) and sigma.shape == (32, 32) and mu.dtype == np.float64


def test_fd_rejects_bad_shapes():
    with pytest.raises(ValueError, match="at least 2"):
        feature_stats(np.zeros((1, 4)))
    with pytest.raises(ValueError, match="shape mismatch"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# ------------------------------------------------------------------------------------------------ KID
def test_polynomial_mmd_matches_a_brute_force_loop():
    x, y = gaussian(7, 3, 5), gaussian(7, 3, 6, shift=0.5)

    def k(a, b):
        return (a @ b / 3 + 1) ** 3

    m = len(x)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    assert _polynomial_mmd2(x, y) == pytest.approx(xx + yy - 2 * xy, rel=1e-10)


def test_kid_is_near_zero_for_one_distribution_and_positive_for_two():
    a, b = gaussian(400, 16, 7), gaussian(400, 16, 8)
    same, same_std = kernel_inception_distance(a, b, num_subsets=20, subset_size=200)
    far, _ = kernel_inception_distance(a, gaussian(400, 16, 9, shift=1.0), num_subsets=20, subset_size=200)
    assert abs(same) < 0.05 and same_std >= 0
    assert far > 1.0 and far > 20 * max(abs(same), same_std)


def test_kid_is_seeded_and_caps_the_subset_size():
    a, b = gaussian(30, 4, 11), gaussian(40, 4, 12)
    assert kernel_inception_distance(a, b, 5, 1000, seed=1) == kernel_inception_distance(a, b, 5, 1000, seed=1)
    with pytest.raises(ValueError, match="at least 2"):
        kernel_inception_distance(a[:1], b)


# ------------------------------------------------------------------------------------------------ precision/recall
def test_precision_recall_of_identical_sets_is_one():
    f = gaussian(100, 8, 13)
    assert precision_recall(f, f, k=3) == (1.0, 1.0)


def test_precision_recall_of_far_apart_sets_is_zero():
    assert precision_recall(gaussian(50, 4, 14), gaussian(50, 4, 15, shift=100.0), k=3) == (0.0, 0.0)


def test_mode_collapse_keeps_precision_and_loses_recall():
    rng = np.random.default_rng(16)
    centres = np.eye(4) * 20
    real = np.concatenate([c + rng.normal(size=(100, 4)) for c in centres])  # four well-separated modes
    fake = centres[0] + rng.normal(size=(100, 4)) * 0.5  # all samples in one mode
    precision, recall = precision_recall(real, fake, k=3, chunk=64)
    assert precision > 0.95 and recall < 0.3


def test_density_coverage_equal_a_direct_count():
    real, fake = gaussian(60, 5, 17), gaussian(40, 5, 18, shift=0.5)
    k = 3
    d_rr = np.linalg.norm(real[:, None] - real[None], axis=2)
    radii = np.sort(d_rr, axis=1)[:, k]  # column 0 is the point itself
    inside = np.linalg.norm(fake[:, None] - real[None], axis=2) <= radii[None]  # (M, N)
    density, coverage = density_coverage(real, fake, k=k, chunk=7)
    assert density == pytest.approx(inside.sum() / (k * len(fake)))
    assert coverage == pytest.approx(inside.any(axis=0).mean())


def test_density_and_coverage_see_collapse_and_outliers():
    rng = np.random.default_rng(19)
    centres = np.eye(4) * 20
    real = np.concatenate([c + rng.normal(size=(100, 4)) for c in centres])
    collapsed = centres[0] + rng.normal(size=(100, 4)) * 0.5
    density, coverage = density_coverage(real, collapsed, k=3)
    assert coverage < 0.3 and density > 1.2  # crowded into one mode (about 1 when distributed as the real)
    spread = np.concatenate([c + rng.normal(size=(25, 4)) for c in centres])
    with_outlier = np.concatenate([spread[:-1], np.full((1, 4), 1000.0)])
    density, coverage = density_coverage(real, with_outlier, k=3)
    assert 0.6 < density < 1.4 and coverage > 0.4
    with pytest.raises(ValueError, match="needs more than 3 samples"):
        density_coverage(real, collapsed[:3], k=3)


# ------------------------------------------------------------------------------------------------ images and codes
def test_ssim_known_values():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 1, 32, 32, generator=g) * 2 - 1
    assert torch.allclose(ssim(x, x), torch.ones(3))
    assert ssim(x, torch.rand(3, 1, 32, 32, generator=g) * 2 - 1).abs().max() < 0.1  # independent: no shared structure
    n = torch.randn(3, 1, 32, 32, generator=g) * 0.2
    assert (ssim(0.5 + n, 0.5 - n) < -0.8).all()  # same means, mirrored structure
    # Constant images: only the luminance term is left, (2ab + c1) / (a^2 + b^2 + c1).
    a, b, c1 = 0.5, -0.25, (0.01 * 2) ** 2
    got = ssim(torch.full((1, 3, 12, 12), a), torch.full((1, 3, 12, 12), b))
    assert got.item() == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), rel=1e-5)
    noisy = ssim(x, (x + 0.3 * torch.randn_like(x)).clamp(-1, 1))
    assert (noisy > 0).all() and (noisy < 0.9).all()


def test_psnr():
    assert psnr(4.0) == pytest.approx(0.0) and psnr(0.04) == pytest.approx(20.0)


def test_codebook_stats():
    k = 8
    uniform = codebook_stats(code_histogram(torch.arange(4 * k) % k, k))
    assert uniform == pytest.approx({"usage": 1.0, "perplexity": float(k)})
    single = codebook_stats(code_histogram(torch.full((5, 3, 3), 2), k))
    assert single == pytest.approx({"usage": 1 / k, "perplexity": 1.0})
    half = codebook_stats(code_histogram(torch.tensor([0, 1, 2, 3]), k))
    assert half == pytest.approx({"usage": 0.5, "perplexity": 4.0})
    assert codebook_stats(torch.zeros(k, dtype=torch.long)) == {"usage": 0.0, "perplexity": 0.0}
