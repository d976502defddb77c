"""The one registry of model kinds: kind name -> role, model class and config class.

Every other place asks this table (which autoencoders make codes, which kinds a checkpoint may hold, which config
class a ``kind`` in a Hydra file or a checkpoint names); nothing else lists kinds. Adding a prior architecture or a
quantizer is one module in ``steps/nn`` plus one line here (docs/architecture.md).

Model modules are imported on first use, by name: the models themselves ask the registry for their parts (a VQ-VAE
builds its quantizer from its config's kind), so a static import of every model here would make an import circle.

Roles and what the pipeline expects of a model of each role:

* ``autoencoder``: ``VQVAE2`` / ``VQVAE`` / ``VAE`` (:class:`steps.nn.blocks.Autoencoder`); ``levels`` names its
  code maps, top first (empty for a model without codes);
* ``prior``: an autoregressive prior over one code map (:class:`steps.nn.prior.Prior`);
* ``quantizer``: a vector quantiser of a VQ model (:class:`steps.nn.quantize.Quantizer`);
* ``classifier``: the image classifier of rejection sampling;
* ``adversarial``: a VQ model's decoder with a discriminator, which ``tune_decoder`` trains with the codes frozen
  (:class:`steps.nn.adversarial.DecoderGAN`).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

ROLES = ("autoencoder", "prior", "quantizer", "classifier", "adversarial")


def _load(target: str) -> Any:
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class Kind:
    name: str
    role: str
    target: str  # "module:Class" of the model class; its config class is the model class's ``config_cls``
    sampler: str | None = None  # priors: "module:Class" of a fast exact sampler (default: steps.nn.prior.NaiveSampler)

    @property
    def model(self) -> type:
        return _load(self.target)

    @property
    def config(self) -> type:
        return self.model.config_cls


# The first kind of each role is its default (a config that names no kind).
KINDS: dict[str, Kind] = {
    k.name: k
    for k in (
        Kind("vqvae2", "autoencoder", "steps.nn.vqvae:VQVAE2"),
        Kind("vqvae", "autoencoder", "steps.nn.vqvae:VQVAE"),
        Kind("vae", "autoencoder", "steps.nn.vae:VAE"),
        Kind("pixelcnn", "prior", "steps.nn.pixelcnn:PixelCNNPrior", sampler="steps.nn.sampler:CachedSampler"),
        Kind(
            "transformer",
            "prior",
            "steps.nn.transformer:TransformerPrior",
            sampler="steps.nn.transformer:TransformerSampler",
        ),
        Kind("ema", "quantizer", "steps.nn.quantize:VectorQuantizerEMA"),
        Kind("fsq", "quantizer", "steps.nn.fsq:FSQuantizer"),
        Kind("classifier", "classifier", "steps.nn.classifier:ImageClassifier"),
        Kind("patchgan", "adversarial", "steps.nn.adversarial:DecoderGAN"),
    )
}
# Kinds written by earlier versions, read as today's (checkpoints of format 1 called the PixelCNN prior "prior").
RENAMED = {"prior": "pixelcnn"}


class UnknownKindError(ValueError):
    """A kind that is not in the registry, or not of the role asked for."""


def get(name: str, role: str | None = None) -> Kind:
    """The registry entry of ``name`` (of ``role``, if given)."""
    entry = KINDS.get(RENAMED.get(name, name))
    if entry is None or (role is not None and entry.role != role):
        raise UnknownKindError(f"unknown {role or 'model'} kind {name!r}; known: {list(kinds(role))}")
    return entry


def kinds(role: str | None = None) -> tuple[str, ...]:
    """The kind names of ``role`` (all kinds for None), in registry order."""
    return tuple(name for name, k in KINDS.items() if role is None or k.role == role)


def kind_of(obj: Any) -> str:
    """The kind of a model or config (instance or class)."""
    cls = obj if isinstance(obj, type) else type(obj)
    for name, k in KINDS.items():
        if cls is k.model or cls is k.config:
            return name
    raise UnknownKindError(f"{cls.__name__} is not a registered model or config class (steps/nn/registry.py)")


def default_kind(role: str) -> str:
    """The kind a config of ``role`` has when it names none: the role's first entry in :data:`KINDS`."""
    return kinds(role)[0]


def config_from_dict(role: str, data: Mapping[str, Any]) -> Any:
    """The config of a dict that names its ``kind`` (default :func:`default_kind`), e.g. ``{"kind": "ema", ...}``."""
    data = dict(data)
    return get(data.pop("kind", None) or default_kind(role), role).config.from_dict(data)


def build(config: Any, *args: Any, **kwargs: Any) -> Any:
    """The model of ``config``'s kind, built from it (a module in training mode)."""
    return get(kind_of(config)).model(config, *args, **kwargs)


def makes_codes(kind: str) -> bool:
    """Whether an autoencoder of ``kind`` encodes images to discrete codes (and so has priors)."""
    return bool(get(kind, "autoencoder").config().levels)


def sampler(prior: Any) -> Any:
    """A sampler of ``prior`` (a built prior model): its kind's fast sampler, else the naive one. Build it once per
    model and reuse it: a sampler reads the weights when it is built. ``.sample(n, labels, cond, *, generator,
    controls)`` (:class:`steps.nn.draw.SamplingControls`) -> codes (n, H, W); ``.cache_bytes`` -> the memory of its
    caches in the last batch."""
    entry = get(kind_of(prior), "prior")
    return _load(entry.sampler or "steps.nn.prior:NaiveSampler")(prior)
