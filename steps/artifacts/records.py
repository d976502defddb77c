"""The run record every finished step output carries, and the lineage it gives.

    <output>/_SUCCESS    JSON: step, fingerprint, resolved config, inputs ({upstream step: its output URI}), row counts,
                         artifacts, MLflow run id; written last (``pipeline.cache`` publishes an output with it)

An output without its record is unfinished, whatever else it holds. Following the records' ``inputs`` from any output
gives every output it was made from (:func:`lineage`): how the generator finds the autoencoder of a priors folder and
how ``pipeline.verify`` finds what to check an output against, without knowing which step wrote what.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from steps.io import storage

SUCCESS = "_SUCCESS"


def record_uri(output: str) -> str:
    return storage.join(output, SUCCESS)


def read(output: str) -> dict[str, Any] | None:
    """The record of a finished output, or None (unfinished, or gone)."""
    uri = record_uri(output)
    return storage.read_json(uri) if storage.exists(uri) else None


def write(output: str, record: dict[str, Any]) -> None:
    storage.write_json(record_uri(output), record)


class Ancestor(NamedTuple):
    uri: str
    finished: bool  # False: gone (no record), so its own inputs are unknown


def lineage(output: str) -> dict[str, Ancestor]:
    """Every output ``output`` was made from, by the step that wrote it (nearest first), following the records'
    ``inputs``."""
    found: dict[str, Ancestor] = {}
    todo = [read(output) or {}]
    while todo:
        for step, uri in todo.pop(0).get("inputs", {}).items():
            if step not in found:
                record = read(uri)
                found[step] = Ancestor(uri, record is not None)
                if record is not None:
                    todo.append(record)
    return found
