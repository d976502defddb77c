"""The priors contract: what train_prior writes and what sample, evaluate and the generator read.

    <out>/<level>.pt    one prior per code level (``top.pt``, ``bottom.pt``): steps.nn.checkpoint format with the
                        extra entries ``level``, ``vqvae`` (digest of the autoencoder whose codes it models),
                        ``num_classes`` and ``step``
    <out>/priors.json   levels, VQ-VAE digest, final metrics per level (NLL in bits per code); written last
    <out>/ray/          Ray Train's run state

:class:`Priors` opens it, one checkpoint per level on demand; whether the priors belong to an autoencoder and a code
dataset is :func:`steps.artifacts.compat.check_compatible`'s to say. :class:`PriorsWriter` writes it.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from steps.artifacts.autoencoder import Autoencoder
from steps.artifacts.base import Artifact, Upstream, digest_tensors
from steps.artifacts.checkpoints import CheckpointFile, TrainedWriter
from steps.core.step import MissingInputError
from steps.io import storage
from steps.io.idcheck import IdCounts
from steps.nn import registry
from steps.nn.checkpoint import CheckpointError, to_bytes

SUMMARY = "priors.json"
WHAT = "a prior (train_prior's <level>.pt: kind " + " or ".join(registry.kinds("prior")) + ")"


def _level_file(level: str) -> str:
    return f"{level}.pt"


class Priors(Artifact):
    """A train_prior output, opened for reading; each level's checkpoint is read on first use."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self._checkpoints: dict[str, CheckpointFile] = {}

    @classmethod
    def open(cls, uri: str) -> Priors:
        """The priors at ``uri``.

        Raises:
            MissingInputError: no such folder (train_prior has not run).
        """
        if not storage.is_dir(uri):
            raise MissingInputError(f"no priors at {uri}: run the train_prior step first")
        return cls(uri)

    def level_uri(self, level: str) -> str:
        return storage.join(self.uri, _level_file(level))

    def has(self, level: str) -> bool:
        return storage.exists(self.level_uri(level))

    def checkpoint(self, level: str) -> CheckpointFile:
        """The prior of ``level``.

        Raises:
            MissingInputError: no checkpoint for that level.
            CheckpointError: not a prior checkpoint of this project.
        """
        if level not in self._checkpoints:
            self._checkpoints[level] = CheckpointFile.open(
                self.level_uri(level), "prior", WHAT, f"no {level} prior was trained; rerun train_prior"
            )
        return self._checkpoints[level]

    def num_classes(self, level: str) -> int:
        """Classes the prior of ``level`` is conditioned on (0: unconditional)."""
        return int(self.checkpoint(level).config.num_classes)

    def guidable(self, level: str) -> bool:
        """Whether the prior of ``level`` learned a "no class" label (``class_dropout``): classifier-free guidance."""
        return bool(self.checkpoint(level).config.guidable)

    def load(self, level: str, device: torch.device | str | None = None) -> torch.nn.Module:
        return self.checkpoint(level).load(device)

    def verify(self, upstream: Upstream) -> dict[str, IdCounts]:
        """Every level's prior loads, and belongs to the autoencoder whose codes it was trained on."""
        for level in self.summary["levels"]:
            self.load(level)
        autoencoder = upstream.get(Autoencoder)
        if autoencoder is not None:
            self.check_against(autoencoder)
        return {}

    def check_against(self, autoencoder: Autoencoder) -> int:
        """Check that the priors model the codes of ``autoencoder``, level by level; returns their number of classes
        (0: unconditional).

        Raises:
            MissingInputError: a level's prior is missing.
            CheckpointError: a prior of another level, code map, conditioning or VQ-VAE; levels that disagree on
                the classes.
        """
        classes = {lv: _check_level(autoencoder, self.checkpoint(lv), lv) for lv in autoencoder.levels}
        counts = {k for k in classes.values() if k > 0}
        if len(counts) > 1:
            raise CheckpointError(
                f"the priors at {self.uri} disagree on the number of classes: {classes}; rerun train_prior"
            )
        return counts.pop() if counts else 0

    def content_digest(self) -> str:
        """The weights of every level's prior, tensor by tensor."""
        h = hashlib.sha256()
        for level in self.summary["levels"]:
            h.update(level.encode())
            digest_tensors(h, self.checkpoint(level).state_dict())
        return h.hexdigest()

    def export(self, folder: str, levels: tuple[str, ...]) -> str:
        """Copy the priors of ``levels`` (and the summary) into ``folder``, a self-contained copy."""
        for level in levels:
            storage.write_bytes(storage.join(folder, _level_file(level)), self.checkpoint(level).data)
        storage.write_json(storage.join(folder, SUMMARY), self.summary)
        return folder

    @property
    def summary(self) -> dict[str, Any]:
        """``priors.json``: levels, VQ-VAE digest and final metrics per level.

        Raises:
            MissingInputError: no summary: train_prior did not finish here.
        """
        missing = f"{storage.join(self.uri, SUMMARY)} does not exist: train_prior did not finish writing {self.uri}"
        return storage.read_record(self.uri, SUMMARY, missing)


def _check_level(autoencoder: Autoencoder, prior: CheckpointFile, level: str) -> int:
    """The prior of ``level`` against the autoencoder; returns its number of classes."""
    uri, cfg, model = prior.uri, prior.config, autoencoder.model_uri
    if prior.extra("level") != level:
        raise CheckpointError(f"{uri} holds a prior for level {prior.extra('level')!r}, expected {level!r}")
    if prior.extra("vqvae") != autoencoder.codes_digest:
        raise CheckpointError(
            f"{uri}: the {level} prior was trained on codes of VQ-VAE {prior.extra('vqvae')}, but {model} is "
            f"{autoencoder.codes_digest}; rerun train_prior"
        )
    shape, size = list(autoencoder.shapes[level]), autoencoder.codebook_sizes[level]
    if list(cfg.shape) != shape or cfg.num_codes != size:
        raise CheckpointError(
            f"{uri} models {cfg.num_codes} codes on a {list(cfg.shape)} map, but {model} has {size} codes on a "
            f"{shape} map at level {level!r}"
        )
    index = autoencoder.levels.index(level)
    above = autoencoder.levels[index - 1] if index else None  # each level is conditioned on the one above it
    want = (autoencoder.codebook_sizes[above], list(autoencoder.shapes[above])) if above else (0, None)
    got = (cfg.cond_num_codes, list(cfg.cond_shape) if cfg.cond_num_codes else None)
    if got != want:
        expected = f"{want[0]} codes on the {above} map {want[1]}" if above else "no code map"
        raise CheckpointError(f"{uri} is conditioned on {got[0]} codes on a {got[1]} map, expected {expected}")
    return int(cfg.num_classes)


class PriorsWriter(TrainedWriter):
    """Writes a train_prior output at ``out``."""

    def write_level(self, level: str, payload: dict[str, Any], vqvae: str) -> str:
        """One level's prior (a checkpoint payload), tagged with its level and the VQ-VAE digest; returns its URI."""
        uri = storage.join(self.out, _level_file(level))
        num_classes = payload["config"].get("num_classes") or None
        storage.write_bytes(uri, to_bytes({**payload, "level": level, "vqvae": vqvae, "num_classes": num_classes}))
        return uri

    def finish(self, levels: list[str], vqvae: str, metrics: dict[str, dict[str, float]]) -> str:
        """Write ``priors.json`` (last); returns its URI."""
        uri = storage.join(self.out, SUMMARY)
        storage.write_json(uri, {"levels": list(levels), "vqvae": vqvae, "metrics": metrics})
        return uri
