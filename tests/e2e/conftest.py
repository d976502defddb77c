"""The whole tiny pipeline run once for the session, shared by the modules that only read it (a run costs minutes)."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny_pipeline import pipeline


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """One full run, with a worker killed (SIGKILL) in train_vqvae after step 7 (by the fault-injection wrapper,
    python -m pipeline.faults): Ray Train restarts the workers from the step-5 checkpoint. Its console output is in
    ``console.txt``; its generator is version 1 of ``vqvae2-generator`` in the work directory's store."""
    path = tmp_path_factory.mktemp("e2e")
    (path / "console.txt").write_text(pipeline(path, faults=("--kill-at", "train_vqvae:7")))
    return path
