"""The autoencoder contract: what train_vqvae (and tune_decoder) write and what encode, sample, evaluate and the
generator read.

    <out>/model.pt      the trained model (steps.nn.checkpoint format, no optimiser state)
    <out>/recon.png     val images (top rows) above their reconstructions (bottom rows)
    <out>/metrics.json  final train and val metrics
    <out>/ray/          Ray Train's run state (steps.artifacts.checkpoints.train_state_dir)

:class:`Autoencoder` opens it: kind, levels, code-map shapes and codebook sizes come from the checkpoint's config,
without building the model; :meth:`Autoencoder.load` builds it. :class:`AutoencoderWriter` writes it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import torch

from steps.artifacts.base import Artifact, Upstream, digest_tensors
from steps.artifacts.checkpoints import CheckpointFile, TrainedWriter
from steps.core.step import require_input
from steps.io import storage
from steps.io.idcheck import IdCounts
from steps.nn import registry
from steps.nn.checkpoint import CheckpointError, to_bytes

MODEL = "model.pt"
RECON_GRID = "recon.png"
METRICS = "metrics.json"
CODES_OF = "codes_of"  # payload entry of a retrained decoder: the codes digest of the model it was tuned from
DECODER_OF = "decoder_of"  # ... and that model's URI (its lineage)
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
        """This file's digest: what identifies the images it decodes (the sample step's resume check)."""
        return self.checkpoint.digest

    @property
    def codes_digest(self) -> str:
        """What code datasets and priors record as the VQ-VAE they belong to: the digest of the model that made
        the codes, which a decoder retrained by tune_decoder (encoder and codebooks unchanged) keeps."""
        return self.checkpoint.extra(CODES_OF) or self.checkpoint.digest

    @property
    def decoder_of(self) -> str | None:
        """The autoencoder whose decoder this one's replaced (tune_decoder's output), else None."""
        return self.checkpoint.extra(DECODER_OF)

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


def decoding(inputs: Mapping[str, str], step: str) -> Autoencoder:
    """The autoencoder ``step`` decodes with: tune_decoder's retrained decoder when that step ran (its output is among
    ``inputs``), else train_vqvae's model.

    Raises:
        MissingInputError: neither output was given.
    """
    return Autoencoder.open(inputs.get("tune_decoder") or require_input(inputs, step, "train_vqvae"))


class TunedAutoencoder(Autoencoder):
    """A tune_decoder output: train_vqvae's autoencoder with a retrained decoder, in the same layout (``model.pt``,
    ``recon.png``, ``metrics.json``, ``ray/``), whose checkpoint also records the model it was tuned from."""

    def verify(self, upstream: Upstream) -> dict[str, IdCounts]:
        """It loads, names its origin, and (when the upstream autoencoder still exists) holds exactly that model's
        encoder and codebooks, so the codes it makes are the ones the code dataset and priors hold."""
        model = self.load()
        if self.decoder_of is None or self.checkpoint.extra(CODES_OF) is None:
            raise CheckpointError(f"{self.model_uri} does not record the autoencoder its decoder was tuned from")
        base = upstream.get(Autoencoder)
        if base is None:
            return {}
        if base.codes_digest != self.codes_digest:
            raise CheckpointError(
                f"{self.model_uri} belongs to codes {self.codes_digest}, but its upstream {base.model_uri} makes "
                f"codes {base.codes_digest}"
            )
        tuned, own, theirs = model.decoder_parameter_names(), self.checkpoint.state_dict(), base.checkpoint.state_dict()
        changed = sorted(k for k in theirs if k not in tuned and not torch.equal(own[k], theirs[k]))
        if changed or set(own) != set(theirs):
            raise CheckpointError(
                f"{self.model_uri}: its encoder or codebooks differ from {base.model_uri} "
                f"({changed[:3] or sorted(set(own) ^ set(theirs))[:3]}): its codes are not the code dataset's"
            )
        return {}


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
