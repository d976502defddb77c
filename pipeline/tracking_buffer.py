"""Riding out tracking-store outages: retries with backoff, and the buffered MLflow metrics sink of training workers.

A tracking server that is restarted, or unreachable for a minute, must not cost a metric or a training step:

* :class:`Outage` retries one call until it succeeds, backing off from 1 s to 15 s between tries, for as long as the
  store has been unreachable for less than ``mlflow.outage_limit_s`` (default 300 s); past that it raises
  :class:`TrackingUnavailableError`, naming the tracking URI and for how long it was unreachable. Errors the store
  answers with (a 4xx: a bad value, a deleted run) are not outages and pass through at once. The driver's
  :class:`pipeline.tracking.Tracker` sends every call through one.
* :class:`MLflowSink` (what rank-0 training workers log into) never makes training wait for the store:
  ``log_metrics`` stamps the batch and puts it on an in-memory queue; one background thread sends the queue in order
  (merging queued batches into requests of up to 1000 metrics) through an :class:`Outage`. A batch leaves the queue
  only once the store has taken it, so an outage delays metrics but loses none; a retried request carries the same
  timestamps, and MLflow's SQL store ignores a metric row it already has, so nothing is logged twice either. The
  queue holds :data:`MAX_PENDING` batches (hours of logging at usual rates); when it is full, ``log_metrics`` waits
  for room rather than drop. ``flush()`` at the end of training delivers the rest; after the limit, ``log_metrics``
  and ``flush`` raise the thread's :class:`TrackingUnavailableError`, which fails the step.

MLflow's HTTP client has retries of its own (urllib3, per request): by default 7 with a backoff factor of 2 and a
120 s timeout, so one request to a stopped server takes minutes to fail, which would make the limit here as coarse.
:func:`configure_http_retries` therefore sets short per-request retries (``MLFLOW_HTTP_REQUEST_MAX_RETRIES=2``,
``MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR=1``, ``MLFLOW_HTTP_REQUEST_TIMEOUT=60``: a stopped server fails a request in
about 2 s, a hung one in a few minutes at most) in the driver and in every worker that logs, and the long outage is
handled here. A value already in the environment wins, so an operator can still tune MLflow's retries.
"""

from __future__ import annotations

import collections
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from steps.core.step import MetricsSink, SinkUnavailableError

log = logging.getLogger(__name__)
T = TypeVar("T")
DEFAULT_OUTAGE_LIMIT_S = 300.0
BACKOFF_FIRST_S, BACKOFF_MAX_S = 1.0, 15.0
MAX_PENDING = 10_000  # queued log_metrics calls; beyond this log_metrics waits (nothing is dropped)
MAX_METRICS_PER_REQUEST = 1000  # MLflow's limit for one log_batch
HTTP_RETRIES = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "60",
}


class TrackingUnavailableError(SinkUnavailableError):
    """The tracking store stayed unreachable past ``mlflow.outage_limit_s``."""


def configure_http_retries() -> None:
    """Short per-request retries in MLflow's HTTP client (see the module docstring); values already set win."""
    for name, value in HTTP_RETRIES.items():
        os.environ.setdefault(name, value)


def shown_uri(uri: str) -> str:
    """``uri`` without a password (``http://user:***@host``), for messages."""
    return re.sub(r"(//[^/@:]*):[^/@]*@", r"\1:***@", uri)


def is_outage(exc: BaseException) -> bool:
    """True for errors that may pass when the store comes back (no connection, a timeout, a 5xx or 429, a locked
    SQLite store); False for answers that will not change (a 4xx: a bad value, a missing or finished run) and for
    errors of our own (a missing local file, a bug), which retrying would only hide."""
    import requests
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException):  # MLflow's HTTP client wraps connection errors as INTERNAL_ERROR (500)
        status = exc.get_http_status_code()
        return status >= 500 or status in (408, 429)
    if isinstance(exc, (ConnectionError, TimeoutError, requests.RequestException)):
        return True
    return type(exc).__name__ == "OperationalError"  # SQLAlchemy's: "database is locked", a lost connection


class Outage:
    """Retries calls to one tracking store while it has been unreachable for less than ``limit_s``.

    The clock starts at the first failed call and stops at the next success; once the limit has passed, later calls
    get one try each (the store is known to be gone: a failing pipeline does not wait out the limit again).
    """

    def __init__(self, uri: str, limit_s: float = DEFAULT_OUTAGE_LIMIT_S) -> None:
        self.uri = uri
        self.limit_s = limit_s
        self.down_since: float | None = None

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        delay = BACKOFF_FIRST_S
        while True:
            try:
                out = fn(*args, **kwargs)
            except Exception as exc:
                if not is_outage(exc):
                    raise
                now = time.monotonic()
                if self.down_since is None:
                    self.down_since = now
                    log.warning(
                        "MLflow tracking store %s unreachable (%s); retrying for up to %.0f s",
                        shown_uri(self.uri), _first_line(exc), self.limit_s,
                    )  # fmt: skip
                down = now - self.down_since
                if down >= self.limit_s:
                    raise TrackingUnavailableError(self.message(down, exc)) from exc
                time.sleep(min(delay, self.limit_s - down))
                delay = min(2 * delay, BACKOFF_MAX_S)
                continue
            if self.down_since is not None:
                log.warning(
                    "MLflow tracking store %s reachable again after %.0f s",
                    shown_uri(self.uri), time.monotonic() - self.down_since,
                )  # fmt: skip
                self.down_since = None
            return out

    def message(self, down: float, exc: BaseException) -> str:
        return (
            f"the MLflow tracking store {shown_uri(self.uri)} has been unreachable for {down:.0f} s "
            f"(mlflow.outage_limit_s={self.limit_s:g}; last error: {_first_line(exc)}). Step outputs already "
            "finished stay valid in artifacts.root: bring the tracking server back (or raise mlflow.outage_limit_s) "
            "and rerun the same command to continue from them"
        )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines() or [type(exc).__name__])[0][:300]


