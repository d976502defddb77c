"""Evaluate's content-keyed cache (steps/evaluation/cache.py): keys, hits, damaged entries and a cache it cannot use."""

from __future__ import annotations

import os

import numpy as np
import torch

from steps.evaluation.cache import ContentCache, content_key
from steps.evaluation.quality import feature_classifier


def _images(seed: int, n: int = 40) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 1, 16, 16), dtype=np.uint8)


def test_a_key_changes_with_every_input_it_is_a_function_of():
    x = _images(0)
    base = content_key("features", x)
    assert content_key("features", x.copy()) == base  # content, not identity
    y = x.copy()
    y[3, 0, 5, 5] ^= 1  # one bit of one pixel
    assert content_key("features", y) != base
    assert content_key("features", x.reshape(40, 1, 8, 32)) != base  # same bytes, another shape
    assert content_key("features", x.astype(np.int16)) != base
    assert content_key("clf", x) != base
    assert content_key("features", x[::2]) == content_key("features", np.ascontiguousarray(x[::2]))
    net = torch.nn.Linear(3, 2)
    k = content_key(net)
    with torch.no_grad():
        net.bias[0] += 1e-6  # another checkpoint: another key
    assert content_key(net) != k
    assert content_key({"a": 1, "b": 2}) == content_key({"b": 2, "a": 1}) != content_key({"a": 1, "b": 3})


def test_a_second_lookup_is_a_hit_with_the_same_array(tmp_path):
    cache = ContentCache(str(tmp_path / "c"))
    calls = []

    def compute():
        calls.append(1)
        return np.arange(12, dtype=np.float32).reshape(3, 4) / 7

    first = cache.array("ab" * 32, compute)
    second = ContentCache(str(tmp_path / "c")).array("ab" * 32, compute)  # another run on the same root
    assert len(calls) == 1 and np.array_equal(first, second) and second.dtype == np.float32
    assert (cache.hits, cache.misses) == (0, 1)
    assert os.listdir(tmp_path / "c" / "ab") == ["ab" * 32 + ".npy"]  # no temporary file left behind


def test_without_a_uri_every_lookup_computes_and_nothing_is_written(tmp_path):
    cache = ContentCache("")
    calls = []
    for _ in range(2):
        cache.array("cd" * 32, lambda: calls.append(1) or np.zeros(2))
    assert len(calls) == 2 and cache.uri is None


def test_a_damaged_entry_is_recomputed_and_replaced(tmp_path, caplog):
    cache = ContentCache(str(tmp_path))
    key = "ef" * 32
    cache.array(key, lambda: np.ones(100))
    path = tmp_path / "ef" / (key + ".npy")
    path.write_bytes(path.read_bytes()[:50])  # truncated, as by a crash on a store without atomic writes
    again = ContentCache(str(tmp_path))
    value = again.array(key, lambda: np.full(100, 2.0))
    assert np.array_equal(value, np.full(100, 2.0)) and again.misses == 1
    assert "not a readable array" in caplog.text and str(path) in caplog.text
    assert np.array_equal(ContentCache(str(tmp_path)).array(key, lambda: np.zeros(1)), value)  # rewritten whole


def test_a_cache_it_cannot_write_never_fails_the_evaluation(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    cache = ContentCache(str(blocker / "cache"))  # under a file: every write fails
    for i in range(3):
        assert np.array_equal(cache.array(f"{i:064x}", lambda i=i: np.full(3, i)), np.full(3, i))
    assert cache.misses == 3
    assert caplog.text.count("cannot write") == 1  # said once, then the cache is left alone


def test_a_cached_classifier_is_the_one_training_would_give(tmp_path):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 120)
    images = rng.integers(0, 40, (120, 1, 16, 16)).astype(np.uint8)
    for i, c in enumerate(labels):
        images[i, 0, 4 * c : 4 * c + 4] = 250
    fresh = feature_classifier(images, labels, steps=20, batch_size=16, seed=3)
    cache = ContentCache(str(tmp_path))
    trained = feature_classifier(images, labels, steps=20, batch_size=16, seed=3, cache=cache)
    loaded = feature_classifier(images, labels, steps=20, batch_size=16, seed=3, cache=cache)
    assert (cache.hits, cache.misses) == (1, 1)
    for a, b, c in zip(fresh.state_dict().values(), trained.state_dict().values(), loaded.state_dict().values(),
                       strict=True):  # fmt: skip
        assert torch.equal(a, b) and torch.equal(a, c)
    assert not loaded.training
    # Other settings or other labels: another network, trained, not loaded.
    feature_classifier(images, labels, steps=21, batch_size=16, seed=3, cache=cache)
    feature_classifier(images, (labels + 1) % 3, steps=20, batch_size=16, seed=3, cache=cache)
    assert (cache.hits, cache.misses) == (1, 3)


def test_a_damaged_classifier_entry_trains_the_same_network_again(tmp_path, caplog):
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 60)
    images = rng.integers(0, 255, (60, 1, 16, 16)).astype(np.uint8)
    fresh = feature_classifier(images, labels, steps=10, batch_size=16, seed=0)
    feature_classifier(images, labels, steps=10, batch_size=16, seed=0, cache=ContentCache(str(tmp_path)))
    (entry,) = tmp_path.glob("*/*.pt")
    entry.write_bytes(b"garbage")
    cache = ContentCache(str(tmp_path))
    again = feature_classifier(images, labels, steps=10, batch_size=16, seed=0, cache=cache)
    assert cache.misses == 1 and "not a loadable state dict" in caplog.text
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), again.state_dict().values(), strict=True))
