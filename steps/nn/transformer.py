"""A decoder-only transformer prior (kind ``transformer``) over the raster sequence of a code map, with an exact
KV-cached sampler.

The prior of VQGAN (Esser et al. 2021, section 3.2) and LlamaGen (Sun et al. 2024): a code map (H, W) is read as
the sequence of its H * W codes in raster order, and a stack of pre-norm causal self-attention blocks predicts each
code from those before it. Conditioning:

* class: the sequence starts with a start token, the embedding of the sample's class (LlamaGen's class token; one
  learned start token for an unconditional prior). With ``class_dropout`` a "no class" embedding is learned too, for
  classifier-free guidance;
* the level above (the bottom prior of a VQ-VAE-2): the top codes go through the same non-causal conditioning network
  as the PixelCNN's (:class:`~steps.nn.prior.ConditionNet`, upsampled to the bottom map's size), and position i's
  input gets the features at position i. The top codes are known before sampling, so this breaks no causality, and
  each bottom position reads the top codes right above it without attending for them.

Input token i is ``start`` (i = 0) or the embedding of code i - 1, plus a learned position embedding of i, plus the
conditioning features at i; output i predicts code i. So the logits at position i depend only on codes < i.

:class:`TransformerSampler` draws one position at a time from per-block key / value caches: each new position costs
one token's projections and one attention row per block instead of a forward pass over the whole sequence. It does
in the same order what the forward pass does (tests/unit/test_transformer.py checks teacher-forced logits against
it and sampled codes against :func:`steps.nn.prior.sample_naive`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from steps.nn.draw import DEFAULT, RandomSource, SamplingControls, uniforms
from steps.nn.prior import ConditionNet, Pick, Prior, PriorConfig, check_completion, drawer, forcing, guided_inputs


@dataclass(frozen=True)
class TransformerConfig(PriorConfig):
    """A :class:`TransformerPrior` (kind ``transformer``): what it models and the settings of every prior
    (:class:`PriorConfig`: ``channels`` is the width of the token stream, d_model; ``layers`` the number of blocks;
    ``dropout`` on the residual branches and the input tokens), and its own architecture.

    Attributes:
        heads: attention heads per block; must divide ``channels``.
        mlp_ratio: hidden width of each block's feed-forward, in multiples of ``channels``.
    """

    layers: int = 6
    heads: int = 4
    mlp_ratio: int = 4

    def validate(self) -> None:
        super().validate()
        self.require_min(1, "heads", "mlp_ratio")
        self.require("heads", self.channels % max(self.heads, 1) == 0, f"a divisor of channels={self.channels}")


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``, causal over the sequence."""

    def __init__(self, channels: int, heads: int, mlp_ratio: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, channels)
        self.norm2 = nn.LayerNorm(channels)
        self.mlp = nn.Sequential(
            nn.Linear(channels, mlp_ratio * channels), nn.GELU(), nn.Linear(mlp_ratio * channels, channels)
        )
        self.dropout = nn.Dropout(dropout)

    def qkv_heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Queries, keys and values (B, heads, N, C / heads) of tokens (B, N, C)."""
        b, n, c = x.shape
        qkv = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, c // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, heads, N, C / heads)
        return q, k, v

    def finish(self, x: Tensor, attended: Tensor) -> Tensor:
        """The residual of the attention output (B, heads, N, C / heads), then the feed-forward's."""
        b, _, n, _ = attended.shape
        x = x + self.dropout(self.proj(attended.transpose(1, 2).reshape(b, n, -1)))
        return x + self.dropout(self.mlp(self.norm2(x)))

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self.qkv_heads(x)
        return self.finish(x, F.scaled_dot_product_attention(q, k, v, is_causal=True))

    def step(self, x: Tensor, keys: Tensor, values: Tensor, i: int) -> Tensor:
        """Token ``i`` alone (B, 1, C): its key and value go into the caches (B, heads, N, C / heads) at ``i``, its
        query attends to positions <= i."""
        q, k, v = self.qkv_heads(x)
        keys[:, :, i : i + 1] = k
        values[:, :, i : i + 1] = v
        return self.finish(x, F.scaled_dot_product_attention(q, keys[:, :, : i + 1], values[:, :, : i + 1]))