class MetricsBuffer:
    """One background thread delivering queued metric batches to one MLflow run, in order, through an outage."""

    def __init__(self, client, run_id: str, outage: Outage, max_pending: int = MAX_PENDING) -> None:
        self.client = client
        self.run_id = run_id
        self.outage = outage
        self.max_pending = max_pending
        self._queue: collections.deque[list] = collections.deque()  # the head stays until the store took it
        self._cond = threading.Condition()
        self._error: TrackingUnavailableError | None = None
        self._thread = threading.Thread(target=self._deliver, name="mlflow-metrics", daemon=True)
        self._thread.start()

    def put(self, batch: list) -> None:
        """Queue one batch of ``mlflow.entities.Metric``; waits only while the queue is full."""
        with self._cond:
            while self._error is None and len(self._queue) >= self.max_pending:
                self._cond.wait(1.0)
            if self._error is not None:
                raise self._error
            self._queue.append(batch)
            self._cond.notify_all()

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until the store has every queued batch; False if ``timeout_s`` passed first."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._cond:
            while self._queue and self._error is None:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left if left is not None else 1.0)
            if self._error is not None:
                raise self._error
        return True

    def _deliver(self) -> None:
        while True:
            with self._cond:
                while not self._queue:
                    self._cond.wait()
                taken, metrics = 0, []
                for batch in self._queue:  # whole batches, up to one request's worth
                    if metrics and len(metrics) + len(batch) > MAX_METRICS_PER_REQUEST:
                        break
                    metrics.extend(batch)
                    taken += 1
            try:
                for i in range(0, len(metrics), MAX_METRICS_PER_REQUEST):
                    chunk = metrics[i : i + MAX_METRICS_PER_REQUEST]
                    self.outage.call(self.client.log_batch, self.run_id, metrics=chunk, synchronous=True)
            except TrackingUnavailableError as exc:
                with self._cond:
                    self._error = exc
                    self._cond.notify_all()
                return
            except Exception as exc:  # the store refused them (not an outage): a retry would be refused again
                steps = sorted({m.step for m in metrics})
                log.warning("MLflow run %s refused the metrics of steps %s: %s", self.run_id, steps, _first_line(exc))
            with self._cond:
                for _ in range(taken):
                    self._queue.popleft()
                self._cond.notify_all()


class MLflowSink(MetricsSink):
    """Logs into an existing MLflow run by id (it never creates one), buffered (see the module docstring).

    Picklable: it travels as the URI, the run id and the limit; the client and the thread start on first use.
    """

    def __init__(self, tracking_uri: str, run_id: str, outage_limit_s: float = DEFAULT_OUTAGE_LIMIT_S) -> None:
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.outage_limit_s = outage_limit_s
        self._client = None
        self._buffer: MetricsBuffer | None = None
        self._outage = Outage(tracking_uri, outage_limit_s)  # for the calling thread's own requests
        self._logged: dict[str, int] = {}  # key -> highest step queued by this process

    def __getstate__(self) -> dict[str, Any]:
        return {"tracking_uri": self.tracking_uri, "run_id": self.run_id, "outage_limit_s": self.outage_limit_s}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)

    @property
    def client(self):
        if self._client is None:
            from mlflow.tracking import MlflowClient  # deferred: importing mlflow costs seconds

            configure_http_retries()
            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        if self._buffer is None:
            self._buffer = MetricsBuffer(self.client, self.run_id, Outage(self.tracking_uri, self.outage_limit_s))
        now = int(time.time() * 1000)  # stamped now: a retried request repeats it, so the store can spot a repeat
        self._buffer.put([Metric(k, float(v), now, step) for k, v in metrics.items()])
        for k in metrics:
            self._logged[k] = max(self._logged.get(k, 0), step)

    def last_step(self, key: str) -> int:
        """The highest step logged for ``key``, waiting out an outage (a guess of 0 would log steps twice)."""
        history = self._outage.call(self.client.get_metric_history, self.run_id, key)
        return max([m.step for m in history] + [self._logged.get(key, 0)])

    def log_artifact(self, local_path: str, artifact_path: str | None = None) -> None:
        self._outage.call(self.client.log_artifact, self.run_id, local_path, artifact_path)

    def flush(self, timeout_s: float | None = None) -> bool:
        return True if self._buffer is None else self._buffer.flush(timeout_s)
