"""Tracking-server outages (pipeline/tracking_buffer.py) against a real ``mlflow server`` on 127.0.0.1 that the tests
stop and start again on the same port and store (tests/mlflow_server.py).

Metrics logged while the server is down are buffered and arrive after it is back, each step once and in order, from a
sink alone and from rank 0 of a real training run; the driver's tracker waits an outage out; a server that stays
down past ``mlflow.outage_limit_s`` fails the sink, and the training step, with a message naming the tracking URI.
"""

import pickle
import threading
import time
from dataclasses import replace

import pytest
from mlflow_server import TrackingServer

from pipeline.config import ConfigError
from pipeline.tracking import Tracker
from pipeline.tracking_buffer import MLflowSink, Outage, TrackingUnavailableError
from steps import train_vqvae
from steps.core.step import SinkUnavailableError

OUTAGE_S = 5  # how long the tests keep the server down: several of the sink's retries


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = TrackingServer(tmp_path_factory.mktemp("mlflow-server"))
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def up(server):
    """The server, running (a test that stopped it for good has it started again)."""
    if server.proc is None:
        server.start()
    return server


def new_run(uri: str, name: str) -> str:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(name) or client.get_experiment(client.create_experiment(name))
    return client.create_run(experiment.experiment_id).info.run_id


def history(uri: str, run_id: str, key: str) -> list:
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri).get_metric_history(run_id, key)


def restart_later(server: TrackingServer, after_s: float) -> threading.Thread:
    thread = threading.Thread(target=lambda: (time.sleep(after_s), server.start()), daemon=True)
    thread.start()
    return thread


def test_metrics_logged_while_the_server_is_down_arrive_once_and_in_order(up):
    run_id = new_run(up.uri, "outage-sink")
    sink = pickle.loads(pickle.dumps(MLflowSink(up.uri, run_id, outage_limit_s=120)))  # as a worker gets it
    for step in range(1, 6):
        sink.log_metrics({"train/loss": 1.0 / step, "train/lr": 0.1}, step)
    assert sink.flush()
    up.stop()
    for step in range(6, 26):  # the server is down: these are queued, and log_metrics returns
        sink.log_metrics({"train/loss": 1.0 / step, "train/lr": 0.1}, step)
    assert not sink.flush(timeout_s=1.0), "nothing can be delivered while the server is down"
    time.sleep(OUTAGE_S)
    up.start()
    for step in range(26, 31):
        sink.log_metrics({"train/loss": 1.0 / step, "train/lr": 0.1}, step)
    assert sink.flush()

    loss = history(up.uri, run_id, "train/loss")
    assert [m.step for m in loss] == list(range(1, 31)), "every step exactly once"
    assert [m.value for m in loss] == pytest.approx([1.0 / s for s in range(1, 31)])
    stamps = [m.timestamp for m in sorted(loss, key=lambda m: m.step)]
    assert stamps == sorted(stamps), "logged in step order"
    assert [m.step for m in history(up.uri, run_id, "train/lr")] == list(range(1, 31))
    assert sink.last_step("train/loss") == 30


def test_a_server_that_stays_down_fails_the_sink_naming_the_uri(up):
    run_id = new_run(up.uri, "outage-limit")
    sink = MLflowSink(up.uri, run_id, outage_limit_s=3)
    sink.log_metrics({"train/loss": 1.0}, 1)
    assert sink.flush()
    up.stop()
    sink.log_metrics({"train/loss": 0.5}, 2)
    with pytest.raises(TrackingUnavailableError) as caught:
        sink.flush()
    message = str(caught.value)
    assert up.uri in message and "unreachable for" in message and "mlflow.outage_limit_s=3" in message
    with pytest.raises(TrackingUnavailableError):  # the step fails at its next log call
        sink.log_metrics({"train/loss": 0.25}, 3)
    with pytest.raises(TrackingUnavailableError, match=up.uri):  # as does a restarted worker's history read
        MLflowSink(up.uri, run_id, outage_limit_s=2).last_step("train/loss")


