"""The generator bundle contract: a generator's models together in one folder, as the MLflow models carry them.

    <folder>/autoencoder/   the train_vqvae output's model (:meth:`Autoencoder.export`)
    <folder>/priors/        the train_prior output's priors and summary (:meth:`Priors.export`); absent for the
                            encoder model and for an autoencoder without codes

:func:`export` writes one and returns the parts by name (what ``mlflow.pyfunc.log_model(artifacts=...)`` takes, and
what ``context.artifacts`` hands back when MLflow loads the model); :func:`open_parts` and :func:`open_folder` read
one back as handles, and :func:`open_mlflow_model` from a downloaded MLflow model.
"""

from __future__ import annotations

from collections.abc import Mapping

from steps.artifacts.autoencoder import Autoencoder
from steps.artifacts.priors import Priors
from steps.core.step import MissingInputError
from steps.io import storage

AUTOENCODER, PRIORS = "autoencoder", "priors"
MLFLOW_ARTIFACTS = "artifacts"  # where MLflow keeps a pyfunc model's artifacts (the bundle's parts) in its folder


def export(folder: str, autoencoder: Autoencoder, priors: Priors | None = None) -> dict[str, str]:
    """Copy the models into ``folder``; returns the parts written, by name."""
    parts = {AUTOENCODER: autoencoder.export(storage.join(folder, AUTOENCODER))}
    if priors is not None:
        parts[PRIORS] = priors.export(storage.join(folder, PRIORS), autoencoder.levels)
    return parts


def open_parts(parts: Mapping[str, str], where: str) -> tuple[Autoencoder, Priors | None]:
    """The handles of a bundle's parts (name -> folder); ``where`` names the bundle in errors.

    Raises:
        MissingInputError: no autoencoder part: not a bundle of this project.
    """
    if AUTOENCODER not in parts or not storage.is_dir(parts[AUTOENCODER]):
        raise MissingInputError(f"{where} is not a generator of this project (no {AUTOENCODER} in it)")
    priors = parts.get(PRIORS)
    return Autoencoder.open(parts[AUTOENCODER]), Priors.open(priors) if priors and storage.is_dir(priors) else None


def open_folder(folder: str, where: str) -> tuple[Autoencoder, Priors | None]:
    """The handles of the bundle written to ``folder`` by :func:`export`."""
    return open_parts({name: storage.join(folder, name) for name in (AUTOENCODER, PRIORS)}, where)


def open_mlflow_model(folder: str, where: str) -> tuple[Autoencoder, Priors | None]:
    """The handles of the bundle inside a downloaded MLflow model's folder (logged with ``artifacts=export(...)``)."""
    return open_folder(storage.join(folder, MLFLOW_ARTIFACTS), where)
