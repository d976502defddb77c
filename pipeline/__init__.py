"""Orchestration: ``python -m pipeline`` composes the Hydra config, plans the step graph against the artifact cache,
starts Ray only if a step must run, and records everything in an MLflow run tree.

``from pipeline import Generator`` loads a trained generator (:mod:`pipeline.serving.generator`).
"""

from __future__ import annotations

from typing import Any

__version__ = "0.3.0"


def __getattr__(name: str) -> Any:
    if name == "Generator":  # imported on first use: torch and the models cost seconds to import
        from pipeline.serving.generator import Generator

        return Generator
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
