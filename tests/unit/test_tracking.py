"""Secrets never reach MLflow: URI passwords and secret-looking keys are hidden in params, tags and the config."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.secrets import redact, redact_overrides
from pipeline.tracking import Tracker

SECRET = "hunter2"


@pytest.mark.parametrize(
    "text",
    [
        f"mlflow.tracking_uri=postgresql://bob:{SECRET}@db:5432/mlflow",
        f"http://bob:{SECRET}@mlflow.internal:5000",
        f"+aws_secret_access_key={SECRET}",
        f"mlflow:\n  api_token: {SECRET}\n",
        f"password={SECRET}",
    ],
)
def test_redact_hides_the_secret(text):
    assert SECRET not in redact(text)
    assert "***" in redact(text)


def test_redact_keeps_everything_else():
    text = "data:\n  path: s3://bucket/images\n  image_size: 32\nmlflow:\n  tracking_uri: sqlite:////tmp/mlflow.db\n"
    assert redact(text) == text
    assert redact_overrides(["model.codebook_size=256", "debug=tiny"]) == "model.codebook_size=256 debug=tiny"


def test_nothing_secret_is_stored_in_mlflow(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)  # a SQLite store keeps artifacts under ./mlruns

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = [f"data.path=https://bob:{SECRET}@files.internal/images", f"+db_password={SECRET}"]
    with Tracker(uri, "secrets", None, {"overrides": redact_overrides(overrides)}) as tracker:
        tracker.log_text(f"data:\n  path: https://bob:{SECRET}@files.internal/images\n", "config.yaml")
        with tracker.step("shard", "fp", {}, {"path": f"https://bob:{SECRET}@files.internal/x", "api_token": "t0k"}):
            pass
        parent = tracker.run_id
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("secrets").experiment_id])
    stored = [str(r.data.params) + str(r.data.tags) for r in runs]
    local = client.download_artifacts(parent, "config.yaml", str(tmp_path))
    stored.append(Path(local).read_text())
    assert not any(SECRET in s or "t0k" in s for s in stored), stored
    assert any("https://bob:***@files.internal/x" in s for s in stored)


def test_runs_left_running_by_a_dead_driver_are_closed(tmp_path, monkeypatch):
    """A SIGKILLed driver cannot end its MLflow runs; the next pipeline on the same host marks them KILLED."""
    import os
    import socket
    import subprocess
    import sys

    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("orphans")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    here = socket.gethostname()

    def running(pid: int, host: str = here, parent: str | None = None) -> str:
        tags = {"driver_host": host, "driver_pid": str(pid)}
        if parent:
            tags = {"mlflow.parentRunId": parent}
        return client.create_run(exp, tags=tags).info.run_id

    orphan = running(dead.pid)
    orphan_child = running(0, parent=orphan)
    live = running(os.getpid())
    elsewhere = running(dead.pid, host="another-host")
    with Tracker(uri, "orphans", None, {}):
        pass
    status = {rid: client.get_run(rid).info.status for rid in (orphan, orphan_child, live, elsewhere)}
    assert status == {orphan: "KILLED", orphan_child: "KILLED", live: "RUNNING", elsewhere: "RUNNING"}


OPEN_STORE = """
import os, sys, time
go = sys.argv[2]
from pipeline.tracking import Tracker  # imported before the start line, so every process is ready
open(go + "." + str(os.getpid()), "w").close()
while not os.path.exists(go):
    time.sleep(0.001)
with Tracker(sys.argv[1], "race", None, {}):
    pass
