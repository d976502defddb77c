"""The tracking server behind a login, as cluster.yaml runs it (MLflow's authentication app, ``--app-name
basic-auth``): a real server on 127.0.0.1, a pipeline without credentials refused before Ray starts, one with the
credentials file every node gets (``~/.mlflow/credentials``) green through every step, its training workers logging
their curves, and the password nowhere in what it recorded or printed. Model registration is off here
(``mlflow.register_models=false``): logging the two models through the authentication app took 98 s of this test's
403 s on two cores; the driver registers through the same client and credentials it logs with, and
tests/e2e/test_pipeline.py tests registration itself."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow_server import TrackingServer

pytestmark = pytest.mark.e2e

USER = "pipeline"
PASSWORD = "tr4cking-" + os.urandom(6).hex()


def run(workdir: Path, home: Path, server: TrackingServer, *overrides: str) -> tuple[int, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}
    env.update(HOME=str(home), PYTHONUNBUFFERED="1")  # ~/.mlflow/credentials is read from HOME, by every process
    cmd = [sys.executable, "-m", "pipeline", "debug=tiny", "mlflow=server", f"mlflow.tracking_uri={server.uri}",
           f"artifacts.root={workdir / 'artifacts'}", "mlflow.register_models=false", *overrides]  # fmt: skip
    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=1500)
    return proc.returncode, proc.stdout + proc.stderr


def test_a_pipeline_logs_in_to_the_tracking_server_and_never_shows_the_password(tmp_path):
    server = TrackingServer(tmp_path, auth=(USER, PASSWORD))
    home = tmp_path / "home"
    home.mkdir()
    server.start(timeout=300)  # the authentication app starts slower than the plain server
    try:
        rc, output = run(tmp_path, home, server)
        assert rc == 2, output[-3000:]
        assert "refused the login (HTTP 401)" in output and "MLFLOW_TRACKING_USERNAME" in output, output[-3000:]
        assert "plan:" not in output and "Traceback" not in output, "refused before anything runs"

        (home / ".mlflow").mkdir()
        (home / ".mlflow" / "credentials").write_text(
            f"[mlflow]\nmlflow_tracking_username = {USER}\nmlflow_tracking_password = {PASSWORD}\n"
        )
        rc, output = run(tmp_path, home, server)
        assert rc == 0, output[-5000:]

        from mlflow.tracking import MlflowClient

        os.environ.update(MLFLOW_TRACKING_USERNAME=USER, MLFLOW_TRACKING_PASSWORD=PASSWORD)
        try:
            client = MlflowClient(server.uri)
            exp = client.get_experiment_by_name("vqvae2")
            runs = client.search_runs([exp.experiment_id])
            recorded = [str(r.data.params) + str(r.data.tags) + str(r.info.run_name) for r in runs]
            parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
            recorded.append(
                Path(client.download_artifacts(parent.info.run_id, "config.yaml", str(tmp_path))).read_text()
            )
            train = next(r for r in runs if r.info.run_name == "train_vqvae")
            assert "train/loss" in train.data.metrics, "the training workers logged in too"
        finally:
            for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
                os.environ.pop(name, None)
        assert len(runs) >= 7 and not any(PASSWORD in text for text in recorded)
        assert PASSWORD not in output
        assert not any(PASSWORD in p.read_text(errors="replace") for p in (tmp_path / "artifacts").rglob("*.log"))
    finally:
        server.stop()
