"""The registered MLflow models of a pipeline run: ``<experiment>-generator`` and ``<experiment>-encoder``.

After the steps, a run that has both a train_vqvae and a train_prior output (a train_vqvae output alone for the VAE)
logs the generator (and, for models with codes, the encoder) in its parent MLflow run and registers them
(:mod:`pipeline.serving.mlflow_models` says what they predict). A version is tagged with the parent run's id, the
fingerprints of the outputs it bundles and the evaluate step's headline metrics; another run over the same outputs (a
cached run) reuses that version instead of logging a copy.

Alias policy: ``mlflow.model_alias`` ("current") is moved to the new version unless ``mlflow.move_alias`` says no;
by default it is not moved by debug runs (``debug=...``) or members of a multirun, so trying a change never
replaces the model other people load.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Mapping
from typing import Any

from pipeline.serving.mlflow_models import SERVED, ServedModel
from steps.artifacts import bundle
from steps.artifacts.autoencoder import Autoencoder
from steps.artifacts.priors import Priors

log = logging.getLogger("pipeline")
HERE = os.path.dirname(os.path.abspath(__file__))
PIPELINE = os.path.dirname(HERE)
PACKAGES = [PIPELINE, os.path.join(os.path.dirname(PIPELINE), "steps")]  # the code the models run: pipeline/, steps/
REQUIREMENTS = ["torch", "numpy", "pillow", "pandas", "pyarrow", "mlflow"]


def register(
    experiment: str,
    autoencoder_uri: str,
    priors_uri: str | None,
    fingerprints: str,
    alias: str,
    move_alias: bool,
    tags: Mapping[str, Any],
) -> dict[str, str]:
    """Log and register the run's generator (and encoder); returns ``{"generator": "models:/<name>/<version>", ...}``.

    Must run inside the parent MLflow run (the models are logged there). ``fingerprints`` identifies the outputs
    bundled: a version already registered for them is reused.
    """
    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    autoencoder = Autoencoder.open(autoencoder_uri)
    priors = Priors.open(priors_uri) if priors_uri else None
    registered = {}
    for model in (m for m in SERVED if m.serves(autoencoder)):
        name = f"{experiment}-{model.role}"
        found = _version_of(client, name, fingerprints)
        if found is None:
            info = _log(mlflow, model, autoencoder, priors if model.carries_priors else None)
            found = mlflow.register_model(info.model_uri, name, tags={"fingerprints": fingerprints}).version
            log.info("registered %s version %s", name, found)
        for key, value in tags.items():
            client.set_model_version_tag(name, found, key, str(value))
        if move_alias:
            client.set_registered_model_alias(name, alias, found)
            log.info("%s@%s -> version %s", name, alias, found)
        registered[model.role] = f"models:/{name}/{found}"
    return registered


def _version_of(client, name: str, fingerprints: str) -> str | None:
    try:
        found = client.search_model_versions(f"name='{name}' and tags.fingerprints='{fingerprints}'")
    except Exception:
        return None
    return str(max(int(v.version) for v in found)) if found else None


def _log(mlflow, model: type[ServedModel], autoencoder: Autoencoder, priors: Priors | None):
    """Log one model in the active run: its bundle copied from the outputs, its code, signature and example."""
    with tempfile.TemporaryDirectory() as tmp:
        return mlflow.pyfunc.log_model(
            name=model.role,
            python_model=os.path.join(HERE, model.entry),
            artifacts=bundle.export(tmp, autoencoder, priors),
            code_paths=PACKAGES,
            signature=model.signature(autoencoder),
            input_example=model.example(autoencoder, priors),
            pip_requirements=REQUIREMENTS,
        )
