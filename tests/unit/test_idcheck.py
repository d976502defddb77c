"""Exactly-once id checks: the bucketed (spilled) path counts exactly what the in-memory one does."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from steps.io.idcheck import IdCounts, bucket_of, count


def chunks(ids: list[str], size: int = 37) -> list[pa.Array]:
    return [pa.array(ids[i : i + size], pa.string()) for i in range(0, len(ids), size)]


@pytest.fixture
def case():
    rng = np.random.default_rng(0)
    expected = [f"img-{i:05d}" for i in range(1000)] + ["ünïcode/ä.png", "", "x" * 300]
    found = [i for i in expected if rng.random() > 0.01]  # some missing
    found += [*rng.choice(found, 7, replace=False), "stray-1", "stray-2", "stray-2"]  # duplicates, extras
    rng.shuffle(found)
    return found, expected


@pytest.mark.parametrize("bucket_rows", [10**9, 100, 7])
def test_counts_do_not_depend_on_bucketing(case, bucket_rows):
    found, expected = case
    got = count(chunks(found), chunks(expected), len(found), bucket_rows=bucket_rows)
    missing = len(set(expected) - set(found))
    assert got == IdCounts(expected=len(expected), found=len(found), duplicates=len(found) - len(set(found)),
                           missing=missing, extra=2)  # fmt: skip
    assert not got.exact
    by_count = count(chunks(found), len(set(expected)), len(found), bucket_rows=bucket_rows)
    assert (by_count.duplicates, by_count.found) == (got.duplicates, got.found)
    assert by_count.missing == max(len(set(expected)) - len(set(found)), 0)


def test_exact_when_every_id_is_there_once(case):
    _, expected = case
    assert count(chunks(expected[::-1]), chunks(expected), len(expected), bucket_rows=50).exact
    assert count(chunks(expected), len(expected), len(expected), bucket_rows=50).exact


def test_bucket_of_is_a_function_of_the_id_only():
    ids = pa.array([f"id-{i}" for i in range(5000)] + ["ä", ""], pa.string())
    whole = bucket_of(ids, 13)
    assert np.array_equal(whole[100:200], bucket_of(ids.slice(100, 100), 13))  # sliced arrays, other chunks
    assert np.array_equal(whole, bucket_of(pa.array(ids.to_pylist(), pa.large_string()), 13))
    assert whole.min() >= 0 and whole.max() < 13
    assert np.bincount(whole[:5000], minlength=13).min() > 5000 / 13 / 2, "roughly balanced"
