"""`python -m pipeline mlflow=server` while its tracking server is stopped in the middle of train_vqvae and started
again 20 s later (tests/mlflow_server.py: same port, same store): the pipeline exits 0 and the step's run holds every
logged train/loss step exactly once."""

import os
import signal
import subprocess
import sys
import time

import pytest
from mlflow_server import TrackingServer

pytestmark = pytest.mark.e2e
OUTAGE_S = 60  # the outage the issue names: a restart of the tracking server
STEPS, LOG_EVERY = 60, 2


def child_run(client, step: str):
    experiment = client.get_experiment_by_name("outage")
    if experiment is None:
        return None
    runs = client.search_runs([experiment.experiment_id], f"tags.step = '{step}'")
    return runs[0].info.run_id if runs else None


def test_pipeline_rides_out_a_tracking_server_outage(tmp_path):
    from mlflow.tracking import MlflowClient

    (tmp_path / "server").mkdir()
    # Bound to the loopback, as `mlflow server` is by default: on a one-node Ray the workers reach it there too.
    server = TrackingServer(tmp_path / "server")
    server.start()
    proc = None
    try:
        args = ["debug=tiny", "mlflow=server", f"mlflow.tracking_uri={server.uri}", "mlflow.experiment=outage",
                f"artifacts.root={tmp_path / 'outputs'}", "steps=[shard,train_vqvae]",
                f"train_vqvae.train.steps={STEPS}", f"train_vqvae.train.log_every={LOG_EVERY}"]  # fmt: skip
        with open(tmp_path / "pipeline.log", "w") as log:  # the child keeps its own copy of the handle
            proc = subprocess.Popen([sys.executable, "-m", "pipeline", *args], cwd=tmp_path, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        client = MlflowClient(server.uri)
        run_id = None
        while proc.poll() is None:  # wait for rank 0's first train/loss: train_vqvae is under way
            run_id = run_id or child_run(client, "train_vqvae")
            if run_id and client.get_metric_history(run_id, "train/loss"):
                break
            time.sleep(0.5)
        assert run_id and proc.poll() is None, (tmp_path / "pipeline.log").read_text()[-5000:]
        server.stop()
        time.sleep(OUTAGE_S)
        server.start()
        rc = proc.wait(timeout=900)
        assert rc == 0, (tmp_path / "pipeline.log").read_text()[-5000:]
        steps = [m.step for m in MlflowClient(server.uri).get_metric_history(run_id, "train/loss")]
        assert steps == list(range(LOG_EVERY, STEPS + 1, LOG_EVERY)), "every logged step, exactly once"
        assert MlflowClient(server.uri).get_run(run_id).info.status == "FINISHED"
    finally:
        if proc is not None and proc.poll() is None:  # a failed test takes the pipeline and its local Ray along
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        server.stop()
