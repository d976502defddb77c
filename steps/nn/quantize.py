"""Vector quantisation with EMA codebook updates (VQ-VAE, van den Oord et al. 2017, section 3.1 and appendix A.1).

The forward pass snaps each input vector to its nearest codebook entry, passes gradients straight through to the
encoder and returns the commitment loss ``beta * ||z - sg(e)||^2``. The codebook itself is not trained by the
optimiser: in training mode every forward pass updates it as an exponential moving average of the vectors assigned
to each code, with

* **bias correction** (as in Adam), per code, so that a code's average is unbiased from its first update on and
  after a restart, rather than dragged towards the zero the EMA starts from;
* **Laplace smoothing** of the cluster sizes, so a rarely used code never divides by zero;
* **dead-code restart**: a code no vector chose for ``restart_after`` updates is re-seeded from a current encoder
  output and its EMA state reset (Dhariwal et al. 2020, "Jukebox", section 3.2 uses the same remedy);
* optional **k-means initialisation** from the first training batch.

When ``torch.distributed`` is initialised the per-batch statistics are all-reduced and every random choice (k-means
seeds, restart vectors) is made on rank 0 and broadcast, so every rank keeps a bit-identical codebook. Every rank
issues the same collectives in the same order, because each decision is taken from state that is already
identical everywhere.

The quantizer always computes in fp32, also under autocast: distances between nearly equal bf16 vectors pick the
wrong code too often, and EMA statistics in bf16 lose the small updates entirely.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from steps.nn.config import ConfigBase

MAX_CODEBOOK = 1 << 15  # codes are stored as int16 downstream: codes 0 .. 32767


@dataclass(frozen=True)
class QuantizerConfig(ConfigBase):
    """Base of every quantiser config (the role ``quantizer`` of :mod:`steps.nn.registry`).

    A subclass provides ``codebook_size`` and ``dim`` (fields or properties) and :meth:`resized`; its model class is
    a :class:`Quantizer`. In dicts and Hydra files a quantiser config names its kind: ``{"kind": "ema", ...}``.
    """

    role: ClassVar[str] = "quantizer"

    def resized(self, codebook_size: int | None = None, dim: int | None = None) -> QuantizerConfig:
        """This config for a level with another codebook size or code dimension (None: keep)."""
        raise NotImplementedError


@dataclass(frozen=True)
class EMAQuantizerConfig(QuantizerConfig):
    """Hyper-parameters of one EMA codebook (kind ``ema``).

    Attributes:
        codebook_size: number of codes K (stored as int16 downstream, so at most 32768: codes 0 .. 32767).
        dim: dimension D of each code vector.
        beta: commitment loss weight (the paper's beta).
        decay: EMA decay of the codebook statistics.
        eps: Laplace smoothing constant of the cluster sizes.
        restart_after: a code unused for this many training updates is re-seeded; 0 disables restarts.
        kmeans_init: initialise the codebook with k-means on the first training batch.
        kmeans_iters: Lloyd iterations of that initialisation.
    """

    codebook_size: int = 512
    dim: int = 64
    beta: float = 0.25
    decay: float = 0.99
    eps: float = 1e-5
    restart_after: int = 20
    kmeans_init: bool = False
    kmeans_iters: int = 10

    def validate(self) -> None:
        self.require("codebook_size", 2 <= self.codebook_size <= MAX_CODEBOOK, f"in [2, {MAX_CODEBOOK}]")
        self.require("dim", self.dim >= 1, ">= 1")
        self.require("beta", self.beta >= 0, ">= 0")
        self.require("decay", 0.0 < self.decay < 1.0, "in (0, 1)")
        self.require("eps", self.eps > 0, "> 0")
        self.require("restart_after", self.restart_after >= 0, ">= 0")
        self.require("kmeans_iters", self.kmeans_iters >= 1, ">= 1")

    def resized(self, codebook_size: int | None = None, dim: int | None = None) -> EMAQuantizerConfig:
        return replace(self, codebook_size=codebook_size or self.codebook_size, dim=dim or self.dim)


class QuantizerOutput(NamedTuple):
    """Result of quantising a feature map."""

    quantized: torch.Tensor  # (B, D, H, W), straight-through: forward = codes' vectors, backward = identity
    codes: torch.Tensor  # (B, H, W) int64
    commit_loss: torch.Tensor  # scalar, already weighted by beta
    perplexity: torch.Tensor  # scalar, exp(entropy) of this batch's code histogram (all ranks under DDP)


def sync_ranks(sync: bool | None) -> bool:
    """Whether a quantiser built with ``sync`` all-reduces its statistics now (None: when torch.distributed is up)."""
    if sync is not None:
        return sync
    return dist.is_available() and dist.is_initialized()


class Quantizer(nn.Module):
    """What a VQ model needs of a quantiser (the role ``quantizer``): quantise, look codes up, count usage.

    ``forward(z (B, D, H, W)) -> QuantizerOutput``; ``lookup(codes (B, H, W)) -> (B, D, H, W)``; usage statistics
    since :meth:`reset_usage` for the training logs and the evaluate step, from the ``usage`` buffer (codebook_size,)
    int64 a subclass registers (not persistent: it is no part of the model) and adds each forward's code counts to.
    """

    config_cls: ClassVar[type[QuantizerConfig]]
    config: QuantizerConfig
    usage: torch.Tensor

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def restart_count(self) -> int:
        """Codes re-seeded since the model was built (0 for quantisers that never restart codes)."""
        return 0

    def reset_usage(self) -> None:
        """Start a new dataset-level usage count (e.g. before an evaluation pass)."""
        self.usage.zero_()

    def usage_fraction(self) -> float:
        """Fraction of codes chosen at least once since :meth:`reset_usage`."""
        return float((self.usage > 0).float().mean())

    def dead_codes(self) -> int:
        """Number of codes not chosen since :meth:`reset_usage`."""
        return int((self.usage == 0).sum())

    def usage_perplexity(self) -> float:
        """Perplexity of the dataset-level code histogram; equals codebook_size when usage is uniform."""
        total = self.usage.sum()
        if total == 0:
            return 0.0
        p = self.usage.double() / total
        return float(torch.exp(-(p * torch.log(p.clamp_min(1e-30))).sum()))


class VectorQuantizerEMA(Quantizer):
    """Nearest-neighbour quantiser whose codebook is an EMA of its assigned encoder outputs (kind ``ema``).

    Args:
        config: codebook hyper-parameters.
        sync: all-reduce codebook statistics across ranks. ``None`` (default) means "whenever
            ``torch.distributed`` is initialised at call time", so one module works in a unit test and under DDP.
    """

    config_cls = EMAQuantizerConfig

    def __init__(self, config: EMAQuantizerConfig, sync: bool | None = None) -> None:
        super().__init__()
        self.config = config
        self.sync = sync
        k, d = config.codebook_size, config.dim
        # Uniform init in a small box, as in the reference implementation; k-means or restarts move codes onto data.
        self.register_buffer("embedding", torch.empty(k, d).uniform_(-1.0 / k, 1.0 / k))
        # EMA state, per code. ema_count/ema_sum are the raw (biased) moving averages; ema_steps counts the updates
        # since the code was last (re)initialised and gives the per-code bias correction 1 - decay ** steps.
        self.register_buffer("ema_count", torch.zeros(k))
        self.register_buffer("ema_sum", torch.zeros(k, d))
        self.register_buffer("ema_steps", torch.zeros(k, dtype=torch.long))
        self.register_buffer("unused_for", torch.zeros(k, dtype=torch.long))
        self.register_buffer("initialized", torch.tensor(not config.kmeans_init))
        # Dataset-level usage: how often each code was chosen since reset_usage(). Not part of the model's state.
        self.register_buffer("usage", torch.zeros(k, dtype=torch.long), persistent=False)
        self.register_buffer("restarts", torch.zeros((), dtype=torch.long))

    # ----------------------------------------------------------------------------------------------- lookup
    def _nearest(self, flat: torch.Tensor) -> torch.Tensor:
        """Index of the nearest code for each row of ``flat`` (N, D)."""
        emb = self.embedding
        # ||x - e||^2 = ||x||^2 - 2 x.e + ||e||^2; ||x||^2 is constant per row and does not change the argmin.
        dist_sq = torch.addmm((emb * emb).sum(1)[None, :], flat, emb.t(), alpha=-2.0)  # (N, K)
        return dist_sq.argmin(dim=1)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """Code vectors for an integer code map: (B, H, W) -> (B, D, H, W)."""
        if codes.min() < 0 or codes.max() >= self.config.codebook_size:
            raise ValueError(
                f"code values must be in [0, {self.config.codebook_size}), got [{int(codes.min())}, {int(codes.max())}]"
            )
        return F.embedding(codes.long(), self.embedding).permute(0, 3, 1, 2).contiguous()

    # ----------------------------------------------------------------------------------------------- forward
    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """Quantise ``z`` (B, D, H, W); in training mode also update the codebook."""
        if z.dim() != 4 or z.shape[1] != self.config.dim:
            raise ValueError(f"expected input of shape (B, {self.config.dim}, H, W), got {tuple(z.shape)}")
        with torch.autocast(device_type=z.device.type, enabled=False):
            z = z.float()
            b, d, h, w = z.shape
            flat = z.permute(0, 2, 3, 1).reshape(-1, d)  # (N, D)
            distributed = sync_ranks(self.sync)
            if self.training and not bool(self.initialized):
                self._kmeans_init(flat.detach(), distributed)
            codes = self._nearest(flat.detach())  # (N,)
            counts = torch.bincount(codes, minlength=self.config.codebook_size).float()  # (K,)
            if self.training:
                sums = torch.zeros_like(self.ema_sum).index_add_(0, codes, flat.detach())  # (K, D)
                if distributed:
                    # One collective for both statistics keeps ranks in lock-step and halves the latency.
                    stats = torch.cat([counts[:, None], sums], dim=1)
                    dist.all_reduce(stats)
                    counts, sums = stats[:, 0].contiguous(), stats[:, 1:].contiguous()
                self._ema_update(counts, sums)
                if self.config.restart_after > 0:
                    self._restart_dead(flat.detach(), distributed)
            self.usage += counts.long()
            quantized = F.embedding(codes, self.embedding).view(b, h, w, d).permute(0, 3, 1, 2)  # (B, D, H, W)
            commit_loss = self.config.beta * F.mse_loss(z, quantized.detach())
            quantized = z + (quantized - z).detach()  # straight-through estimator
            probs = counts / counts.sum().clamp_min(1.0)
            perplexity = torch.exp(-(probs * torch.log(probs.clamp_min(1e-10))).sum())
        return QuantizerOutput(quantized, codes.view(b, h, w), commit_loss, perplexity)

    # ----------------------------------------------------------------------------------------------- EMA
    @torch.no_grad()
    def _ema_update(self, counts: torch.Tensor, sums: torch.Tensor) -> None:
        decay, eps = self.config.decay, self.config.eps
        self.ema_count.mul_(decay).add_(counts, alpha=1 - decay)
        self.ema_sum.mul_(decay).add_(sums, alpha=1 - decay)
        self.ema_steps += 1
        correction = 1.0 - decay ** self.ema_steps.double()  # (K,)
        count_hat = (self.ema_count.double() / correction).float()  # (K,) unbiased cluster sizes
        sum_hat = self.ema_sum / correction.float()[:, None]  # (K, D)
        total = count_hat.sum()
        smoothed = (count_hat + eps) / (total + self.config.codebook_size * eps) * total  # Laplace smoothing
        # A code that has received no vector since it was (re)initialised has no average to move to: keep it.
        seen = count_hat > 0
        self.embedding[seen] = sum_hat[seen] / smoothed[seen, None]
        used = counts > 0
        self.unused_for[used] = 0
        self.unused_for[~used] += 1

    @torch.no_grad()
    def _restart_dead(self, flat: torch.Tensor, distributed: bool) -> None:
        dead = self.unused_for >= self.config.restart_after  # identical on every rank: built from reduced counts
        n_dead = int(dead.sum())
        if n_dead == 0:
            return
        # Rank 0 draws the replacements from its own batch and broadcasts them, so codebooks stay identical.
        idx = torch.randint(0, flat.shape[0], (n_dead,), device=flat.device)
        fresh = flat[idx].clone()  # (n_dead, D)
        if distributed:
            dist.broadcast(fresh, src=0)
        self.embedding[dead] = fresh
        self.ema_count[dead] = 0.0
        self.ema_sum[dead] = 0.0
        self.ema_steps[dead] = 0
        self.unused_for[dead] = 0
        self.restarts += n_dead

    @torch.no_grad()
    def _kmeans_init(self, flat: torch.Tensor, distributed: bool) -> None:
        k = self.config.codebook_size
        n = flat.shape[0]
        # k-means++ seeding (Arthur & Vassilvitskii 2007): each new centre is drawn with probability proportional to
        # its squared distance from the chosen ones, which avoids two centres starting in one cluster.
        centroids = torch.empty(k, flat.shape[1], device=flat.device)
        centroids[0] = flat[torch.randint(0, n, (1,), device=flat.device)]
        nearest_sq = ((flat - centroids[0]) ** 2).sum(1)  # (N,)
        for i in range(1, k):
            total = nearest_sq.sum()
            # With fewer distinct vectors than codes the rest start as repeats; restarts spread them apart later.
            pick = (
                torch.multinomial(nearest_sq / total, 1) if total > 0 else torch.randint(0, n, (1,), device=flat.device)
            )
            centroids[i] = flat[pick]
            nearest_sq = torch.minimum(nearest_sq, ((flat - centroids[i]) ** 2).sum(1))
        for _ in range(self.config.kmeans_iters):
            assign = torch.cdist(flat, centroids).argmin(dim=1)
            counts = torch.bincount(assign, minlength=k).float()
            sums = torch.zeros_like(centroids).index_add_(0, assign, flat)
            filled = counts > 0
            centroids[filled] = sums[filled] / counts[filled, None]
        if distributed:
            dist.broadcast(centroids, src=0)
        self.embedding.copy_(centroids)
        self.initialized.fill_(True)

    def restart_count(self) -> int:
        return int(self.restarts)

    def extra_repr(self) -> str:
        c = self.config
        return f"codebook_size={c.codebook_size}, dim={c.dim}, beta={c.beta}, decay={c.decay}"
