"""The evaluate step's measurements beyond the metric formulas (steps/evaluation/quality.py): the names each feature
space's figures take, recall per class, and the classifier that gives the second feature space."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from steps.evaluation.quality import class_recall, distances, feature_classifier, features


def test_each_feature_space_names_its_figures():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(40, 6)), rng.normal(size=(40, 6))
    first = distances(a, b, 5, 20, 3, 0)
    other = distances(a, b, 5, 20, 3, 0, suffix="_real", space="clf")
    assert set(first) == {"fd_effnet", "kid_effnet", "kid_effnet_std", "precision", "recall", "density", "coverage"}
    assert set(other) == {f"{k}_real" for k in ("fd_clf", "kid_clf", "kid_clf")} | {"kid_clf_real_std"} | {
        f"{k}_clf_real" for k in ("precision", "recall", "density", "coverage")
    }
    assert other["fd_clf_real"] == first["fd_effnet"] and other["recall_clf_real"] == first["recall"]


def test_recall_per_class_finds_the_class_whose_samples_collapsed():
    rng = np.random.default_rng(0)
    centres = {0: np.zeros(4), 1: np.full(4, 10.0)}
    real = np.concatenate([centres[c] + rng.normal(size=(60, 4)) for c in (0, 1)])
    real_labels = np.repeat([0, 1], 60)
    good = centres[0] + rng.normal(size=(60, 4))  # class 0: as spread as the real images
    collapsed = centres[1] + 0.01 * rng.normal(size=(60, 4))  # class 1: one point
    fake_labels = np.repeat([0, 1], 60)
    got = class_recall(real, real_labels, np.concatenate([good, collapsed]), fake_labels, knn_k=3)
    assert got["recall_class_0"] > 0.7 and got["recall_class_1"] < 0.2
    assert got["recall_class_min"] == got["recall_class_1"]
    # Unlabelled rows and classes with too few images are left out.
    few = class_recall(real, real_labels, good[:3], np.zeros(3, np.int64), knn_k=3)
    assert few == {}
    assert class_recall(real, np.full(120, -1), good, np.zeros(60, np.int64), knn_k=3) == {}


def _blobs(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (n, 1, 16, 16) images of two classes: a bright square top left (0) or bottom right (1)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    images = rng.integers(0, 60, (n, 1, 16, 16)).astype(np.uint8)
    for i, c in enumerate(labels):
        images[i, 0, 2:7, 2:7] = 250 if c == 0 else images[i, 0, 2:7, 2:7]
        images[i, 0, 9:14, 9:14] = 250 if c == 1 else images[i, 0, 9:14, 9:14]
    return images, labels


def test_the_classifier_feature_space_learns_the_classes_and_is_the_same_every_run():
    images, labels = _blobs(200, 0)
    before = torch.get_rng_state()
    a = feature_classifier(images, labels, steps=40, batch_size=32, seed=0)
    assert torch.equal(torch.get_rng_state(), before)  # the caller's random stream is left as it was
    b = feature_classifier(images, labels, steps=40, batch_size=32, seed=0)
    test, test_labels = _blobs(50, 1)
    with torch.no_grad():
        pred = torch.cat([a(x).argmax(1) for x in torch.from_numpy(test).float().div(127.5).sub(1).split(25)])
    assert (pred.numpy() == test_labels).mean() > 0.9
    fa = features(a.embed, test, 16, torch.device("cpu"))
    fb = features(b.embed, test, 16, torch.device("cpu"))
    assert fa.shape == (50, 16 * 8) and np.array_equal(fa, fb)  # the same shards give the same feature space


@pytest.mark.parametrize("labels", [np.zeros(20, np.int64), np.full(20, -1)])
def test_no_classifier_without_two_classes(labels):
    images = np.zeros((20, 1, 16, 16), np.uint8)
    assert feature_classifier(images, labels, steps=5, batch_size=8, seed=0) is None
