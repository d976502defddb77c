"""Secrets never reach MLflow: URI passwords and secret-looking keys are hidden in params, tags and the config."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.tracking import Tracker, redact, redact_overrides

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
