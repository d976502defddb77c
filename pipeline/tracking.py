"""The MLflow run tree: one parent run per invocation, one nested child run per step.

Only this driver and the rank-0 training workers write (SQLite allows one writer at a time). A child run gets the
step's flattened config as params, its fingerprint, inputs and git sha as tags, its final metrics, its image grids
as artifacts and its output URIs as tags. A cached step still gets a child run, tagged ``cached=true`` and linked
to the run that produced the output, so every invocation shows the whole graph.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from typing import Any

from steps import storage
from steps.common import StepResult

log = logging.getLogger(__name__)
MAX_PARAM_LEN = 6000  # MLflow 3 limit for param values
SECRET_HINTS = ("token", "password", "secret", "key_id", "access_key")


def git_sha() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=os.path.dirname(os.path.abspath(__file__)),
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# scheme://user:password@host -> scheme://user:***@host (a tracking URI of a database or a server with basic auth)
_URI_PASSWORD = re.compile(r"(?P<head>\b[a-zA-Z][\w+.-]*://[^/\s:@]*):[^/\s@]+@")
_SECRET_LINE = re.compile(r"(?im)^(?P<key>\s*[+~]*[\w.-]*(?:" + "|".join(SECRET_HINTS) + r")[\w.-]*\s*[:=]\s*)\S.*$")


def redact(text: str) -> str:
    """``text`` with URI passwords and the values of secret-looking ``key: value`` / ``key=value`` lines hidden.

    Everything the driver sends to MLflow as text (params, the overrides tag, the resolved config) goes through it.
    """
    return _SECRET_LINE.sub(r"\g<key>***", _URI_PASSWORD.sub(r"\g<head>:***@", text))


def redact_overrides(overrides: list[str]) -> str:
    """Hydra's command-line overrides as one string, each ``key=value`` redacted on its own."""
    return " ".join(redact(o) for o in overrides)


def _param_value(key: str, value: Any) -> str:
    if any(h in key.lower() for h in SECRET_HINTS):
        return "***"
    return redact(str(value))[:MAX_PARAM_LEN]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def close_orphaned_runs(client, experiment_id: str) -> list[str]:
    """Mark KILLED the runs a dead driver of this host left RUNNING (a killed driver cannot end its runs).

    Only runs whose ``driver_host`` tag is this host and whose ``driver_pid`` no longer exists, and their RUNNING
    child runs; runs of live drivers and of other hosts are left alone. Returns the run ids closed.
    """
    host = socket.gethostname().replace("'", "")
    query = f"attributes.status = 'RUNNING' and tags.driver_host = '{host}'"
    closed = []
    for run in client.search_runs([experiment_id], query, max_results=200):
        pid = run.data.tags.get("driver_pid", "")
        if not pid.isdigit() or _alive(int(pid)):
            continue
        children = client.search_runs(
            [experiment_id], f"attributes.status = 'RUNNING' and tags.`mlflow.parentRunId` = '{run.info.run_id}'"
        )
        for r in [*children, run]:
            client.set_terminated(r.info.run_id, status="KILLED")
            closed.append(r.info.run_id)
        log.info("MLflow run %s of a driver that died (pid %s) marked KILLED", run.info.run_id, pid)
    return closed


@contextlib.contextmanager
def store_lock(tracking_uri: str) -> Iterator[None]:
    """Hold an exclusive lock beside a SQLite store while setting it up.

    The first process to open a new SQLite store creates its tables and runs MLflow's schema migrations; a second
    process doing the same at that moment fails inside them (alembic: "Online migration expected to match one
    row"). Two pipelines started together on a fresh store therefore take turns here. Other stores (a tracking
    server) need no lock.
    """
    prefix = "sqlite:///"
    if not tracking_uri.startswith(prefix):
        yield
        return
    path = tracking_uri[len(prefix) :] + ".lock"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class Tracker:
    """Opens the parent run on enter; :meth:`step` opens child runs."""

    def __init__(self, tracking_uri: str, experiment: str, run_name: str | None, tags: Mapping[str, str]) -> None:
        import mlflow

        self.mlflow = mlflow
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.run_name = run_name
        self.tags = dict(tags)
        self.parent = None

    def __enter__(self) -> Tracker:
        self.mlflow.set_tracking_uri(self.tracking_uri)
        with store_lock(self.tracking_uri):  # the first access of a new SQLite store creates its tables
            experiment = self.mlflow.set_experiment(self.experiment)
            close_orphaned_runs(self.mlflow.tracking.MlflowClient(), experiment.experiment_id)
        driver = {"driver_host": socket.gethostname(), "driver_pid": str(os.getpid())}
        self.parent = self.mlflow.start_run(run_name=self.run_name, tags={"git_sha": git_sha(), **driver, **self.tags})
        return self

    def __exit__(self, exc_type, *_) -> None:
        self.mlflow.end_run(status="FAILED" if exc_type else "FINISHED")

    @property
    def run_id(self) -> str:
        return self.parent.info.run_id

    def log_text(self, text: str, name: str) -> None:
        self.mlflow.log_text(redact(text), name)

    @contextlib.contextmanager
    def step(self, name: str, fp: str, inputs: Mapping[str, str], params: Mapping[str, Any]) -> Iterator[str]:
        tags = {"step": name, "fingerprint": fp, "git_sha": git_sha()}
        tags.update({f"input.{k}": v for k, v in inputs.items()})
        with self.mlflow.start_run(run_name=name, nested=True, tags=tags) as run:
            items = [(k, _param_value(k, v)) for k, v in params.items()]
            for i in range(0, len(items), 100):  # MLflow takes at most 100 params per request
                self.mlflow.log_params(dict(items[i : i + 100]))
            yield run.info.run_id

    def cached(self, run_id: str, record: Mapping[str, Any]) -> None:
        client = self.mlflow.tracking.MlflowClient()
        client.set_tag(run_id, "cached", "true")
        if record.get("mlflow_run_id"):
            client.set_tag(run_id, "produced_by", record["mlflow_run_id"])
        self.log_result(run_id, record.get("metrics", {}), record.get("artifacts", {}), images=False)

    def log_result(
        self, run_id: str, metrics: Mapping[str, float], artifacts: Mapping[str, str], images: bool = True
    ) -> None:
        client = self.mlflow.tracking.MlflowClient()
        from mlflow.entities import Metric, RunTag

        now = int(time.time() * 1000)
        client.log_batch(
            run_id,
            metrics=[Metric(f"final/{k}", float(v), now, 0) for k, v in metrics.items()],
            tags=[RunTag(f"artifact.{k}", v) for k, v in artifacts.items()],
        )
        if not images:
            return
        for uri in artifacts.values():
            if uri.endswith((".png", ".json")):
                with tempfile.TemporaryDirectory() as d:
                    local = os.path.join(d, os.path.basename(uri))
                    with open(local, "wb") as f:
                        f.write(storage.read_bytes(uri))
                    client.log_artifact(run_id, local)


def result_record(result: StepResult) -> dict[str, Any]:
    return {"metrics": dict(result.metrics), "artifacts": dict(result.artifacts), "info": result.info}
