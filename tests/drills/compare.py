"""Whether a fault scenario changed any result: its outputs against those of uninterrupted pipelines of the same
configs (:func:`clean_reference`, once per bench run), bitwise on CPU.

Outputs are compared by what they computed, as each step's output handle digests it
(:meth:`steps.artifacts.base.Artifact.content_digest`: weights tensor by tensor, rows in id order; never file bytes,
which hold timestamps). Training metrics are compared value by value per step, by step fingerprint, for every step the
graph marks as training: a rerun after a killed driver logs into a new MLflow run, so each run must agree with the
clean one where they overlap, and together they must cover it.
"""

from __future__ import annotations

import os
from typing import Any

from drills.workspace import SAMPLE_LONGER, TRAIN_LONGER, Workspace
from pipeline.graph import GRAPH
from steps.training import resume


def _stepwise(key: str) -> bool:
    """A metric training logs by step (``train/loss``, ``top/val/nll_bits``), not the step's final figures and not one
    that differs between any two runs."""
    return "/" in key and not key.startswith("final/") and not key.endswith(resume.UNREPRODUCIBLE)


def metric_history(ws: Workspace, step_name: str) -> list[tuple[str, dict[tuple[str, int], float]]]:
    """Per MLflow child run named ``step_name``: its fingerprint tag and (metric, step) -> value of what training
    logged by step (:func:`_stepwise`)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{ws.db}")
    return [
        (
            r.data.tags.get("fingerprint", ""),
            {
                (m.key, m.step): m.value
                for k in r.data.metrics
                if _stepwise(k)
                for m in client.get_metric_history(r.info.run_id, k)
            },
        )
        for r in ws.step_runs(step_name)
    ]


def artifact_digests(ws: Workspace) -> dict[str, str]:
    """``<step>/<fingerprint>`` -> the content digest of that finished output (outputs that compare nothing left
    out). Two runs of one config that agree bitwise have equal digests."""
    out = {}
    for step in GRAPH:
        for folder in ws.finished(step.name):
            digest = step.output.open(folder).content_digest()
            if digest is not None:
                out[f"{step.name}/{os.path.basename(folder)}"] = digest
    return out


def clean_reference(ws: Workspace) -> dict[str, Any]:
    """Uninterrupted runs of every config the scenarios use (the default, SAMPLE_LONGER's sample step, TRAIN_LONGER's
    training) on a root of their own: what :func:`compare_to_clean` holds the scenarios' outputs against."""
    rcs = [ws.run()[0], ws.run(*SAMPLE_LONGER)[0], ws.run(*TRAIN_LONGER)[0]]
    return {"rcs": rcs, "ok": rcs == [0, 0, 0]}


def compare_to_clean(ws: Workspace, clean: Workspace) -> dict[str, Any]:
    """Whether ``ws``'s outputs equal those of an uninterrupted run of the same configs in ``clean``: every output
    digest both hold (:func:`artifact_digests`), and every training metric value ``ws``'s step runs logged (a rerun
    after a killed driver logs into a new run, so each run must agree with the clean one where they overlap, and
    together they must cover it). ``identical`` is None when no output can be compared."""
    mine, ref = artifact_digests(ws), artifact_digests(clean)
    shared = sorted(set(mine) & set(ref))
    differ = [k for k in shared if mine[k] != ref[k]]
    for step in (s.name for s in GRAPH if s.trains):
        wanted = {fp: h for fp, h in metric_history(clean, step) if h}  # a cached step's run logs none
        runs: dict[str, list[dict]] = {}
        for fp, h in metric_history(ws, step):
            if h and fp in wanted:
                runs.setdefault(fp, []).append(h)
        for fp, histories in runs.items():
            want, seen = wanted[fp], {k for h in histories for k in h}
            finished = f"{step}/{fp}" in shared
            if any(want.get(k) != v for h in histories for k, v in h.items()) or (finished and seen != set(want)):
                differ.append(f"{step}/{fp} metrics")
    return {"identical": not differ if shared else None, "compared": len(shared), "differ": differ}
