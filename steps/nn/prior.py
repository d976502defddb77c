"""Autoregressive priors over VQ-VAE code maps (VQ-VAE-2, Razavi et al. 2019, section 3.2): what every prior shares.

A prior models ``p(codes) = prod_i p(code_i | codes_<i)`` over one (H, W) code map in raster order, optionally given
a class label and, below the top level, the code map of the level above. Architectures (the role ``prior`` of
:mod:`steps.nn.registry`) subclass :class:`Prior` and :class:`PriorConfig`:

* :class:`PriorConfig` holds what the prior models, which the pipeline takes from the code dataset (codebook size,
  map shape, classes, the conditioning map); an architecture's config adds its hyper-parameters;
* :class:`Prior` checks inputs and scores codes (:meth:`Prior.nll_bits`); a subclass implements ``forward`` (logits
  whose position i depends only on codes before i) and may name a fast sampler in the registry. Without one,
  :class:`NaiveSampler` (a full forward pass per position) samples any prior.

Every sampler runs the raster loop with a ``pick(i, logits)`` function that gives the codes at position i: a draw
(:func:`drawer`), the given codes when teacher forcing, or, for image completion, the given codes of a kept prefix
and draws after it (:func:`forcing`, checked by :func:`check_completion`). Causality makes a completion exact: the
codes after the prefix are drawn from ``p(code_i | codes_<i)`` exactly as if the prefix had been drawn.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from steps.nn.config import ConfigBase, derived, is_int
from steps.nn.draw import DEFAULT, RandomSource, SamplingControls, draw_codes, uniforms

CODE_DATASET = "the code dataset"
# pick(i, logits (B, K)) -> codes (B,) at flat position i: a draw when sampling, the given codes when teacher forcing.
Pick = Callable[[int, Tensor], Tensor]


@dataclass(frozen=True)
class PriorConfig(ConfigBase):
    """What a prior models (the role ``prior``; the pipeline fills these from the code dataset), and the settings every
    prior architecture has, so that experiments and presets (``debug=tiny``) set them for any kind.

    Attributes:
        channels: width of the network (the PixelCNN's stacks, the transformer's token stream).
        layers: depth (gated blocks, transformer blocks).
        dropout: dropout rate inside the blocks (training only).
        cond_channels: width of the conditioning network (:class:`ConditionNet`; used when conditioned on a code
            map).
        cond_res_blocks: residual blocks of the conditioning network.
        num_codes: codebook size K of the modelled code map.
        shape: (H, W) of the modelled code map.
        num_classes: number of class labels; 0 means no class conditioning.
        cond_num_codes: codebook size of the conditioning code map (the level above); 0: no spatial conditioning.
        cond_shape: (h, w) of the conditioning map; each must divide the matching side of ``shape``.
        class_dropout: for a class-conditional prior, the fraction of training examples whose label is replaced
            by a learned "no class" label (index ``num_classes``), so that the prior also learns the unconditional
            distribution: what classifier-free guidance (Ho & Salimans 2022) needs at sampling time. 0: off.
    """

    role: ClassVar[str] = "prior"

    channels: int = 128
    layers: int = 10
    dropout: float = 0.1
    cond_channels: int = 64
    cond_res_blocks: int = 2
    num_codes: int = derived(512, CODE_DATASET)
    shape: tuple[int, int] = derived((8, 8), CODE_DATASET)
    num_classes: int = derived(0, "train_prior.class_conditional and the classes of " + CODE_DATASET)
    cond_num_codes: int = derived(0, CODE_DATASET + " (the level above)")
    cond_shape: tuple[int, int] = derived((0, 0), CODE_DATASET + " (the level above)")
    class_dropout: float = 0.0

    @property
    def guidable(self) -> bool:
        """Whether the prior knows the "no class" label, so classifier-free guidance can sample it."""
        return self.num_classes > 0 and self.class_dropout > 0

    @property
    def label_slots(self) -> int:
        """Rows of a class embedding: the classes, plus the "no class" label of a guidable prior."""
        return self.num_classes + int(self.guidable)

    def validate(self) -> None:
        self.require_min(1, "channels", "layers", "cond_channels")
        self.require_min(0, "cond_res_blocks")
        self.require("dropout", 0 <= self.dropout < 1, "in [0, 1)")
        self.require("num_codes", self.num_codes >= 1, ">= 1")
        self.require("shape", min(self.shape) >= 1, "a pair of ints >= 1")
        self.require("num_classes", self.num_classes >= 0, ">= 0")
        self.require("cond_num_codes", self.cond_num_codes >= 0, ">= 0")
        self.require("cond_shape", min(self.cond_shape) >= 0, "a pair of ints >= 0")
        self.require("class_dropout", 0 <= self.class_dropout < 1, "in [0, 1)")
        if self.cond_num_codes > 0:
            divides = all(c > 0 and s % c == 0 for s, c in zip(self.shape, self.cond_shape, strict=True))
            self.require("cond_shape", divides, f"a divisor of shape={list(self.shape)}")


def _check_codes(name: str, x: Any, dims: tuple[int, ...], num_codes: int) -> None:
    """Raise ValueError unless ``x`` is an integer tensor of shape ``dims`` (-1: any) in [0, num_codes)."""
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a Tensor, got {type(x).__name__}")
    if x.dtype == torch.bool or x.is_floating_point() or x.is_complex():
        raise ValueError(f"{name} must be an integer tensor, got dtype {x.dtype}")
    if x.dim() != len(dims) or any(d not in (-1, s) for d, s in zip(dims, x.shape, strict=True)):
        want = "(" + ", ".join("*" if d == -1 else str(d) for d in dims) + ")"
        raise ValueError(f"{name} must have shape {want}, got {tuple(x.shape)}")
    if x.numel() and (int(x.min()) < 0 or int(x.max()) >= num_codes):
        raise ValueError(f"{name} values must be in [0, {num_codes}), got [{int(x.min())}, {int(x.max())}]")


class Prior(nn.Module):
    """Base of the priors: input checks and likelihood. ``forward(codes, labels, cond)`` -> logits (B, K, H, W)."""

    config_cls: ClassVar[type[PriorConfig]]
    config: PriorConfig

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def check_inputs(self, codes: Any, labels: Any, cond: Any) -> None:
        """Raise ValueError unless the codes, labels and conditioning map fit the config."""
        cfg = self.config
        _check_codes("codes", codes, (-1, *cfg.shape), cfg.num_codes)
        b = codes.shape[0]
        if cfg.num_classes > 0:
            if labels is None:
                raise ValueError(f"labels are required: the prior has num_classes={cfg.num_classes}")
            _check_codes("labels", labels, (b,), cfg.label_slots)  # the "no class" label is an input too
        elif labels is not None:
            raise ValueError("labels given, but the prior is not class-conditional (num_classes=0)")
        if cfg.cond_num_codes > 0:
            if cond is None:
                raise ValueError(f"cond is required: the prior is conditioned on a {cfg.cond_shape} code map")
            _check_codes("cond", cond, (b, *cfg.cond_shape), cfg.cond_num_codes)
        elif cond is not None:
            raise ValueError("cond given, but the prior has no spatial conditioning (cond_num_codes=0)")

    def nll_bits(self, codes: Tensor, labels: Tensor | None = None, cond: Tensor | None = None) -> Tensor:
        """Mean negative log-likelihood of ``codes`` in bits per code (a scalar)."""
        logits = self(codes, labels, cond)  # (B, K, H, W)
        return F.cross_entropy(logits.float(), codes.long()) / math.log(2)


class _ResBlock(nn.Module):
    """ReLU, 3x3 conv, ReLU, 1x1 conv, plus identity (the VQ-VAE residual block)."""

    def __init__(self, channels: int):
        super().__init__()
        conv3, conv1 = nn.Conv2d(channels, channels, 3, padding=1), nn.Conv2d(channels, channels, 1)
        self.net = nn.Sequential(nn.ReLU(), conv3, nn.ReLU(), conv1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.net(x)


class ConditionNet(nn.Module):
    """Turns a conditioning code map (B, h, w) into features (B, channels, H, W) at the prior's size.

    The conditioning map is fully known before sampling starts, so this network is not causal. Its width and depth
    are the config's ``cond_channels`` and ``cond_res_blocks`` (an architecture that conditions on the level above
    has both).
    """

    def __init__(self, config: PriorConfig):
        super().__init__()
        c = config.cond_channels
        self.embed = nn.Embedding(config.cond_num_codes, c)
        self.blocks = nn.Sequential(*[_ResBlock(c) for _ in range(config.cond_res_blocks)])
        factor = tuple(s // t for s, t in zip(config.shape, config.cond_shape, strict=True))
        # A transposed conv with kernel == stride is a learned upsampling by an integer factor.
        self.upsample = nn.ConvTranspose2d(c, c, factor, stride=factor) if factor != (1, 1) else nn.Identity()

    def forward(self, cond: Tensor) -> Tensor:
        x = self.embed(cond).permute(0, 3, 1, 2)  # (B, c, h, w)
        return self.upsample(self.blocks(x))  # (B, c, H, W)


# ------------------------------------------------------------------------------------------------ guidance
def drop_labels(config: PriorConfig, labels: Tensor | None) -> Tensor | None:
    """Training: each label replaced by the "no class" label with probability ``config.class_dropout``."""
    if labels is None or not config.guidable:
        return labels
    drop = torch.rand(labels.shape, device=labels.device) < config.class_dropout
    return labels.masked_fill(drop, config.num_classes)


def guided_inputs(
    config: PriorConfig, labels: Tensor | None, cond: Tensor | None, controls: SamplingControls
) -> tuple[Tensor | None, Tensor | None]:
    """The inputs of a guided batch: the conditional stream, then the same samples with the "no class" label.

    Without guidance (``guidance_scale == 1``: plain conditional sampling) the inputs are returned as they are.

    Raises:
        ValueError: guidance asked of a prior that has no "no class" label, or without labels.
    """
    if not controls.guided:
        return labels, cond
    where = f"this prior has num_classes={config.num_classes}, class_dropout={config.class_dropout}"
    controls.check_guidance(config.guidable, where)
    if labels is None:
        raise ValueError(f"guidance_scale={controls.guidance_scale} needs labels")
    null = torch.full_like(labels, config.num_classes)
    return torch.cat([labels, null]), (torch.cat([cond, cond]) if cond is not None else None)


def guided_logits(logits: Tensor, guidance_scale: float) -> Tensor:
    """Classifier-free guidance: (2n, K) logits of the conditional then the unconditional stream -> (n, K) logits
    ``uncond + s * (cond - uncond)``; ``s = 1`` is the conditional model, ``s = 0`` the unconditional one, ``s > 1``
    trades diversity for class fidelity. (Logits and log-probabilities differ by a constant per row, which the
    softmax removes, so mixing raw logits is mixing log-probabilities.)"""
    cond, uncond = logits.float().chunk(2)
    return torch.lerp(uncond, cond, guidance_scale)


# ------------------------------------------------------------------------------------------------ sampling
def drawer(u: Tensor, controls: SamplingControls) -> Pick:
    """The pick of plain sampling: position i drawn from its logits with the uniforms ``u[:, i]``.

    Args:
        u: (n, H*W) uniforms, one stream per sample (:func:`steps.nn.draw.uniforms`).
        controls: the sampling controls; with guidance the logits are (2n, K), the conditional stream then the same
            samples with the "no class" label (:func:`guided_inputs`), mixed by :func:`guided_logits`, and both
            copies of a sample take the code drawn from the mixed logits.
    """
    if not controls.guided:

        def pick(i: int, logits: Tensor) -> Tensor:  # (n, K) -> (n,)
            return draw_codes(logits, u[:, i], controls)

        return pick

    def guided(i: int, logits: Tensor) -> Tensor:  # (2n, K) -> (2n,)
        mixed = guided_logits(logits, controls.guidance_scale)  # (n, K)
        return draw_codes(mixed, u[:, i], controls).repeat(2)

    return guided


def check_completion(config: PriorConfig, n: int, given: Any, keep: Any) -> None:
    """Raise ValueError unless ``keep`` and ``given`` describe a completion of ``n`` code maps of ``config``.

    ``keep`` must be an int in [0, H*W]; when it is > 0, ``given`` must be an integer tensor (n, H, W) in
    [0, num_codes). ``given`` with ``keep=0`` is allowed (a completion that keeps nothing is a plain sample, so a
    caller keeping zero rows needs no special case) and has no effect, but it is still checked when passed.
    """
    height, width = config.shape
    if not is_int(keep) or not 0 <= keep <= height * width:
        raise ValueError(f"keep must be an int in [0, {height * width}] (raster positions of the map), got {keep!r}")
    if given is None:
        if keep > 0:
            raise ValueError(f"given is required when keep > 0 (keep={keep}): the codes of the kept positions")
        return
    _check_codes("given", given, (n, height, width), config.num_codes)


def forcing(pick: Pick, given: Tensor | None, keep: int, *, streams: int, device: torch.device) -> Pick:
    """``pick``, except that the first ``keep`` raster positions take the codes of ``given`` (image completion).

    Position i = r * W + c < keep returns ``given[:, r, c]`` (in every stream of a guided batch) and ignores its
    logits; later positions call ``pick`` unchanged, so they use the same uniforms as without forcing. With
    ``keep == 0`` the pick itself is returned: plain sampling is untouched. Check the inputs first with
    :func:`check_completion`.

    Args:
        pick: the pick of the positions after the prefix (:func:`drawer`).
        given: (n, H, W) integer codes; only the first ``keep`` positions in raster order are read.
        keep: number of leading raster positions to force.
        streams: copies of each sample in the batch (2 for guided sampling, else 1).
        device: where the sampler's codes live.
    """
    if keep == 0:
        return pick
    prefix = given.to(device=device, dtype=torch.long).flatten(1)[:, :keep].repeat(streams, 1)  # (streams*n, keep)

    def forced(i: int, logits: Tensor) -> Tensor:
        return prefix[:, i] if i < keep else pick(i, logits)

    return forced


class NaiveSampler:
    """Samples any :class:`Prior` with :func:`sample_naive`; the interface of every sampler the registry names."""

    def __init__(self, model: Prior) -> None:
        self.model = model
        self.cache_bytes = 0  # no caches

    def sample(
        self,
        n: int,
        labels: Tensor | None = None,
        cond: Tensor | None = None,
        *,
        generator: RandomSource = None,
        controls: SamplingControls = DEFAULT,
        given: Tensor | None = None,
        keep: int = 0,
    ) -> Tensor:
        return sample_naive(self.model, n, labels, cond, generator=generator, controls=controls, given=given, keep=keep)


@torch.no_grad()
def sample_naive(
    model: Prior,
    n: int,
    labels: Tensor | None = None,
    cond: Tensor | None = None,
    *,
    generator: RandomSource = None,
    controls: SamplingControls = DEFAULT,
    given: Tensor | None = None,
    keep: int = 0,
) -> Tensor:
    """Draw ``n`` code maps in raster order, rerunning the full forward pass for every position.

    Slow (H * W forward passes) but obviously correct; fast samplers (steps/nn/sampler.py) are tested against it.
    All draw through :func:`steps.nn.draw.draw_codes`, so the same random streams give the same codes.

    Args:
        model: the prior; it is put in eval mode while sampling and its previous mode restored afterwards.
        n: number of samples.
        labels: (n,) class labels for a class-conditional prior.
        cond: (n, *cond_shape) conditioning codes for a spatially conditioned prior.
        generator: the random streams (see :func:`steps.nn.draw.uniforms`): one generator for the batch, one
            generator or int seed per sample, or None.
        controls: temperature, top-k, top-p and classifier-free guidance (:func:`guided_logits`), the last for
            priors trained with ``class_dropout > 0``.
        given: (n, H, W) integer codes whose first ``keep`` positions are kept (image completion); see
            :func:`check_completion`.
        keep: number of leading raster positions (i = r * W + c < keep) taken from ``given`` instead of drawn;
            e.g. ``rows * W`` keeps the first rows and samples the rest. The uniforms of every position are still
            drawn, so position i >= keep uses the same stream as without forcing; ``keep=0`` is plain sampling.
            Causality makes the completion exact: a map drawn with seeds S, completed with the same seeds, comes
            back unchanged for every ``keep``.

    Returns:
        (n, H, W) int64 codes.

    Raises:
        ValueError: bad ``n``, ``keep`` or ``given``, controls or conditioning inputs.
    """
    if not is_int(n) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    check_completion(model.config, n, given, keep)
    height, width = model.config.shape
    device = next(model.parameters()).device
    u = uniforms(n, height * width, generator, device)  # (n, H*W)
    labels, cond = guided_inputs(model.config, labels, cond, controls)
    streams = 2 if controls.guided else 1
    pick = forcing(drawer(u, controls), given, keep, streams=streams, device=device)
    codes = torch.zeros(streams * n, height, width, dtype=torch.long, device=device)
    was_training = model.training
    model.eval()
    try:
        for r in range(height):
            for c in range(width):
                logits = model(codes, labels, cond)[:, :, r, c]  # (streams * n, K)
                codes[:, r, c] = pick(r * width + c, logits)
    finally:
        model.train(was_training)
    return codes[:n]
