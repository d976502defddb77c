"""The one protocol every step output's handle follows, so that nothing outside the graph asks which step wrote what.

A handle (:class:`Artifact` subclass, one per artifact module) is what ``pipeline/graph.py`` names as a step's
``output``. On it:

* ``open(uri)``: the output at ``uri``, read enough to answer questions (a clear error if it is not there);
* ``verify(upstream)``: read everything it holds and check it against the upstream outputs that still exist
  (:class:`Upstream`, found through the run records); returns the id counts of its parts; raises on anything wrong;
* ``content_digest()``: a digest of what the step computed (weights tensor by tensor, rows in id order; never file
  bytes, which hold timestamps): two runs that agree bitwise have equal digests; None when nothing compares;
* ``is_dataset``: a Parquet dataset (the orchestrator logs it as an MLflow dataset input where a step reads it);
* ``headline(metrics)``: of the metrics the step reported, those a parent run shows and a registered model carries.

``pipeline.verify``, the fault drills' comparison, the orchestrator's dataset list and headline metrics, model
registration and the generator's lookup all loop over the graph and call these.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any, ClassVar, TypeVar

import pyarrow as pa
import torch

from steps.io import storage
from steps.io.idcheck import IdCounts

A = TypeVar("A", bound="Artifact")


class Artifact:
    """Base of the step output handles (see the module docstring)."""

    is_dataset: ClassVar[bool] = False
    uri: str

    @classmethod
    def open(cls: type[A], uri: str) -> A:  # pragma: no cover - every handle has its own
        raise NotImplementedError

    def verify(self, upstream: Upstream) -> dict[str, IdCounts]:
        """Check what the output holds (and against ``upstream``); returns id counts by part (a split, ``codes``)."""
        return {}

    def content_digest(self) -> str | None:
        """A digest of what the step computed; None when the output holds nothing comparable."""
        return None

    @classmethod
    def headline(cls, metrics: Mapping[str, float]) -> dict[str, float]:
        """The step's metrics a parent run shows and a registered model version carries as tags (none by default)."""
        return {}


class Upstream:
    """The outputs an output was made from, by handle class (one per class in a lineage), each opened on first use.

    Args:
        outputs: handle class -> output URI, or None for an output that is gone (checks against it are skipped).
    """

    def __init__(self, outputs: Mapping[type[Artifact], str | None] | None = None) -> None:
        self.outputs = dict(outputs or {})
        self._open: dict[type[Artifact], Artifact] = {}

    def get(self, cls: type[A]) -> A | None:
        """The upstream output of handle class ``cls``, or None if there is none (or it is gone)."""
        uri = self.outputs.get(cls)
        if uri is None:
            return None
        if cls not in self._open:
            self._open[cls] = cls.open(uri)
        return self._open[cls]  # type: ignore[return-value]


def file_ids(files: Iterable[str]) -> Iterator[pa.Array]:
    """The id column of ``files``, one file at a time (memory: one file's ids): what id checks stream."""
    for uri in files:
        yield storage.read_column([uri], "id").combine_chunks()


# ------------------------------------------------------------------------------------------------ digests
def digest_tensors(h: Any, state: Mapping[str, torch.Tensor]) -> None:
    """Add a state dict to hash ``h``, tensor by tensor in key order (dtype, shape and bytes)."""
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def digest_tables(h: Any, tables: Iterable[pa.Table], columns: list[str]) -> None:
    """Add the ``columns`` of ``tables`` to hash ``h``, rows in id order (so file boundaries and order do not count)."""
    tables = list(tables)
    if tables:
        table = pa.concat_tables(tables).sort_by("id")
        for name in columns:
            h.update(f"{name}:{table.column(name).to_pylist()}".encode())
