"""Console progress lines (steps/core/progress.py) and the switch for Ray's output (pipeline/ray_logs.py), without
Ray."""

from __future__ import annotations

import json
import logging
import threading

import pytest

from pipeline import ray_logs
from steps.core.progress import Progress, duration, line, watch


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0.0s"), (2.84, "2.8s"), (9.96, "10s"), (42.4, "42s"), (192, "3m12s"), (3599, "59m59s"), (7500, "2h05m")],
)
def test_duration(seconds, text):
    assert duration(seconds) == text


def test_a_training_line_has_every_figure():
    text = line("train_vqvae", 1200, 3000, loss=0.02134, val=("val mse", 0.004123), rate=412.3, eta=192)
    assert text == "train_vqvae  step 1200/3000 (40%)  loss 0.02134  val mse 0.004123  412 img/s  eta 3m12s"


def test_the_last_line_says_how_long_it_took_and_figures_it_lacks_are_left_out():
    assert line("encode", 60, 60, unit="rows", rate=2.5, rate_unit="rows/s", eta=0, elapsed=24) == (
        "encode  rows 60/60 (100%)  2.5 rows/s  done in 24s"
    )
    assert line("shard", 0, 10, unit="rows") == "shard  rows 0/10 (0%)"


def test_a_line_is_due_every_interval_and_at_the_end():
    clock = Clock()
    progress = Progress("train_prior[top]", 100, items_per_unit=32, every=30, clock=clock)
    lines = []
    for step in range(1, 101):
        clock.now += 1.0  # one step a second
        lines.append(progress.update(step, loss=float(step)))
    shown = [(i + 1, text) for i, text in enumerate(lines) if text]
    assert [s for s, _ in shown] == [30, 60, 90, 100]
    # The loss is the mean since the last line; 32 images per step at a step a second; 70 steps left at 1 s each.
    assert shown[0][1] == "train_prior[top]  step 30/100 (30%)  loss 15.5  32 img/s  eta 1m10s"
    assert shown[-1][1] == "train_prior[top]  step 100/100 (100%)  loss 95.5  32 img/s  done in 1m40s"


def test_a_resumed_run_counts_its_rate_from_where_it_started():
    clock = Clock()
    progress = Progress("train_vqvae", 1000, done=500, every=30, clock=clock)
    progress.val = ("val mse", 0.5)
    clock.now += 50
    assert progress.update(600) == "train_vqvae  step 600/1000 (60%)  val mse 0.5  2.0 img/s  eta 3m20s"


def test_watch_logs_polled_progress_from_a_thread_and_survives_a_failing_poll(caplog):
    progress = Progress("encode", 10, unit="rows", rate_unit="rows/s", every=0.01)
    polls = []
    enough = threading.Event()

    def poll() -> int:
        polls.append(1)
        if len(polls) == 1:
            raise OSError("listing raced a rename")
        if len(polls) >= 3:
            enough.set()
        return 4

    with (
        caplog.at_level(logging.INFO, logger="test.progress"),
        watch(progress, poll, logging.getLogger("test.progress")),
    ):
        assert enough.wait(5)
    assert any(r.getMessage().startswith("encode  rows 4/10 (40%)") for r in caplog.records)


def test_ray_is_quiet_below_info_and_the_job_keeps_what_it_set(monkeypatch):
    monkeypatch.delenv(ray_logs.LEVEL_ENV, raising=False)
    monkeypatch.delenv(ray_logs.JOB_CONFIG_ENV, raising=False)
    assert ray_logs.runtime_env("WARNING") == {
        "worker_process_setup_hook": "pipeline.ray_logs.setup_worker",
        "env_vars": {ray_logs.LEVEL_ENV: "WARNING"},
    }
    assert ray_logs.runtime_env("info") == {"worker_process_setup_hook": "pipeline.ray_logs.setup_worker"}
    # `ray job submit --runtime-env-json` with its own hook and level: Ray would refuse to merge ours with them.
    job = {"runtime_env": {"worker_process_setup_hook": "theirs.setup", "env_vars": {ray_logs.LEVEL_ENV: "DEBUG"}}}
    monkeypatch.setenv(ray_logs.JOB_CONFIG_ENV, json.dumps(job))
    assert ray_logs.runtime_env("WARNING") == {}
