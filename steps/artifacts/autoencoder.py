"""The autoencoder contract: what train_vqvae writes and what encode, sample, evaluate and the generator read.

    <out>/model.pt      the trained model (steps.nn.checkpoint format, no optimiser state)
    <out>/recon.png     val images (top rows) above their reconstructions (bottom rows)
    <out>/metrics.json  final train and val metrics
    <out>/ray/          Ray Train's run state (steps.artifacts.checkpoints.train_state_dir)

:class:`Autoencoder` opens it: kind, levels, code-map shapes and codebook sizes come from the checkpoint's config,
without building the model; :meth:`Autoencoder.load` builds it. :class:`AutoencoderWriter` writes it.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from steps.artifacts.base import Artifact, Upstream, digest_tensors
from steps.artifacts.checkpoints import CheckpointFile, TrainedWriter
from steps.io import storage
from steps.io.idcheck import IdCounts
from steps.nn import registry
from steps.nn.checkpoint import to_bytes

MODEL = "model.pt"
RECON_GRID = "recon.png"
METRICS = "metrics.json"
WHAT = "an autoencoder (train_vqvae's model.pt: kind " + " or ".join(registry.kinds("autoencoder")) + ")"


class Autoencoder(Artifact):
    """A train_vqvae output (or any folder holding its ``model.pt``), opened for reading."""

    def __init__(self, uri: str, checkpoint: CheckpointFile) -> None:
        self.uri, self.checkpoint = uri, checkpoint
        self.config: Any = checkpoint.config

    @classmethod
    def open(cls, uri: str) -> Autoencoder:
        """The autoencoder at ``uri``.

        Raises:
            MissingInputError: no ``model.pt`` (train_vqvae has not run).
            CheckpointError: ``model.pt`` is not a checkpoint of this project, or holds another kind of model.
        """
        ckpt = CheckpointFile.open(storage.join(uri, MODEL), "autoencoder", WHAT, "run train_vqvae first")
        return cls(uri, ckpt)

    @staticmethod
    def found_at(uri: str) -> bool:
        """Whether ``uri`` holds an autoencoder's checkpoint (without reading it)."""
        return storage.exists(storage.join(uri, MODEL))

    @property
    def model_uri(self) -> str:
        return self.checkpoint.uri

    @property
    def digest(self) -> str:
        """What downstream artifacts record as the VQ-VAE they belong to."""
        return self.checkpoint.digest

    @property
    def kind(self) -> str:
        return self.checkpoint.kind

    @property
    def makes_codes(self) -> bool:
        return registry.makes_codes(self.kind)

    @property
    def levels(self) -> tuple[str, ...]:
        """Code levels, top first; () for a model without codes."""
        return tuple(self.config.levels)

    @property
    def shapes(self) -> dict[str, tuple[int, int]]:
        return {lv: tuple(self.config.shapes[lv]) for lv in self.levels}

    @property
    def codebook_sizes(self) -> dict[str, int]:
        return {lv: int(self.config.codebook_sizes[lv]) for lv in self.levels}

    @property
    def image_size(self) -> int:
        return int(self.config.image_size)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, S, S) of the images it encodes and decodes."""
        return (int(self.config.in_channels), self.image_size, self.image_size)

    def load(self, device: torch.device | str | None = None) -> torch.nn.Module:
        """The model, in eval mode."""
        return self.checkpoint.load(device)

    def verify(self, upstream: Upstream) -> dict[str, IdCounts]:
        """The model builds from its checkpoint and loads its weights."""
        self.load()
        return {}

    def content_digest(self) -> str:
        """The weights, tensor by tensor."""
        h = hashlib.sha256()
        digest_tensors(h, self.checkpoint.state_dict())
        return h.hexdigest()

    def export(self, folder: str) -> str:
        """Copy what :meth:`open` needs into ``folder`` (a self-contained copy, e.g. to package as a model)."""
        storage.write_bytes(storage.join(folder, MODEL), self.checkpoint.data)
        return folder


class AutoencoderWriter(TrainedWriter):
    """Writes a train_vqvae output at ``out``."""

    def write(self, payload: dict[str, Any], grid_png: bytes | None, metrics: dict[str, Any]) -> dict[str, str]:
        """The final model (a checkpoint payload), its reconstruction grid and metrics; returns the artifact URIs."""
        artifacts = {"model": storage.join(self.out, MODEL)}
        storage.write_bytes(artifacts["model"], to_bytes(payload))
        if grid_png is not None:
            artifacts["recon_grid"] = storage.join(self.out, RECON_GRID)
            storage.write_bytes(artifacts["recon_grid"], grid_png)
        storage.write_json(storage.join(self.out, METRICS), metrics)
        return artifacts
