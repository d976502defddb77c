"""The training loop's resume choice, without Ray: the newest loadable checkpoint directory wins."""

from __future__ import annotations

import contextlib

import torch

from steps.training import STATE_FILE, _resume_state


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
