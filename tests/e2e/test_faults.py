"""Faults injected into real `python -m pipeline` runs (the scenarios of tests/drills), and what must hold after.

A killed driver takes its local Ray along (SIGKILL to the process group), as a preempted head node would. The
artifact root is then checked with ``pipeline.verify``, the tool users run after an incident.

All of them are ``drill`` tests (``python -m pytest -m drill``), each several whole pipelines, which
``bench/faults.py`` also runs. Their parts are in the default run, one level down: a training step that failed and is
run again on the same output ends bitwise as an uninterrupted one (``tests/integration/test_exact_resume.py``, the
rerun a killed driver's next invocation makes), encode and sample resume per finished file
(``tests/integration/test_encode.py``, ``test_sample.py``) and two holders run a step once
(``tests/integration/test_lease.py``).
"""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from drills import compare, scenarios
from drills.workspace import TRAIN_LONGER, Workspace
from pipeline.verify import verify
from steps.artifacts.codes import CodeDataset
from steps.artifacts.images import SPLITS, ImageShards

pytestmark = pytest.mark.e2e


def assert_sound(root: Path) -> None:
    report = verify(str(root))
    assert report.ok, report.errors
    assert not report.in_progress, "every interrupted step was finished by a rerun"
    assert report.rows, "code datasets and samples were counted"
    for key, rows in report.rows.items():
        assert rows.found == rows.expected and not (rows.duplicates or rows.missing or rows.extra), (key, rows)


@pytest.mark.drill
def test_driver_killed_mid_encode_then_mid_sample(tmp_path):
    ws = Workspace(tmp_path)

    encode = scenarios.driver_kill_encode(ws)
    assert encode["killed"], "the driver was killed while encode was writing"
    assert encode["interrupted"] and not encode["looked_finished_after_kill"], "no partial output looks complete"
    assert encode["rerun_rc"] == 0 and encode["finished_after_rerun"], encode
    assert encode["resumed"], "the rerun kept the code files the killed run had finished"
    (codes,) = ws.finished("encode")
    (shards,) = ws.finished("shard")
    for split in SPLITS:
        ids = pq.read_table(CodeDataset.open(codes).split_uri(split), columns=["id"]).column("id").to_pylist()
        expected = pq.read_table(ImageShards.open(shards).split_uri(split), columns=["id"]).column("id").to_pylist()
        assert sorted(ids) == sorted(expected), f"{split}: each id exactly once"

    sample = scenarios.driver_kill_sample(ws)
    assert sample["killed"] and sample["interrupted"] and not sample["looked_finished_after_kill"], sample
    assert sample["resumed"], "the rerun kept the shards the killed run had finished"
    assert sample["rerun_rc"] == 0 and sample["finished_after_rerun"], sample
    assert_sound(ws.root)


@pytest.mark.drill
def test_two_pipelines_on_one_root(tmp_path):
    ws = Workspace(tmp_path)
    facts = scenarios.concurrent(ws)
    assert facts["rcs"] == [0, 0], [log.read_text()[-3000:] for log in sorted(tmp_path.glob("*.log"))]
    assert set(facts["outputs_per_step"].values()) == {1}, facts
    assert facts["survived"], facts
    assert_sound(ws.root)


@pytest.mark.drill
def test_driver_killed_mid_training_resumes_exactly(tmp_path):
    """The driver is SIGKILLed once train_vqvae wrote a checkpoint; the rerun resumes from it and ends with the weights
    and metric values of an uninterrupted run, bitwise (CPU): steps.training.resume restores data order, random streams,
    optimiser and metric window."""
    clean = Workspace(tmp_path / "clean")
    assert clean.run(*TRAIN_LONGER)[0] == 0
    ws = Workspace(tmp_path / "killed")
    facts = scenarios.driver_kill_train(ws)
    assert facts["killed"] and not facts["looked_finished_after_kill"], facts
    assert facts["rerun_rc"] == 0 and facts["resumed"], f"the rerun resumed mid-training: {facts}"
    assert compare.compare_to_clean(ws, clean) == {"identical": True, "compared": 2, "differ": []}  # shard, train_vqvae
