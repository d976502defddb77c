"""``python -m pipeline debug=tiny`` as a user runs it, in a subprocess: the artifact root and the SQLite MLflow store
inside ``workdir``, which is also its working directory."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def pipeline(workdir: Path, *overrides: str, faults: tuple[str, ...] = ()) -> str:
    """Run it (under ``python -m pipeline.faults`` with ``faults`` when given); its console output. Asserts exit 0."""
    root, db = workdir / "artifacts", workdir / "mlflow.db"
    settings = ["debug=tiny", f"artifacts.root={root}", f"mlflow.tracking_uri=sqlite:///{db}", *overrides]
    cmd = [sys.executable, "-m", "pipeline.faults", *faults, "--", *settings] if faults else [
        sys.executable, "-m", "pipeline", *settings
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"pipeline failed:\n{proc.stdout[-5000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout + proc.stderr