def test_refusals_and_our_own_errors_are_not_retried(up, tmp_path):
    """Only an unreachable store is waited for: a 4xx answer or a local error surfaces at once (with a 300 s limit,
    retrying it would end in TrackingUnavailableError instead)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client, outage = MlflowClient(up.uri), Outage(up.uri, limit_s=300)
    with pytest.raises(MlflowException, match="not found|does not exist|RESOURCE_DOES_NOT_EXIST"):
        outage.call(client.get_run, "0" * 32)
    with pytest.raises(OSError):
        outage.call(client.log_artifact, new_run(up.uri, "outage-refusals"), str(tmp_path / "missing.png"))
    assert outage.down_since is None


def test_the_driver_waits_out_an_outage(up, tmp_path):
    with Tracker(up.uri, "outage-driver", "driver", {}, outage_limit_s=120) as tracker:
        with tracker.step("train_vqvae", "f" * 16, {}, {"train.lr": 0.1}) as run_id:
            up.stop()
            restarting = restart_later(up, OUTAGE_S)
            grid = tmp_path / "recon.png"
            grid.write_bytes(b"\x89PNG\r\n\x1a\n")
            tracker.log_result(run_id, {"loss": 0.5}, {"recon_grid": str(grid)})  # retried until the server is back
            restarting.join()
        parent = tracker.run_id
    from mlflow.tracking import MlflowClient

    client = MlflowClient(up.uri)
    child = client.get_run(run_id)
    assert child.data.metrics["final/loss"] == 0.5 and child.data.tags["artifact.recon_grid"] == str(grid)
    assert [a.path for a in client.list_artifacts(run_id)] == ["recon.png"]
    assert child.info.status == "FINISHED" and client.get_run(parent).info.status == "FINISHED"


# ------------------------------------------------------------------------------------------------ in training
TRAIN = dict(steps=24, lr=2e-3, checkpoint_every=12, log_every=2, val_batches=1, max_failures=1)


@pytest.fixture(scope="module")
def cfg(tiny):
    return tiny(*tiny.SMALL, *tiny.overrides("train_vqvae.train", **TRAIN)).train_vqvae


def test_training_rides_out_an_outage(up, ray_local, digit_shards, tmp_path, cfg):
    """The server stops as soon as rank 0's first metrics arrive and comes back seconds later: training is not
    held up, and every logged step reaches the run once (the worker's last act is delivering its buffer)."""
    run_id = new_run(up.uri, "outage-training")

    def outage():
        while not history(up.uri, run_id, "train/loss"):
            time.sleep(0.2)
        up.stop()
        time.sleep(OUTAGE_S)
        up.start()

    thread = threading.Thread(target=outage, daemon=True)
    thread.start()
    sink = MLflowSink(up.uri, run_id, outage_limit_s=120)
    result = train_vqvae.run(cfg, {"shard": digit_shards}, str(tmp_path / "out"), sink=sink)
    thread.join()
    assert result.info["step"] == 24
    assert [m.step for m in history(up.uri, run_id, "train/loss")] == list(range(2, 25, 2))
    assert [m.step for m in history(up.uri, run_id, "val/recon_mse")] == [12, 24]


def test_training_fails_when_the_server_stays_down(up, ray_local, digit_shards, tmp_path, cfg):
    """Past the limit the step fails with the sink's message (not Ray's wrapped traceback), and the restarted worker
    group stops at once instead of training into the same outage."""
    run_id = new_run(up.uri, "outage-training")
    up.stop()
    sink = MLflowSink(up.uri, run_id, outage_limit_s=3)
    with pytest.raises(SinkUnavailableError) as caught:
        train_vqvae.run(replace(cfg, train=replace(cfg.train, steps=400)), {"shard": digit_shards},
                        str(tmp_path / "out"), sink=sink)  # fmt: skip
    message = str(caught.value)
    assert message.startswith("train_vqvae: ") and up.uri in message and "unreachable for" in message


def test_outage_limit_is_validated(tiny):
    assert tiny("mlflow.outage_limit_s=30").mlflow.outage_limit_s == 30
    with pytest.raises(ConfigError, match=r"mlflow\.outage_limit_s must be > 0"):
        tiny("mlflow.outage_limit_s=0")
