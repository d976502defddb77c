"""Drawing codes from a prior's logits: temperature, top-k, top-p, and one random stream per sample.

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

from collections.abc import Sequence
from typing import Union

import torch
from torch import Tensor

# One generator for the whole batch, one generator or int seed per sample, or None (torch's global generator).
RandomSource = Union[torch.Generator, Sequence[Union[torch.Generator, int]], None]  # noqa: UP007


# The sampling controls every sampler takes, with the values that leave the model's distribution as it is.
CONTROLS = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "guidance_scale": 1.0}


def check_controls(temperature: float, top_k: int, top_p: float, guidance_scale: float = 1.0) -> None:
    """Raise ValueError naming the first control that is out of range."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0 <= guidance_scale < float("inf"):
        raise ValueError(f"guidance_scale must be a finite number >= 0 (1: off), got {guidance_scale!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0 (0: off), got {top_k!r}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (1: off), got {top_p!r}")


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


def draw_codes(logits: Tensor, u: Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """One code per row of ``logits`` (B, K), by inverse CDF with the uniforms ``u`` (B,): returns (B,) int64."""
    cdf = filtered_probs(logits, temperature, top_k, top_p).cumsum(dim=-1)  # (B, K)
    target = (u.to(cdf) * cdf[:, -1]).unsqueeze(1)  # (B, 1)
    # The first code whose cumulative probability exceeds the target; codes of probability 0 are never chosen.
    return torch.searchsorted(cdf, target, right=True).squeeze(1).clamp_(max=logits.shape[-1] - 1)
