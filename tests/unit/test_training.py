"""The training loop's resume, without Ray: the newest loadable checkpoint directory wins, and the data order and
random streams a checkpoint records continue exactly (steps/training/resume.py)."""

from __future__ import annotations

import contextlib
import random

import numpy as np
import pytest
import torch

from steps.training import resume
from steps.training.resume import STATE_FILE, BatchStream
from steps.training.resume import resume_state as _resume_state


class Registered:
    """What ``ray.train.get_checkpoint()`` returns: a path and ``as_directory()``."""

    def __init__(self, path) -> None:
        self.path = str(path)

    @contextlib.contextmanager
    def as_directory(self):
        yield self.path


def write_state(run_dir, name: str, step: int) -> None:
    (run_dir / name).mkdir(parents=True)
    torch.save({"step": step, "model": {}}, run_dir / name / STATE_FILE)


def test_a_checkpoint_ray_never_registered_is_used(tmp_path):
    """The worker reported step 6, then was killed before Ray Train's controller registered the report."""
    write_state(tmp_path, "checkpoint_2026-01-01_00-00-01.000000", 3)
    write_state(tmp_path, "checkpoint_2026-01-01_00-00-02.000000", 6)
    registered = Registered(tmp_path / "checkpoint_2026-01-01_00-00-01.000000")
    assert _resume_state(registered, str(tmp_path))["step"] == 6
    assert _resume_state(None, str(tmp_path))["step"] == 6


def test_a_cut_short_checkpoint_is_skipped_and_the_registered_one_used(tmp_path):
    write_state(tmp_path, "checkpoint_2026-01-01_00-00-01.000000", 3)
    (tmp_path / "checkpoint_2026-01-01_00-00-02.000000").mkdir()
    (tmp_path / "checkpoint_2026-01-01_00-00-02.000000" / STATE_FILE).write_bytes(b"PK\x03\x04 cut short")
    registered = Registered(tmp_path / "checkpoint_2026-01-01_00-00-01.000000")
    assert _resume_state(registered, str(tmp_path))["step"] == 3


def test_nothing_to_resume(tmp_path):
    assert _resume_state(None, str(tmp_path / "never-written")) is None
    assert _resume_state(None, str(tmp_path)) is None


class Shard:
    """What ``ray.train.get_dataset_shard`` hands a worker: ``iter_batches`` over rows in a fixed order."""

    def __init__(self, rows: int) -> None:
        self.ids = np.arange(rows)

    def iter_batches(self, batch_size: int, batch_format: str, drop_last: bool):
        assert batch_format == "numpy" and not drop_last
        for start in range(0, len(self.ids), batch_size):
            yield {"id": self.ids[start : start + batch_size]}


def take(stream, n: int) -> list[list[int]]:
    return [next(stream)["id"].tolist() for _ in range(n)]


def test_batch_stream_resumes_at_its_position():
    """A stream rebuilt at a saved (epoch, offset) yields what the uninterrupted stream yields from there on."""
    shard = Shard(100)  # 6 batches of 16 an epoch (4 rows dropped), in windows of SHUFFLE_WINDOW batches
    whole = BatchStream(shard, 16, seed=3, rank=1)
    first = take(whole, 9)
    position = whole.position
    assert position == (1, 3)
    rest = take(whole, 10)
    assert take(BatchStream(shard, 16, 3, 1, *position), 10) == rest
    epoch0 = [i for b in first[:6] for i in b]
    assert len(set(epoch0)) == 96 and epoch0 != sorted(epoch0), "an epoch: distinct rows, shuffled"
    assert first[6:9] != first[0:3], "each epoch has an order of its own"
    assert take(BatchStream(shard, 16, 4, 1), 6) != first[:6] and take(BatchStream(shard, 16, 3, 0), 6) != first[:6]
    with pytest.raises(ValueError, match="fewer rows than one batch"):
        next(BatchStream(Shard(10), 16, 0, 0))


def test_rank_state_restores_every_random_stream(tmp_path):
    resume.seed_rank(7, 1, keep_torch=False)
    path = tmp_path / "state.pt"
    torch.save(resume.rank_state(torch.device("cpu"), (2, 5)), path)
    drawn = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    state = torch.load(path, weights_only=True)  # the checkpoint holds tensors and plain values only
    assert resume.restore_rank_state(state, torch.device("cpu")) == (2, 5)
    again = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    assert torch.equal(drawn[0], again[0]) and np.array_equal(drawn[1], again[1]) and drawn[2] == again[2]
