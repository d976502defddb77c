"""Whether a fault scenario of :mod:`pipeline.faults` changed any result: its outputs against those of uninterrupted
pipelines of the same configs (:func:`clean_reference`, once per bench run), bitwise on CPU.

Outputs are compared by what they computed, never by file bytes (which hold timestamps): the weights tensor by tensor
(train_vqvae, train_prior), the code columns in id order (encode, and the sampled codes of sample). Training metrics
are compared value by value per step, by step fingerprint: a rerun after a killed driver logs into a new MLflow run,
so each run must agree with the clean one where they overlap, and together they must cover it.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch

from pipeline.faults import SAMPLE_LONGER, TRAIN_LONGER, Workspace
from steps.io import storage
from steps.training import resume


def _stepwise(key: str) -> bool:
    """A metric training logs by step (``train/loss``, ``top/val/nll_bits``), not the step's final figures and not one
    that differs between any two runs."""
    return "/" in key and not key.startswith("final/") and not key.endswith(resume.UNREPRODUCIBLE)


def metric_history(db: Path, step_name: str) -> list[tuple[str, dict[tuple[str, int], float]]]:
    """Per MLflow child run named ``step_name``: its fingerprint tag and (metric, step) -> value of what training
    logged by step (:func:`_stepwise`)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    exp = client.get_experiment_by_name("vqvae2")
    if exp is None:  # nothing was tracked (yet)
        return []
    runs = client.search_runs([exp.experiment_id], f"tags.`mlflow.runName` = '{step_name}'")
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
        for r in runs
    ]


def _hash_tensors(h, state: dict[str, Any]) -> None:
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def _hash_tables(h, tables: list, columns: list[str]) -> None:
    import pyarrow as pa

    if tables:
        table = pa.concat_tables(tables).sort_by("id")
        for name in columns:
            h.update(f"{name}:{table.column(name).to_pylist()}".encode())


def artifact_digests(ws: Workspace) -> dict[str, str]:
    """``<step>/<fingerprint>`` -> a digest of what that finished output computed: the weights tensor by tensor
    (train_vqvae, train_prior), the code columns in id order (encode; sample's sampled codes). Never file bytes, which
    hold timestamps. Two runs of one config that agree bitwise have equal digests."""
    from steps.artifacts.autoencoder import Autoencoder
    from steps.artifacts.codes import CodeDataset
    from steps.artifacts.images import SPLITS
    from steps.artifacts.priors import Priors
    from steps.artifacts.samples import Samples

    out = {}
    for step in ("train_vqvae", "encode", "train_prior", "sample"):
        for folder in ws.finished(step):
            h = hashlib.sha256()
            if step == "train_vqvae":
                _hash_tensors(h, Autoencoder.open(folder).checkpoint.payload["model"])
            elif step == "train_prior":
                priors = Priors.open(folder)
                for level in priors.summary["levels"]:
                    _hash_tensors(h, priors.checkpoint(level).payload["model"])
            elif step == "encode":
                codes = CodeDataset.open(folder)
                for split in SPLITS:
                    _hash_tables(h, list(codes.tables(split)), ["id", "label", *codes.meta.levels])
            else:
                tables = [storage.read_parquet(f, None) for f in Samples.open(folder).code_files()]
                _hash_tables(h, tables, sorted(tables[0].column_names) if tables else [])
            out[f"{step}/{os.path.basename(folder)}"] = h.hexdigest()
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
    for step in ("train_vqvae", "train_prior"):
        wanted = {fp: h for fp, h in metric_history(clean.db, step) if h}  # a cached step's run logs none
        runs: dict[str, list[dict]] = {}
        for fp, h in metric_history(ws.db, step):
            if h and fp in wanted:
                runs.setdefault(fp, []).append(h)
        for fp, histories in runs.items():
            want, seen = wanted[fp], {k for h in histories for k in h}
            finished = f"{step}/{fp}" in shared
            if any(want.get(k) != v for h in histories for k, v in h.items()) or (finished and seen != set(want)):
                differ.append(f"{step}/{fp} metrics")
    return {"identical": not differ if shared else None, "compared": len(shared), "differ": differ}
