"""One checkpoint file as an artifact: its URI, bytes, digest, payload and the model it builds.

The autoencoder, the priors and the rejection classifier are each one such file (``steps.nn.checkpoint`` format).
A :class:`CheckpointFile` reads the bytes once, checks the kind against what the caller can use, and names the file
in every error. Pickled into a Ray task or actor it travels without its bytes; :meth:`CheckpointFile.load` there
reads them again and refuses a file that changed since the driver checked it (digest).

Training steps keep Ray Train's run state (checkpoints to resume from) under ``<out>/ray``: :func:`train_state_dir`;
each of its checkpoints holds the whole training state in ``state.pt`` (:data:`TRAIN_STATE_FILE`, written and read by
``steps.training``).
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from steps.core.step import MissingInputError
from steps.io import storage
from steps.nn import registry
from steps.nn.checkpoint import CheckpointError, load_model, read_checkpoint

TRAIN_STATE = "ray"
TRAIN_STATE_FILE = "state.pt"  # in each of Ray Train's checkpoints: model, optimiser, data position, random streams
NONFINITE_FILE = "nonfinite.json"  # in a training run's storage: written by rank 0 when the loss diverges
SINK_DOWN_FILE = "sink_unavailable.json"  # in a training run's storage: written by rank 0 when its sink gives up


def digest(data: bytes) -> str:
    """The fingerprint of a checkpoint recorded downstream: the first 16 hex chars of sha256(bytes)."""
    return hashlib.sha256(data).hexdigest()[:16]


def train_state_dir(out: str) -> str:
    """Where a training step keeps Ray Train's run state: ``<out>/ray`` (an absolute path for local outputs)."""
    return storage.join(storage.absolute(out), TRAIN_STATE)


class TrainedWriter:
    """Base of the writers of a training step's output at ``out``: where Ray Train keeps its run state."""

    def __init__(self, out: str) -> None:
        self.out = out

    @property
    def train_state(self) -> str:
        return train_state_dir(self.out)


class CheckpointFile:
    """A checkpoint of this project at ``uri``, of a kind in ``expect`` (a role or kinds; None: any)."""

    def __init__(self, uri: str, data: bytes, expect: str | tuple[str, ...] | None, what: str) -> None:
        self.uri, self.expect, self.what = uri, expect, what
        self._data: bytes | None = data
        self.digest = digest(data)
        self.payload = read_checkpoint(data, name=uri)
        self.kind: str = self.payload["kind"]
        try:
            entry = registry.get(self.kind)
        except registry.UnknownKindError as exc:
            raise CheckpointError(f"{uri}: {exc}; expected {what}") from None
        allowed = (expect,) if isinstance(expect, str) else expect
        if allowed is not None and self.kind not in allowed and entry.role not in allowed:
            raise CheckpointError(f"{uri} holds a {self.kind!r} model, but {what} is needed here")
        self.role: str = entry.role
        try:
            self.config = entry.config.from_dict(self.payload["config"])
        except ValueError as exc:
            raise CheckpointError(f"{uri}: its config does not build a {self.kind} model: {exc}") from None

    @classmethod
    def open(cls, uri: str, expect: str | tuple[str, ...] | None, what: str, hint: str) -> CheckpointFile:
        """Read and check the checkpoint at ``uri``.

        Args:
            expect: the role or kinds the caller can use.
            what: how errors name what is expected ("a VQ-VAE (train_vqvae's model.pt)").
            hint: how to make the file, for the error when it is missing ("run train_vqvae first").

        Raises:
            MissingInputError: no file at ``uri``.
            CheckpointError: not a checkpoint of this project, or of the wrong kind.
        """
        try:
            data = storage.read_bytes(uri)
        except FileNotFoundError:
            raise MissingInputError(f"{uri} does not exist: {what} is needed here; {hint}") from None
        return cls(uri, data, expect, what)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_data"] = None  # read again where it is loaded: a model can be hundreds of MB
        state["payload"] = None
        return state

    @property
    def data(self) -> bytes:
        if self._data is None:
            data = storage.read_bytes(self.uri)
            if (got := digest(data)) != self.digest:
                raise CheckpointError(f"{self.uri} changed after it was checked (digest {got}, checked {self.digest})")
            self._data = data
        return self._data

    def extra(self, key: str, default: Any = None) -> Any:
        """An entry the writer added to the payload (``level``, ``vqvae``, ``step``, ``metrics``...)."""
        if self.payload is None:
            self.payload = read_checkpoint(self.data, name=self.uri)
        return self.payload.get(key, default)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The model's weights as saved (without building the model)."""
        return self.extra("model")

    def load(self, device: torch.device | str | None = None) -> torch.nn.Module:
        """The model, in eval mode, on ``device`` (default CPU)."""
        model, _ = load_model(self.payload if self.payload is not None else self.data, name=self.uri)
        return model.to(device) if device is not None else model
