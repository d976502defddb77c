"""Self-describing checkpoints: ``{"format": 1, "kind": ..., "config": {...}, "model": state_dict, ...}``.

A checkpoint carries the model's config as a plain dict (like nanoGPT's ``model_args``), so loading one needs no
external config. Loading goes through ``torch.load(weights_only=True)`` only: a checkpoint can hold tensors and
plain Python values, never pickled objects, so opening one from an untrusted source runs no code.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import nn

from steps.nn.classifier import ImageClassifier
from steps.nn.prior import PixelCNNPrior, PriorConfig
from steps.nn.vae import VAE
from steps.nn.vqvae import VQVAE, VQVAE2

FORMAT = 1
AUTOENCODERS: dict[str, type[nn.Module]] = {cls.kind: cls for cls in (VQVAE2, VQVAE, VAE)}
PRIOR_KIND = "prior"
CLASSIFIER_KIND = ImageClassifier.kind  # "classifier": for classifier-based rejection in the sample step


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable, of another format, or of the wrong kind of model."""


def model_kind(model: nn.Module) -> str:
    return PRIOR_KIND if isinstance(model, PixelCNNPrior) else model.kind


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
    return {"format": FORMAT, "kind": model_kind(model), "config": model.config.to_dict(), "model": state, **extra}


def save_checkpoint(path: str | os.PathLike, model: nn.Module, **extra: Any) -> None:
    """Write atomically: a crash mid-write leaves the previous file (or none), never a truncated one."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(checkpoint_dict(model, **extra), tmp)
    os.replace(tmp, path)


def read_checkpoint(source: str | os.PathLike | BinaryIO | bytes | Mapping[str, Any]) -> dict[str, Any]:
    """Load and check a checkpoint payload (weights only; nothing is unpickled)."""
    if isinstance(source, Mapping):
        payload = dict(source)
        name = "<checkpoint dict>"
    else:
        name = str(source) if isinstance(source, (str, os.PathLike)) else "<checkpoint bytes>"
        data = io.BytesIO(source) if isinstance(source, bytes) else source
        try:
            payload = torch.load(data, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise CheckpointError(f"checkpoint not found: {name}") from None
        except Exception as exc:  # torch raises several types for corrupt or non-weights files
            raise CheckpointError(f"cannot read checkpoint {name}: {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        got = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(f"{name} is not a format-{FORMAT} checkpoint of this project (format={got!r})")
    for key in ("kind", "config", "model"):
        if key not in payload:
            raise CheckpointError(f"{name} has no {key!r} entry")
    return payload


def load_model(
    source: str | os.PathLike | BinaryIO | bytes | Mapping[str, Any], expect: str | tuple[str, ...] | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """Build the model a checkpoint describes and load its weights.

    Args:
        source: a path, file object, bytes, or an already loaded payload.
        expect: kind(s) the caller can use (``"vqvae2"``, ``"vqvae"``, ``"vae"``, ``"prior"``, ``"classifier"``).

    Returns:
        ``(model, payload)``; the model is on the CPU in eval mode.

    Raises:
        CheckpointError: unreadable file, other format, or a kind not in ``expect``.
    """
    payload = read_checkpoint(source)
    kind = payload["kind"]
    allowed = (expect,) if isinstance(expect, str) else expect
    if allowed is not None and kind not in allowed:
        raise CheckpointError(f"checkpoint holds a {kind!r} model, expected {' or '.join(map(repr, allowed))}")
    if kind == PRIOR_KIND:
        model: nn.Module = PixelCNNPrior(PriorConfig.from_dict(payload["config"]))
    elif kind in AUTOENCODERS:
        model = AUTOENCODERS[kind].from_config_dict(payload["config"])
    elif kind == CLASSIFIER_KIND:
        model = ImageClassifier.from_config_dict(payload["config"])
    else:
        raise CheckpointError(f"unknown model kind {kind!r} in checkpoint")
    try:
        model.load_state_dict(payload["model"])
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint weights do not match its {kind} config: {exc}") from exc
    return model.eval(), payload
