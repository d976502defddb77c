"""Self-describing checkpoints: ``{"format": 2, "kind": ..., "config": {...}, "model": state_dict, ...}``.

A checkpoint carries the model's config as a plain dict (like nanoGPT's ``model_args``) and its kind (a name in
:mod:`steps.nn.registry`), so loading one needs no external config. Loading goes through
``torch.load(weights_only=True)`` only: a checkpoint holds tensors and plain Python values, never pickled objects,
so opening one from an untrusted source runs no code. Checkpoints of format 1 (flat VQ-VAE configs, priors of kind
``"prior"``) are read as format 2.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import nn

from steps.nn import registry

FORMAT = 2
Source = str | os.PathLike | BinaryIO | bytes | Mapping[str, Any]
# Format 1 kept the quantiser's settings flat in the VQ models' configs; it had the EMA quantiser only.
_V1_QUANTIZER_KIND = "ema"
_V1_QUANTIZER = {"codebook_size": "codebook_size", "embed_dim": "dim", "beta": "beta", "decay": "decay", "eps": "eps"}
_V1_QUANTIZER |= {"restart_after": "restart_after", "kmeans_init": "kmeans_init"}


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable, of another format, or of the wrong kind of model."""


def unwrap(model: nn.Module) -> nn.Module:
    """The bare module inside DDP / torch.compile wrappers, whose state_dict has no prefixes."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def checkpoint_dict(model: nn.Module, **extra: Any) -> dict[str, Any]:
    """The checkpoint payload of ``model`` plus extra entries (optimizer state, step, metrics...)."""
    model = unwrap(model)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    kind = registry.kind_of(model)
    return {"format": FORMAT, "kind": kind, "config": model.config.to_dict(), "model": state, **extra}


def to_bytes(payload: Mapping[str, Any]) -> bytes:
    buf = io.BytesIO()
    torch.save(dict(payload), buf)
    return buf.getvalue()


def save_checkpoint(path: str | os.PathLike, model: nn.Module, **extra: Any) -> None:
    """Write atomically: a crash mid-write leaves the previous file (or none), never a truncated one."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(checkpoint_dict(model, **extra), tmp)
    os.replace(tmp, path)


def read_checkpoint(source: Source, name: str | None = None) -> dict[str, Any]:
    """Load and check a checkpoint payload (weights only; nothing is unpickled).

    ``name`` is what error messages call the checkpoint (default: the path, or "the checkpoint").
    """
    if isinstance(source, Mapping):
        payload: Any = dict(source)
        name = name or "<checkpoint dict>"
    else:
        name = name or (str(source) if isinstance(source, (str, os.PathLike)) else "the checkpoint")
        data = io.BytesIO(source) if isinstance(source, bytes) else source
        try:
            payload = torch.load(data, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise CheckpointError(f"checkpoint not found: {name}") from None
        except Exception as exc:  # torch raises several types for corrupt or non-weights files
            # torch's own text advises weights_only=False, which would run the file's code: never pass that on.
            raise CheckpointError(
                f"{name} is not a checkpoint of this project: torch.load(weights_only=True) cannot read it "
                "(not a torch file, or one holding pickled objects)"
            ) from exc
    if not isinstance(payload, dict) or payload.get("format") not in (1, FORMAT):
        got = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(f"{name} is not a format-{FORMAT} checkpoint of this project (format={got!r})")
    for key in ("kind", "config", "model"):
        if key not in payload:
            raise CheckpointError(f"{name} has no {key!r} entry")
    return _upgrade(payload) if payload["format"] == 1 else payload


def _upgrade(payload: dict[str, Any]) -> dict[str, Any]:
    """A format-1 payload as format 2: registry names for renamed kinds, the VQ quantiser settings nested."""
    kind = registry.RENAMED.get(payload["kind"], payload["kind"])
    config = dict(payload["config"])
    if "codebook_size" in config and "quantizer" not in config:  # a VQ model: its EMA settings were flat
        quantizer = {
            "kind": _V1_QUANTIZER_KIND,
            **{new: config.pop(old) for old, new in _V1_QUANTIZER.items() if old in config},
        }
        config["quantizer"] = quantizer
    return {**payload, "format": FORMAT, "kind": kind, "config": config}


def load_model(
    source: Source, expect: str | tuple[str, ...] | None = None, name: str | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """Build the model a checkpoint describes and load its weights.

    Args:
        source: a path, file object, bytes, or an already loaded payload.
        expect: a role (``"autoencoder"``, ``"prior"``, ``"classifier"``) or kind(s) (``"vqvae2"``...) the caller
            can use; None accepts any registered kind.
        name: what error messages call the checkpoint.

    Returns:
        ``(model, payload)``; the model is on the CPU in eval mode.

    Raises:
        CheckpointError: unreadable file, other format, or a kind not in ``expect``.
    """
    payload = read_checkpoint(source, name)
    name = name or (str(source) if isinstance(source, (str, os.PathLike)) else "checkpoint")
    kind = payload["kind"]
    try:
        entry = registry.get(kind)
    except registry.UnknownKindError as exc:
        raise CheckpointError(f"{name}: {exc}") from None
    allowed = (expect,) if isinstance(expect, str) else expect
    if allowed is not None and kind not in allowed and entry.role not in allowed:
        raise CheckpointError(f"{name} holds a {kind!r} model, expected {' or '.join(map(repr, allowed))}")
    try:
        model = entry.model(entry.config.from_dict(payload["config"]))
    except ValueError as exc:
        raise CheckpointError(f"{name}: its config does not build a {kind} model: {exc}") from exc
    try:
        model.load_state_dict(payload["model"])
    except RuntimeError as exc:
        raise CheckpointError(f"{name}: checkpoint weights do not match its {kind} config: {exc}") from exc
    return model.eval(), payload
