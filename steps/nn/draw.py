"""Drawing codes from a prior's logits: the sampling controls (temperature, top-k, top-p, guidance), and one random
stream per sample.

Both samplers, :func:`steps.nn.prior.sample_naive` and the cached :mod:`steps.nn.sampler`, draw through
:func:`draw_codes`, so given the same logits and the same random streams they pick the same codes.

Randomness. Every sample owns a stream of uniforms in [0, 1), one per position of the code map in raster order
(:func:`uniforms`). The code at a position is drawn by inverse CDF: the smallest code ``k`` whose cumulative
(filtered) probability exceeds ``u * total``. Compared with ``torch.multinomial`` on a batch this has two useful
properties: a sample's codes depend only on its own stream (not on the batch or shard it was drawn in, nor on the
device: streams from CPU generators are the same everywhere), and a draw only flips between two codes when the
logits move across a boundary, so samplers whose logits agree to rounding pick the same codes.

Filtering follows the usual order: logits / temperature, keep the ``top_k`` largest (ties with the k-th are kept),
then keep the smallest set of most likely codes whose probability reaches ``top_p`` (nucleus sampling, Holtzman et
al. 2020); the most likely code always survives. ``top_k=1`` is greedy decoding.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

import torch
from torch import Tensor

from steps.nn.config import ConfigBase, FieldError

# One generator for the whole batch, one generator or int seed per sample, or None (torch's global generator).
RandomSource = Union[torch.Generator, Sequence[Union[torch.Generator, int]], None]  # noqa: UP007


class ControlError(FieldError):
    """A sampling control out of range; the message names the control as users spell it (``top_p must be ...``)."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__("SamplingControls", field, problem)
        self.args = (f"{field} {problem}",)

    def __str__(self) -> str:
        return self.args[0]

    def __reduce__(self):  # pickled across Ray and processes with its two fields
        return type(self), (self.field, self.problem)


@dataclass(frozen=True)
class SamplingControls(ConfigBase):
    """How codes are drawn from a prior's logits: one value, checked once where it is made, then carried unchanged
    from the caller (the sample step, ``Generator``, the MLflow model, Ray Serve) to every sampler. The defaults leave
    the model's distribution as it is.

    Attributes:
        temperature: divides the logits (scales the VAE's latent draws); < 1 gives safer samples.
        top_k: keep only the ``top_k`` most likely codes at each position (0: off).
        top_p: keep the smallest set of most likely codes whose probability reaches ``top_p`` (1.0: off).
        guidance_scale: classifier-free guidance (Ho & Salimans 2022; 1.0: off, > 1 follows the class more closely
            at some cost in diversity), at the levels whose prior learned a "no class" label (``class_dropout > 0``).

    Raises:
        ControlError: a value of the wrong type or out of range, naming the control.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    guidance_scale: float = 1.0

    def __post_init__(self) -> None:
        try:
            super().__post_init__()
        except ControlError:
            raise
        except FieldError as exc:  # a type error found by ConfigBase: the same error, named the same way
            raise ControlError(exc.field, exc.problem) from None

    def validate(self) -> None:
        self.require("temperature", self.temperature > 0, "> 0")
        self.require("top_k", self.top_k >= 0, "an int >= 0 (0: off)")
        self.require("top_p", 0 < self.top_p <= 1, "in (0, 1] (1: off)")
        ok = 0 <= self.guidance_scale < float("inf")
        self.require("guidance_scale", ok, "a finite number >= 0 (1: off)")

    def error(self, field: str, problem: str) -> ControlError:
        return ControlError(field, problem)

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def parse(cls, values: Mapping[str, Any]) -> SamplingControls:
        """Controls from loosely typed values (JSON, query or model params): an integral float is taken for
        ``top_k`` and an int for the others; names not in :meth:`names` are refused."""
        unknown = sorted(set(values) - set(cls.names()))
        if unknown:
            raise ControlError(unknown[0], f"is not a sampling control; they are {', '.join(cls.names())}")
        given = dict(values)
        k = given.get("top_k")
        if isinstance(k, float) and k.is_integer():
            given["top_k"] = int(k)
        return cls(**given)

    @property
    def guided(self) -> bool:
        return self.guidance_scale != 1

    def check_guidance(self, guidable: bool, where: str = "these priors have none") -> None:
        """The one check that guidance has a prior to act on: ``guidable`` says whether any prior in use learned the
        "no class" label (was trained with ``class_dropout > 0``); ``where`` ends the message."""
        if self.guided and not guidable:
            raise ValueError(
                f"guidance_scale={self.guidance_scale} needs class-conditional priors trained with class_dropout > 0 "
                f"(prior.<level>.class_dropout of train_prior, e.g. 0.1); {where}"
            )

    def at_level(self, guidable: bool) -> SamplingControls:
        """The controls a level's sampler uses: guidance only where the prior learned the "no class" label."""
        return self if guidable or not self.guided else dataclasses.replace(self, guidance_scale=1.0)


DEFAULT = SamplingControls()


def uniforms(n: int, count: int, source: RandomSource, device: torch.device | str) -> Tensor:
    """The random streams of ``n`` samples, ``count`` uniforms each: (n, count) float64 on ``device``.

    Args:
        n: number of samples.
        count: uniforms per sample (positions of the code map).
        source: ``None`` uses torch's global generator; one ``torch.Generator`` draws the whole block
            ``torch.rand(n, count)`` from it; a sequence of ``n`` generators or int seeds gives sample ``i`` the
            stream ``torch.rand(count)`` of its own generator (an int ``s`` means a fresh CPU generator seeded
            with ``s``). Generators advance, so passing the same ones to a second call (e.g. the bottom level
            after the top) continues their streams.
        device: where the uniforms are returned; they are drawn on each generator's own device.

    Raises:
        ValueError: a sequence whose length is not ``n``.
    """
    kw = dict(dtype=torch.float64)
    if source is None:
        return torch.rand(n, count, **kw).to(device)
    if isinstance(source, torch.Generator):
        return torch.rand(n, count, generator=source, device=source.device, **kw).to(device)
    if len(source) != n:
        raise ValueError(f"expected one generator or seed per sample ({n}), got {len(source)}")
    rows = []
    for g in source:
        g = g if isinstance(g, torch.Generator) else torch.Generator().manual_seed(int(g))
        rows.append(torch.rand(count, generator=g, device=g.device, **kw).to(device))
    return torch.stack(rows)  # (n, count)


def filtered_probs(logits: Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Unnormalised float64 probabilities (B, K) after temperature, top-k and top-p; filtered codes get 0."""
    logits = logits.double() / temperature  # (B, K); float64 so that filtering itself adds no rounding noise
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)  # (B, K)
    if top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of the more likely codes
        drop = before >= top_p  # the nucleus already holds top_p without this code; never drops the first
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(drop, 0.0))
    return probs


def draw_codes(logits: Tensor, u: Tensor, controls: SamplingControls = DEFAULT) -> Tensor:
    """One code per row of ``logits`` (B, K), by inverse CDF with the uniforms ``u`` (B,): returns (B,) int64.
    Guidance is the caller's (it mixes two streams' logits first: :func:`steps.nn.prior.guided_logits`)."""
    probs = filtered_probs(logits, controls.temperature, controls.top_k, controls.top_p)
    cdf = probs.cumsum(dim=-1)  # (B, K)
    target = (u.to(cdf) * cdf[:, -1]).unsqueeze(1)  # (B, 1)
    # The first code whose cumulative probability exceeds the target; codes of probability 0 are never chosen.
    return torch.searchsorted(cdf, target, right=True).squeeze(1).clamp_(max=logits.shape[-1] - 1)
