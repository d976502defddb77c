"""What every step shares: the result type, URI-addressed storage, and the metrics sink.

A step is ``run(cfg, inputs, out, sink=None) -> StepResult``. ``inputs`` maps upstream step names to their output
URIs and ``out`` is the URI this step writes to. URIs are local paths or anything ``pyarrow.fs`` opens (``s3://``,
``gs://``, ``hdfs://``), so a step runs the same on a laptop and against a cluster's shared storage.

Steps never open MLflow runs. The orchestrator hands them a :class:`MetricsSink`; training workers of rank 0 call it,
so live curves reach whatever run the orchestrator opened. Sinks are small picklable objects for that reason.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs


@dataclass
class StepResult:
    """What a step hands back: scalar metrics, named artifact URIs, and counts worth recording."""

    metrics: dict[str, float] = field(default_factory=dict)
    artifacts: dict[str, str] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)


class MissingInputError(FileNotFoundError):
    """An upstream artifact a step needs does not exist (names the upstream step to run)."""


def require_input(inputs: Mapping[str, str], step: str, name: str) -> str:
    """The URI of upstream ``name`` for ``step``, or a clear error saying which step to run first."""
    if name not in inputs:
        raise MissingInputError(f"{step} needs the output of {name!r}; run the {name} step first")
    return inputs[name]


# ------------------------------------------------------------------------------------------------ storage
def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) for a local path or a pyarrow-supported URI."""
    if "://" not in uri:
        return pafs.LocalFileSystem(), str(Path(uri).absolute())
    return pafs.FileSystem.from_uri(uri)


def is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def join(uri: str, *parts: str) -> str:
    if "://" in uri:
        scheme, rest = uri.split("://", 1)
        return f"{scheme}://{posixpath.join(rest, *parts)}"
    return os.path.join(uri, *parts)


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def makedirs(uri: str) -> None:
    fs, path = filesystem(uri)
    fs.create_dir(path, recursive=True)


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"no such file: {uri}") from None


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole file; on local disk through a temporary file and a rename, so readers never see half of it."""
    fs, path = filesystem(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return
    # Object stores publish an object only when its upload completes, which is atomic enough.
    with fs.open_output_stream(path) as f:
        f.write(data)


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri))


def write_json(uri: str, obj: Any) -> None:
    write_bytes(uri, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())


def upload_file(local_path: str | os.PathLike, uri: str) -> None:
    write_bytes(uri, Path(local_path).read_bytes())


# ------------------------------------------------------------------------------------------------ metrics sink
class MetricsSink:
    """Where training metrics go. The base class drops them; the orchestrator passes an MLflow-backed one."""

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        pass

    def last_step(self, key: str) -> int:
        """The highest step already logged for ``key`` (0 if none): a restarted worker does not log twice."""
        return 0

    def log_artifact(self, local_path: str, artifact_path: str | None = None) -> None:
        pass


class PrefixSink(MetricsSink):
    """Prefixes metric names, e.g. ``top/`` and ``bottom/`` for two priors logging into one run."""

    def __init__(self, inner: MetricsSink, prefix: str) -> None:
        self.inner = inner
        self.prefix = prefix

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        self.inner.log_metrics({self.prefix + k: v for k, v in metrics.items()}, step)

    def last_step(self, key: str) -> int:
        return self.inner.last_step(self.prefix + key)

    def log_artifact(self, local_path: str, artifact_path: str | None = None) -> None:
        self.inner.log_artifact(local_path, artifact_path)


class JsonlSink(MetricsSink):
    """Appends ``{"step": s, **metrics}`` lines to a local file: handy in tests and for offline runs."""

    def __init__(self, path: str) -> None:
        self.path = path

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **{k: float(v) for k, v in metrics.items()}}) + "\n")

    def last_step(self, key: str) -> int:
        if not os.path.exists(self.path):
            return 0
        with open(self.path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        return max((r["step"] for r in rows if key in r), default=0)


class MLflowSink(MetricsSink):
    """Logs into an existing MLflow run by id (it never creates one). Picklable: holds two strings."""

    def __init__(self, tracking_uri: str, run_id: str) -> None:
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self._client = None

    def __getstate__(self) -> dict[str, Any]:
        return {"tracking_uri": self.tracking_uri, "run_id": self.run_id, "_client": None}

    @property
    def client(self):
        if self._client is None:
            from mlflow.tracking import MlflowClient  # deferred: importing mlflow costs seconds

            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        # A busy SQLite store or a flaky server must not kill hours of training: retry, then drop with a warning.
        for attempt in range(4):
            try:
                self.client.log_batch(self.run_id, metrics=batch, synchronous=True)
                return
            except Exception as exc:
                if attempt == 3:
                    logging.getLogger(__name__).warning("dropped metrics of step %d: %s", step, exc)
                    return
                time.sleep(0.5 * 2**attempt)

    def last_step(self, key: str) -> int:
        try:
            return max((m.step for m in self.client.get_metric_history(self.run_id, key)), default=0)
        except Exception as exc:  # an unreachable store must not stop training; at worst a step is logged twice
            logging.getLogger(__name__).warning("could not read metric history of %s: %s", key, exc)
            return 0

    def log_artifact(self, local_path: str, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, local_path, artifact_path)
