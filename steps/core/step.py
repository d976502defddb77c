"""What every step shares: the step signature, its result, the missing-input error, and the metrics sinks.

A step is ``run(cfg, inputs, out, sink=None) -> StepResult`` (:class:`StepRun`); a training step also takes
``wrap_task`` (:class:`TrainingStepRun`), a function the orchestrator may pass to wrap its training tasks (the fault
injector of ``python -m pipeline.faults`` does; None in normal use). ``inputs`` maps upstream step names
to their output URIs and ``out`` is the URI this step writes to (storage: :mod:`steps.io.storage`). A step opens its
inputs through the artifact handles of :mod:`steps.artifacts` and never reads another step's files by name.

Steps never open MLflow runs. The orchestrator hands them a :class:`MetricsSink`; training workers of rank 0 call it,
so live curves reach whatever run the orchestrator opened. Sinks are small picklable objects for that reason; the
MLflow-backed one is ``pipeline.tracking_buffer.MLflowSink``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar


@dataclass
class StepResult:
    """What a step hands back: scalar metrics, named artifact URIs, and counts worth recording."""

    metrics: dict[str, float] = field(default_factory=dict)
    artifacts: dict[str, str] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)


C = TypeVar("C", contravariant=True)


class StepRun(Protocol[C]):
    """The signature of every step's ``run``: settings, upstream output URIs by step name, output URI, metrics sink."""

    def __call__(
        self, cfg: C, inputs: Mapping[str, str], out: str, sink: MetricsSink | None = None
    ) -> StepResult: ...  # pragma: no cover - protocol


# A function applied to each task a training step trains (``task = wrap_task(task)``): the one hook into the loop.
TaskWrap = Callable[[Any], Any]


class TrainingStepRun(Protocol[C]):
    """A training step's ``run``: :class:`StepRun` plus the task hook."""

    def __call__(
        self, cfg: C, inputs: Mapping[str, str], out: str, sink: MetricsSink | None = None,
        wrap_task: TaskWrap | None = None,
    ) -> StepResult: ...  # pragma: no cover - protocol  # fmt: skip


class MissingInputError(FileNotFoundError):
    """An upstream artifact a step needs does not exist (names the upstream step to run)."""


def require_input(inputs: Mapping[str, str], step: str, name: str) -> str:
    """The URI of upstream ``name`` for ``step``, or a clear error saying which step to run first."""
    if name not in inputs:
        raise MissingInputError(f"{step} needs the output of {name!r}; run the {name} step first")
    return inputs[name]


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

    def flush(self, timeout_s: float | None = None) -> bool:
        """Deliver what was logged so far (a sink may buffer); False if ``timeout_s`` passed first.

        Raises:
            SinkUnavailableError: the sink's store stayed unreachable past the sink's limit.
        """
        return True


class SinkUnavailableError(RuntimeError):
    """A sink's store stayed unreachable past its limit; the message names the store and for how long."""


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

    def flush(self, timeout_s: float | None = None) -> bool:
        return self.inner.flush(timeout_s)


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
