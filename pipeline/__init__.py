"""Orchestration: ``python -m pipeline`` composes the Hydra config, plans the step graph against the artifact cache,
starts Ray only if a step must run, and records everything in an MLflow run tree."""

__version__ = "0.2.0"