class TransformerPrior(Prior):
    """Decoder-only transformer prior over the raster code sequence, with class and code-map conditioning."""

    config_cls = TransformerConfig

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = config
        c, n = config.channels, config.shape[0] * config.shape[1]
        self.embed = nn.Embedding(config.num_codes, c)
        self.start = nn.Embedding(max(config.label_slots, 1), c)  # per class (and "no class"), or one start token
        self.pos = nn.Parameter(torch.zeros(n, c))
        self.cond_net = ConditionNet(config) if config.cond_num_codes > 0 else None
        self.cond_proj = nn.Linear(config.cond_channels, c) if self.cond_net is not None else None
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(
            Block(c, config.heads, config.mlp_ratio, config.dropout) for _ in range(config.layers)
        )
        self.norm = nn.LayerNorm(c)
        self.head = nn.Linear(c, config.num_codes)
        for p in (self.embed.weight, self.start.weight, self.pos):
            nn.init.normal_(p, std=0.02)
        # Small output weights: a fresh model predicts close to uniform, so the first loss is ~log2(K) bits.
        with torch.no_grad():
            self.head.weight.mul_(0.1)
            self.head.bias.zero_()

    def starts(self, labels: Tensor | None, batch: int) -> Tensor:
        """The start token of each sample (B, C): its class's embedding, or the one start token."""
        if labels is None:
            return self.start.weight[:1].expand(batch, -1)
        return self.start(labels.long())

    def conditioning(self, cond: Tensor | None) -> Tensor | None:
        """Features of the conditioning codes at every position (B, N, C), or None."""
        if self.cond_net is None or cond is None:
            return None
        return self.cond_proj(self.cond_net(cond.long()).flatten(2).transpose(1, 2))

    def forward(self, codes: Tensor, labels: Tensor | None = None, cond: Tensor | None = None) -> Tensor:
        """Logits (B, num_codes, H, W); the logits at position i depend only on ``codes`` at positions < i.

        Raises:
            ValueError: on a wrong shape, dtype or value range, or a missing / unexpected conditioning input.
        """
        self.check_inputs(codes, labels, cond)
        b, (h, w) = codes.shape[0], self.config.shape
        previous = self.embed(codes.long().flatten(1)[:, :-1])  # (B, N - 1, C): codes 0 .. N - 2
        x = torch.cat([self.starts(labels, b)[:, None], previous], dim=1) + self.pos  # (B, N, C)
        features = self.conditioning(cond)
        if features is not None:
            x = x + features
        x = self.drop(x)
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.norm(x))  # (B, N, K)
        return logits.transpose(1, 2).reshape(b, -1, h, w)


class TransformerSampler:
    """Exact incremental sampler of a :class:`TransformerPrior`: per-block key / value caches, one token at a time.

    Reads the model's modules when called (no copy of the weights), in eval mode. The interface of every sampler the
    registry names (:class:`steps.nn.prior.NaiveSampler`).

    Attributes:
        cache_bytes: bytes of the key / value caches of the last batch.
    """

    def __init__(self, model: TransformerPrior) -> None:
        self.model = model
        self.cache_bytes = 0

    @torch.no_grad()
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
        """Draw ``n`` code maps (n, H, W) int64, or complete ``given`` after its first ``keep`` raster positions;
        arguments as for :meth:`steps.nn.sampler.CachedSampler.sample`.

        Args:
            given: (n, H, W) integer codes whose first ``keep`` positions are kept (image completion); checked
                whenever passed, ignored with ``keep=0`` (:func:`steps.nn.prior.check_completion`).
            keep: number of leading raster positions (i = r * W + c < keep) taken from ``given`` instead of drawn;
                later positions are drawn with the same uniforms as without forcing, so ``keep=0`` is plain sampling
                and, by causality, completing a map drawn with seeds S with the same seeds returns it unchanged.

        Raises:
            ValueError: bad ``n``, ``keep`` or ``given``, controls or conditioning inputs.
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be an int >= 1, got {n!r}")
        model, (h, w) = self.model, self.model.config.shape
        check_completion(model.config, n, given, keep)
        device = next(model.parameters()).device
        u = uniforms(n, h * w, generator, device)  # (n, H*W)
        model.check_inputs(torch.zeros((), dtype=torch.long, device=device).expand(n, h, w), labels, cond)
        labels, cond = guided_inputs(model.config, labels, cond, controls)
        streams = 2 if controls.guided else 1
        pick = forcing(drawer(u, controls), given, keep, streams=streams, device=device)
        return self._run(streams * n, labels, cond, pick)[:n]

    @torch.no_grad()
    def logits(self, codes: Tensor, labels: Tensor | None = None, cond: Tensor | None = None) -> Tensor:
        """Teacher-forced logits (B, K, H, W) of ``codes``, position by position from the caches.

        Equals ``model(codes, labels, cond)`` up to float rounding; used to test the caches.
        """
        model, (h, w) = self.model, self.model.config.shape
        model.check_inputs(codes, labels, cond)
        teacher = codes.long().flatten(1)
        out = []

        def pick(i: int, logits: Tensor) -> Tensor:
            out.append(logits)
            return teacher[:, i]

        self._run(codes.shape[0], labels, cond, pick)
        return torch.stack(out, dim=2).view(codes.shape[0], -1, h, w)

    def _run(self, b: int, labels: Tensor | None, cond: Tensor | None, pick: Pick) -> Tensor:
        """The raster loop for a batch of ``b``: ``pick(i, logits (b, K))`` gives the codes at position i."""
        model, cfg = self.model, self.model.config
        n_pos, c = cfg.shape[0] * cfg.shape[1], cfg.channels
        device, dtype = model.pos.device, model.pos.dtype
        was_training = model.training
        model.eval()
        try:
            features = model.conditioning(cond)  # (b, N, C) or None
            shape = (b, cfg.heads, n_pos, c // cfg.heads)
            caches = [(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))
                      for _ in model.blocks]  # fmt: skip
            self.cache_bytes = sum(2 * k.numel() * k.element_size() for k, _ in caches)
            codes = torch.zeros(b, n_pos, dtype=torch.long, device=device)
            token = model.starts(labels, b)  # (b, C): the input of position 0
            for i in range(n_pos):
                x = token + model.pos[i]
                if features is not None:
                    x = x + features[:, i]
                x = x[:, None]  # (b, 1, C)
                for block, (keys, values) in zip(model.blocks, caches, strict=True):
                    x = block.step(x, keys, values, i)
                codes[:, i] = pick(i, model.head(model.norm(x[:, 0])))
                token = model.embed(codes[:, i])
        finally:
            model.train(was_training)
        return codes.view(b, *cfg.shape)