print("opened")
"""


def test_pipelines_starting_together_on_a_new_store_take_turns(tmp_path):
    """Four drivers open one fresh SQLite store at the same instant (the race of two pipelines started together):
    the lock beside the store serialises MLflow's schema set-up, so none fails inside its migrations."""
    import subprocess
    import sys

    uri, go = f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "go"
    procs = [
        subprocess.Popen([sys.executable, "-c", OPEN_STORE, uri, str(go)], cwd=tmp_path, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
        for _ in range(4)
    ]  # fmt: skip
    import time

    while len(list(tmp_path.glob("go.*"))) < len(procs) and all(p.poll() is None for p in procs):
        time.sleep(0.05)  # importing MLflow takes seconds; then all start at once
    go.touch()
    outcomes = [p.communicate(timeout=300) for p in procs]
    assert [out.strip() for out, _ in outcomes] == ["opened"] * 4, [err[-2000:] for _, err in outcomes]
    assert (tmp_path / "mlflow.db.lock").exists()


def test_parent_run_params_and_name_come_from_choices_and_overrides():
    from pipeline.tracking import run_name, run_params

    choices = {"experiment": "digits32", "model": "vqvae", "prior": "pixelsnail", "debug": None, "hydra/job": "x"}
    overrides = ["model=vqvae", "train_prior.train.steps=400", "+sample.top_p=0.9", "~evaluate.knn_k"]
    overrides += [
        "artifacts.root=/tmp/a",
        "hydra.run.dir=/tmp/h",
        f"data.path=https://u:{SECRET}@h/img",
        "mlflow.run_name=x",
    ]
    params = run_params(overrides, choices)
    assert params == {
        "experiment": "digits32",
        "model": "vqvae",
        "prior": "pixelsnail",
        "train_prior.train.steps": "400",
        "sample.top_p": "0.9",
        "artifacts.root": "/tmp/a",
        "data.path": "https://u:***@h/img",
    }
    name = "digits32 model=vqvae train_prior.train.steps=400 sample.top_p=0.9 data.path=https://u:***@h/img"
    assert run_name(overrides, choices) == name
    assert run_name(["artifacts.root=/x"], {"experiment": "fashion_mnist32"}) == "fashion_mnist32 defaults"
    long = run_name([f"train_vqvae.train.lr={i}e-4" for i in range(40)], choices)
    assert len(long) == 120 and long.endswith("...")


def test_parent_run_experiment_kind_and_dataset_inputs(tmp_path, monkeypatch):
    """The experiment opens on its training runs in the UI; a step's child run lists the datasets it read."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)
    data = tmp_path / "shards"
    for split, n in (("train", 3), ("val", 1)):
        (data / f"split={split}").mkdir(parents=True)
        table = pa.table({"id": [str(i) for i in range(n)], "label": pa.array([1] * n, pa.int32()),
                          "image": pa.array([b"x"] * n, pa.binary())})  # fmt: skip
        pq.write_table(table, data / f"split={split}" / "part-00000.parquet")
    (data / "_manifest.json").write_text("{}")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with Tracker(uri, "lineage", "digits32 defaults", {}) as tracker:
        with tracker.step("train_vqvae", "fp", {"shard": str(data)}, {}, {"shard": (str(data), "ab" * 32)}) as rid:
            child = rid
        tracker.log_run({"experiment": "digits32"}, {"fd_effnet": 12.5})
        parent = tracker.run_id
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("lineage")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    run = client.get_run(parent)
    assert run.info.run_name == "digits32 defaults"
    assert run.data.params == {"experiment": "digits32"} and run.data.metrics == {"fd_effnet": 12.5}
    (dataset_input,) = client.get_run(child).inputs.dataset_inputs
    dataset = dataset_input.dataset
    assert dataset.name == "shard" and dataset.digest == "ab" * 8 and str(data) in dataset.source
    columns = {c["name"]: c["type"] for c in json.loads(dataset.schema)["mlflow_colspec"]}
    assert columns == {"id": "string", "label": "integer", "image": "binary", "split": "string"}


def test_system_metrics_option_logs_the_driver_machine(tmp_path, monkeypatch):
    import time

    import mlflow
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)
    mlflow.set_system_metrics_sampling_interval(0.5)
    mlflow.set_system_metrics_samples_before_logging(1)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    try:
        with Tracker(uri, "system", "run", {}, system_metrics=True) as tracker:
            time.sleep(3)
            parent = tracker.run_id
    finally:
        mlflow.set_system_metrics_sampling_interval(None)
        mlflow.set_system_metrics_samples_before_logging(None)
    metrics = MlflowClient(tracking_uri=uri).get_run(parent).data.metrics
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(metrics), metrics


def test_a_dataset_logged_by_two_pipelines_at_once_never_fails_a_step(tmp_path, monkeypatch):
    """The store's unique (experiment, name, digest) row: the pipeline that loses the insert race retries, and a
    store that keeps refusing costs a warning, not the step."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from pipeline import tracking

    monkeypatch.chdir(tmp_path)
    data = tmp_path / "codes" / "split=train"
    data.mkdir(parents=True)
    pq.write_table(pa.table({"id": ["a"]}), data / "part-0.parquet")
    real, calls = mlflow.log_input, []

    def racing(*args, **kwargs):  # what the loser of the race sees first
        calls.append(1)
        if len(calls) == 1:
            raise MlflowException("UNIQUE constraint failed: datasets.experiment_id, datasets.name, datasets.digest")
        return real(*args, **kwargs)

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with Tracker(uri, "race", "run", {}) as tracker:
        monkeypatch.setattr(mlflow, "log_input", racing)
        tracking.log_dataset(mlflow, "encode", str(tmp_path / "codes"), "cd" * 32)
        monkeypatch.setattr(mlflow, "log_input", lambda *a, **k: (_ for _ in ()).throw(MlflowException("down")))
        tracking.log_dataset(mlflow, "shard", str(tmp_path / "codes"), "ef" * 32)  # warns, does not raise
        parent = tracker.run_id
    (logged,) = MlflowClient(tracking_uri=uri).get_run(parent).inputs.dataset_inputs
    assert logged.dataset.name == "encode" and len(calls) == 2
