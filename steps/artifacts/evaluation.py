"""The evaluation contract: what the evaluate step writes.

<out>/metrics.json          {"metrics", "counts", "notes", "feature_space", "classifier_space", "config", "inputs"};
                            written last (classifier_space: null when the second feature space was off)
<out>/real_vs_samples.png   real images (top row) above samples (bottom row)
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from steps.artifacts.base import Artifact
from steps.io import storage

REPORT = "metrics.json"
GRID = "real_vs_samples.png"


# The figures a parent run shows as metrics and a registered model version carries as tags: what runs are compared by.
HEADLINE = (
    "fd_effnet", "kid_effnet", "precision", "recall", "coverage", "psnr", "recon_mse", "bits_per_dim", "fd_effnet_real",
    "fd_clf", "precision_clf", "recall_clf", "coverage_clf", "fd_clf_real", "recall_class_min", "sample_class_accuracy",
)  # fmt: skip
HEADLINE_PREFIXES = ("nll_bits_", "usage_")


class Evaluation(Artifact):
    """A finished evaluate output, opened for reading."""

    def __init__(self, uri: str, report: dict[str, Any]) -> None:
        self.uri, self.report = uri, report

    @classmethod
    def open(cls, uri: str) -> Evaluation:
        missing = f"no evaluation at {uri} ({REPORT} missing): run the evaluate step first"
        return cls(uri, storage.read_record(uri, REPORT, missing))

    @property
    def metrics(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.report["metrics"].items()}

    def content_digest(self) -> str:
        """The metrics (the counts beside them hold timings)."""
        return hashlib.sha256(json.dumps(self.metrics, sort_keys=True).encode()).hexdigest()

    @classmethod
    def headline(cls, metrics: Mapping[str, float]) -> dict[str, float]:
        return {k: float(v) for k, v in metrics.items() if k in HEADLINE or k.startswith(HEADLINE_PREFIXES)}


class EvaluationWriter:
    def __init__(self, out: str) -> None:
        self.out = out

    @property
    def artifacts(self) -> dict[str, str]:
        return {"metrics": storage.join(self.out, REPORT), "grid": storage.join(self.out, GRID)}

    def write(self, report: dict[str, Any], grid_png: bytes) -> dict[str, str]:
        """The grid, then the report (last); returns the artifact URIs."""
        storage.write_bytes(self.artifacts["grid"], grid_png)
        storage.write_json(self.artifacts["metrics"], report)
        return self.artifacts
