"""The MLflow run tree: one parent run per invocation, one nested child run per step.

Only this driver and the rank-0 training workers write (SQLite allows one writer at a time). A child run gets the
step's flattened config as params, its fingerprint, inputs and git sha as tags, its final metrics, its image grids
as artifacts and its output URIs as tags. A cached step still gets a child run, tagged ``cached=true`` and linked
to the run that produced the output, so every invocation shows the whole graph.

Every request goes through one :class:`pipeline.tracking_buffer.Outage`: a tracking server that is down for less than
``mlflow.outage_limit_s`` delays the driver instead of failing it; past that the run fails naming the tracking URI.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
import subprocess
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from pipeline.secrets import redact, redact_value
from pipeline.tracking_buffer import DEFAULT_OUTAGE_LIMIT_S, Outage, configure_http_retries
from steps.core.step import StepResult
from steps.io import storage

log = logging.getLogger(__name__)
MAX_PARAM_LEN = 6000  # MLflow 3 limit for param values
# The UI opens an experiment in its GenAI view unless this tag says it holds model-training runs.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
# The Hydra groups whose choice every parent run records (so Compare shows them even when not overridden).
CHOICE_GROUPS = ("experiment", "data", "model", "prior", "debug")
# Overrides that say where things go, not what was run: left out of the parent run's name.
NOT_IN_NAME = ("hydra.", "artifacts.", "mlflow.", "ray.", "steps", "force")
MAX_NAME_LEN = 120


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


def _param_value(key: str, value: Any) -> str:
    return redact_value(key, value)[:MAX_PARAM_LEN]


def _split_override(override: str) -> tuple[str, str] | None:
    """``key=value`` (also ``+key=value``, ``++key=value``) -> (key, value); a deletion ``~key`` -> None."""
    if override.startswith("~") or "=" not in override:
        return None
    key, value = override.lstrip("+").split("=", 1)
    return key.strip(), value.strip()


def run_params(overrides: list[str], choices: Mapping[str, str | None]) -> dict[str, str]:
    """The parent run's params: the chosen option of each main group, then every override (but ``hydra.*`` and
    ``mlflow.*``: where the run is recorded, not what it ran).

    These are what two pipeline runs differ in, so MLflow's Compare on two parent runs shows exactly that.
    """
    params = {g: str(choices[g]) for g in CHOICE_GROUPS if choices.get(g) not in (None, "null")}
    for override in overrides:
        pair = _split_override(override)
        if pair is not None and not pair[0].startswith(("hydra.", "mlflow.")):  # not what ran, nor what it did
            params[pair[0]] = pair[1]
    return {k: _param_value(k, v) for k, v in params.items()}


def run_name(overrides: list[str], choices: Mapping[str, str | None]) -> str:
    """A readable parent-run name: the experiment, then the overrides that change what is run.

    ``digits32 model=vqvae train_prior.train.steps=400``; a run with no such override is ``digits32 defaults``.
    """
    parts = []
    for override in overrides:
        pair = _split_override(override)
        if pair is not None and not pair[0].startswith(NOT_IN_NAME) and pair[0] != "experiment":
            parts.append(f"{pair[0]}={_param_value(pair[0], pair[1])}")
    name = " ".join([str(choices.get("experiment") or "run"), *(parts or ["defaults"])])
    return name if len(name) <= MAX_NAME_LEN else name[: MAX_NAME_LEN - 3] + "..."


LOGIN_HELP = (
    "give the user and password of the server's authentication app in MLFLOW_TRACKING_USERNAME and "
    "MLFLOW_TRACKING_PASSWORD, or in ~/.mlflow/credentials on every node (docs/cluster.md, Logging in to MLflow)"
)


def login_problem(tracking_uri: str) -> str | None:
    """Why a tracking server refuses this process's login (HTTP 401 or 403), or None: a server that lets us in, a
    store that is not a server, or one that does not answer now (an outage is the tracker's to ride out)."""
    if not tracking_uri.startswith(("http://", "https://")):
        return None
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    configure_http_retries()  # a server that is down answers this probe in seconds, not after minutes of retries
    try:
        MlflowClient(tracking_uri).search_experiments(max_results=1)
    except MlflowException as exc:
        status = exc.get_http_status_code()
        if status in (401, 403):
            what = "refused the login" if status == 401 else "refused this user"
            return f"the MLflow server at {redact(tracking_uri)} {what} (HTTP {status}): {LOGIN_HELP}"
    except Exception:  # connection refused, a timeout: not a login problem
        return None
    return None


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

    def __init__(
        self,
        tracking_uri: str,
        experiment: str,
        run_name: str | None,
        tags: Mapping[str, str],
        system_metrics: bool = False,
        outage_limit_s: float = DEFAULT_OUTAGE_LIMIT_S,
    ) -> None:
        import mlflow

        configure_http_retries()
        self.mlflow = mlflow
        self.call = Outage(tracking_uri, outage_limit_s).call  # every request to the store, retried through an outage
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.run_name = run_name
        self.tags = dict(tags)
        self.system_metrics = system_metrics
        self.parent = None

    def __enter__(self) -> Tracker:
        self.mlflow.set_tracking_uri(self.tracking_uri)
        with store_lock(self.tracking_uri):  # the first access of a new SQLite store creates its tables
            client = self.mlflow.tracking.MlflowClient()
            experiment = self.call(self.mlflow.set_experiment, self.experiment)
            self.call(close_orphaned_runs, client, experiment.experiment_id)
        if EXPERIMENT_KIND[0] not in experiment.tags:  # a kind the user set by hand is theirs
            self.call(client.set_experiment_tag, experiment.experiment_id, *EXPERIMENT_KIND)
        driver = {"driver_host": socket.gethostname(), "driver_pid": str(os.getpid())}
        self.parent = self.call(
            self.mlflow.start_run,
            run_name=redact(self.run_name) if self.run_name else None,
            tags={k: redact(str(v)) for k, v in {"git_sha": git_sha(), **driver, **self.tags}.items()},
            log_system_metrics=self.system_metrics,
        )
        return self

    def __exit__(self, exc_type, *_) -> None:
        self._end_run(failing=exc_type is not None)

    def _end_run(self, failing: bool) -> None:
        """End the innermost active run, retrying through an outage; while an error is on its way out, one try and a
        warning, so that error is the one reported (a run left RUNNING is closed by the next pipeline on this host)."""
        run_id = self.mlflow.active_run().info.run_id
        status = "FAILED" if failing else "FINISHED"
        client = self.mlflow.tracking.MlflowClient()
        try:
            client.set_terminated(run_id, status) if failing else self.call(client.set_terminated, run_id, status)
        except Exception as exc:
            if not failing:
                raise
            log.warning("MLflow run %s not marked %s: %s", run_id, status, str(exc).splitlines()[0])
        finally:
            with contextlib.suppress(Exception):  # pops the run off MLflow's stack (its request repeats ours)
                self.mlflow.end_run(status)

    @property
    def run_id(self) -> str:
        return self.parent.info.run_id

    def where(self) -> str:
        """Where to see the parent run in the MLflow UI: its URL, opened in the UI's model-training view."""
        page = f"#/experiments/{self.parent.info.experiment_id}/runs/{self.run_id}?workflowType=machine_learning"
        if self.tracking_uri.startswith(("http://", "https://")):
            return f"MLflow run: {redact(self.tracking_uri.rstrip('/'))}/{page}"
        return (
            f"MLflow run: mlflow ui --backend-store-uri {redact(self.tracking_uri)}, then http://127.0.0.1:5000/{page}"
        )

    def log_text(self, text: str, name: str) -> None:
        self.call(self.mlflow.log_text, redact(text), name)

    def log_run(
        self,
        params: Mapping[str, str],
        metrics: Mapping[str, float],
        datasets: Mapping[str, tuple[str, str]] | None = None,
    ) -> None:
        """Params, metrics and datasets (name -> (URI, fingerprint)) of the parent run: what Compare on two pipeline
        runs shows, and the runs table's dataset column."""
        for name, (uri, digest) in (datasets or {}).items():
            log_dataset(self.mlflow, name, uri, digest, self.call)
        from mlflow.entities import Metric, Param

        now = int(time.time() * 1000)
        client = self.mlflow.tracking.MlflowClient()
        items = [Param(k, _param_value(k, v)) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per request
            self.call(client.log_batch, self.run_id, params=items[i : i + 100])
        if metrics:
            self.call(client.log_batch, self.run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()])

    @contextlib.contextmanager
    def step(
        self,
        name: str,
        fp: str,
        inputs: Mapping[str, str],
        params: Mapping[str, Any],
        datasets: Mapping[str, tuple[str, str]] | None = None,
    ) -> Iterator[str]:
        """A child run for step ``name``; ``datasets`` (upstream name -> (URI, fingerprint)) are logged as its
        inputs, so the UI's dataset column shows which shards or code dataset the step read."""
        tags = {"step": name, "fingerprint": fp, "git_sha": git_sha()}
        tags.update({f"input.{k}": redact(v) for k, v in inputs.items()})
        run = self.call(self.mlflow.start_run, run_name=name, nested=True, tags=tags)
        try:
            items = [(k, _param_value(k, v)) for k, v in params.items()]
            for i in range(0, len(items), 100):  # MLflow takes at most 100 params per request
                self.call(self.mlflow.log_params, dict(items[i : i + 100]))
            for dataset_name, (uri, digest) in (datasets or {}).items():
                log_dataset(self.mlflow, dataset_name, uri, digest, self.call)
            yield run.info.run_id
        except BaseException:
            self._end_run(failing=True)
            raise
        self._end_run(failing=False)

    def cached(self, run_id: str, record: Mapping[str, Any]) -> None:
        client = self.mlflow.tracking.MlflowClient()
        self.call(client.set_tag, run_id, "cached", "true")
        if record.get("mlflow_run_id"):
            self.call(client.set_tag, run_id, "produced_by", record["mlflow_run_id"])
        self.log_result(run_id, record.get("metrics", {}), record.get("artifacts", {}), images=False)

    def log_result(
        self, run_id: str, metrics: Mapping[str, float], artifacts: Mapping[str, str], images: bool = True
    ) -> None:
        client = self.mlflow.tracking.MlflowClient()
        from mlflow.entities import Metric, RunTag

        now = int(time.time() * 1000)
        self.call(
            client.log_batch,
            run_id,
            metrics=[Metric(f"final/{k}", float(v), now, 0) for k, v in metrics.items()],
            tags=[RunTag(f"artifact.{k}", redact(v)) for k, v in artifacts.items()],
        )
        if not images:
            return
        for uri in artifacts.values():
            if uri.endswith((".png", ".json")):
                with tempfile.TemporaryDirectory() as d:
                    local = os.path.join(d, os.path.basename(uri))
                    with open(local, "wb") as f:
                        f.write(storage.read_bytes(uri))
                    self.call(client.log_artifact, run_id, local)


def parquet_schema(uri: str):
    """The MLflow schema of the Parquet dataset folder at ``uri`` (hive partitions, e.g. ``split``, included)."""
    import pyarrow as pa
    import pyarrow.dataset as ds
    from mlflow.types import ColSpec, DataType, Schema
    from mlflow.types.schema import Array

    def spec(t: pa.DataType):
        if pa.types.is_dictionary(t):
            return spec(t.value_type)
        if pa.types.is_list(t) or pa.types.is_fixed_size_list(t) or pa.types.is_large_list(t):
            return Array(spec(t.value_type))
        for check, dtype in (
            (pa.types.is_boolean, DataType.boolean),
            (lambda x: pa.types.is_integer(x) and x.bit_width <= 32, DataType.integer),
            (pa.types.is_integer, DataType.long),
            (pa.types.is_float32, DataType.float),
            (pa.types.is_floating, DataType.double),
            (lambda x: pa.types.is_binary(x) or pa.types.is_large_binary(x), DataType.binary),
        ):
            if check(t):
                return dtype
        return DataType.string

    filesystem, path = storage.filesystem(uri)
    schema = ds.dataset(path, format="parquet", partitioning="hive", filesystem=filesystem).schema
    return Schema([ColSpec(spec(f.type), f.name, required=not f.nullable) for f in schema])


def log_dataset(mlflow, name: str, uri: str, digest: str, call: Callable[..., Any] | None = None) -> None:
    """Log the dataset at ``uri`` as an input of the active run (name, digest, source, schema). Lineage is a
    convenience: a dataset MLflow cannot describe is logged without a schema, or skipped, with a warning. ``call``
    runs the request (the tracker's retries through an outage)."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    try:
        with warnings.catch_warnings():  # "can be interpreted in multiple ways": two registered local sources
            warnings.simplefilter("ignore")
            source = resolve_dataset_source(redact(uri))  # the source is recorded: no credentials in it
    except Exception as exc:
        log.warning("dataset %s (%s) not logged to MLflow: %s", name, uri, exc)
        return
    try:
        schema = parquet_schema(uri)
    except Exception as exc:
        log.warning("schema of dataset %s (%s) not read: %s", name, uri, exc)
        schema = None
    dataset = MetaDataset(source, name=name, digest=digest[:16], schema=schema)
    # Two pipelines logging the same dataset at once race on the store's unique (experiment, name, digest) row: the
    # loser's insert fails, and its retry finds the row the winner made.
    send = call or (lambda fn, *args, **kwargs: fn(*args, **kwargs))
    for attempt in range(3):
        try:
            send(mlflow.log_input, dataset, context="input")
            return
        except Exception as exc:
            if attempt == 2:
                log.warning("dataset %s (%s) not logged to MLflow: %s", name, uri, str(exc).splitlines()[0])
            else:
                time.sleep(0.2 * (attempt + 1))


def result_record(result: StepResult) -> dict[str, Any]:
    return {"metrics": dict(result.metrics), "artifacts": dict(result.artifacts), "info": result.info}
