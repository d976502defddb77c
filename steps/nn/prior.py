"""Autoregressive priors over VQ-VAE code maps (VQ-VAE-2, Razavi et al. 2019, section 3.2).

A prior models ``p(codes) = prod_i p(code_i | codes_<i)`` over a (H, W) code map in raster order. The top
prior is unconditional or class-conditional; the bottom prior is also conditioned on the top code map.

The backbone is the gated PixelCNN of van den Oord et al. 2016 ("Conditional Image Generation with PixelCNN
Decoders", sections 2.1-2.3): a vertical stack that sees every row above and a horizontal stack that sees the
current row to the left, which together remove the blind spot of the masked PixelCNN. Causality comes from
shifting the embedded input once (down for the vertical stack, right for the horizontal one); every conv after
that is padded to look only up / left, so no weight masks are needed. Invariants:

* vertical features at (r, c) depend only on input rows < r;
* horizontal features at (r, c) depend only on raster positions < (r, c);
* hence the logits at position i depend only on codes at positions < i (tests/unit/test_prior.py checks this).

Optional PixelSNAIL-style causal self-attention (Chen et al. 2018, "PixelSNAIL", section 3) on the horizontal
stack lets each position read every earlier position, not only those in the convolutions' receptive field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from steps.nn.draw import RandomSource, check_controls, draw_codes, uniforms


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_int(name: str, value: Any, minimum: int) -> None:
    if not _is_int(value) or value < minimum:
        raise ValueError(f"PriorConfig.{name} must be an int >= {minimum}, got {value!r}")


def _check_pair(name: str, value: Any, minimum: int) -> None:
    if not (isinstance(value, tuple) and len(value) == 2 and all(_is_int(v) and v >= minimum for v in value)):
        raise ValueError(f"PriorConfig.{name} must be a pair of ints >= {minimum}, got {value!r}")


@dataclass(frozen=True)
class PriorConfig:
    """Hyper-parameters of a :class:`PixelCNNPrior`.

    Attributes:
        num_codes: codebook size K of the modelled code map.
        shape: (H, W) of the modelled code map.
        channels: width C of both stacks.
        layers: number of gated blocks.
        kernel_size: odd kernel size k (>= 3) of the stacks' convolutions.
        dropout: dropout rate inside the gated and attention blocks.
        num_classes: number of class labels; 0 means no class conditioning.
        attn_heads: heads of the causal self-attention; 0 means no attention blocks.
        attn_every: an attention block follows every ``attn_every`` gated blocks.
        cond_num_codes: codebook size of the conditioning code map; 0 means no spatial conditioning.
        cond_shape: (h, w) of the conditioning map; each must divide the matching side of ``shape``.
        cond_channels: width of the conditioning network.
        cond_res_blocks: residual blocks of the conditioning network.
    """

    num_codes: int = 512
    shape: tuple[int, int] = (8, 8)
    channels: int = 128
    layers: int = 8
    kernel_size: int = 5
    dropout: float = 0.0
    num_classes: int = 0
    attn_heads: int = 0
    attn_every: int = 2
    cond_num_codes: int = 0
    cond_shape: tuple[int, int] = (0, 0)
    cond_channels: int = 64
    cond_res_blocks: int = 2

    def __post_init__(self) -> None:
        # Hydra and JSON hand us lists; the frozen config keeps hashable tuples.
        for name in ("shape", "cond_shape"):
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        _check_int("num_codes", self.num_codes, 1)
        _check_pair("shape", self.shape, 1)
        _check_int("channels", self.channels, 1)
        _check_int("layers", self.layers, 1)
        if not _is_int(self.kernel_size) or self.kernel_size < 3 or self.kernel_size % 2 == 0:
            raise ValueError(f"PriorConfig.kernel_size must be odd and >= 3, got {self.kernel_size!r}")
        if type(self.dropout) not in (int, float) or not 0 <= self.dropout < 1:
            raise ValueError(f"PriorConfig.dropout must be a float in [0, 1), got {self.dropout!r}")
        _check_int("num_classes", self.num_classes, 0)
        _check_int("attn_heads", self.attn_heads, 0)
        _check_int("attn_every", self.attn_every, 1)
        if self.attn_heads > 0 and self.channels % self.attn_heads != 0:
            msg = f"PriorConfig.attn_heads must divide channels={self.channels}, got {self.attn_heads}"
            raise ValueError(msg)
        if self.attn_heads > 0 and self.attn_every > self.layers:
            raise ValueError(f"PriorConfig.attn_every must be <= layers={self.layers}, got {self.attn_every}")
        _check_int("cond_num_codes", self.cond_num_codes, 0)
        _check_pair("cond_shape", self.cond_shape, 0)
        _check_int("cond_channels", self.cond_channels, 1)
        _check_int("cond_res_blocks", self.cond_res_blocks, 0)
        if self.cond_num_codes > 0 and not all(
            c > 0 and s % c == 0 for s, c in zip(self.shape, self.cond_shape, strict=True)
        ):
            raise ValueError(f"PriorConfig.cond_shape must divide shape={self.shape}, got {self.cond_shape}")

    def to_dict(self) -> dict[str, Any]:
        """Plain python primitives (tuples as lists), loadable with ``torch.load(weights_only=True)``."""
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v for f in fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PriorConfig:
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"PriorConfig: unknown field(s) {unknown}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def _shift_down(x: Tensor) -> Tensor:
    """Move every row one down (zeros on top), so row r holds what was row r - 1."""
    return F.pad(x, (0, 0, 1, 0))[:, :, :-1, :]  # (B, C, H, W)


def _shift_right(x: Tensor) -> Tensor:
    """Move every column one right (zeros on the left), so column c holds what was column c - 1."""
    return F.pad(x, (1, 0, 0, 0))[:, :, :, :-1]  # (B, C, H, W)


def _causal_mask(q_pos: Tensor, k_pos: Tensor) -> Tensor:
    """Boolean (Nq, Nk) mask, True where query position i may read key position j, i.e. j <= i.

    The diagonal is allowed because horizontal features at i already depend only on codes < i.
    """
    return k_pos[None, :] <= q_pos[:, None]


def _gate(x: Tensor) -> Tensor:
    a, b = x.chunk(2, dim=1)
    return torch.tanh(a) * torch.sigmoid(b)


class GatedBlock(nn.Module):
    """One gated PixelCNN layer (van den Oord et al. 2016, figure 2) with optional class and spatial bias.

    The two stacks' convolutions are separate attributes so an incremental sampler can cache them per layer.
    """

    def __init__(self, channels: int, kernel_size: int, dropout: float, num_classes: int, cond_channels: int):
        super().__init__()
        c, self.pad = channels, kernel_size // 2
        self.v_conv = nn.Conv2d(c, 2 * c, (self.pad + 1, kernel_size))  # rows r-pad..r, cols c-pad..c+pad
        self.h_conv = nn.Conv2d(c, 2 * c, (1, self.pad + 1))  # cols c-pad..c of the same row
        self.v_to_h = nn.Conv2d(2 * c, 2 * c, 1)
        self.h_res = nn.Conv2d(c, c, 1)
        self.h_skip = nn.Conv2d(c, c, 1)
        self.dropout = nn.Dropout(dropout)
        self.class_bias = nn.Embedding(num_classes, 2 * c) if num_classes > 0 else None
        self.cond_proj = nn.Conv2d(cond_channels, 2 * c, 1) if cond_channels > 0 else None

    def conditioning(self, labels: Tensor | None, cond: Tensor | None) -> Tensor | None:
        """The bias both stacks receive: (B, 2C, 1, 1), (B, 2C, H, W), or None without conditioning."""
        bias = None
        if self.class_bias is not None and labels is not None:
            bias = self.class_bias(labels)[:, :, None, None]  # (B, 2C, 1, 1)
        if self.cond_proj is not None and cond is not None:
            spatial = self.cond_proj(cond)  # (B, 2C, H, W)
            bias = spatial if bias is None else bias + spatial
        return bias

    def forward(
        self, v: Tensor, h: Tensor, labels: Tensor | None = None, cond: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """New vertical stack, new horizontal stack and this block's skip output, each (B, C, H, W)."""
        p = self.pad
        v_pre = self.v_conv(F.pad(v, (p, p, p, 0)))  # (B, 2C, H, W); reads rows above only, as v does
        # The vertical pre-activation at (r, c) depends on rows < r, so the horizontal stack may read it.
        h_pre = self.h_conv(F.pad(h, (p, 0, 0, 0))) + self.v_to_h(v_pre)  # (B, 2C, H, W)
        bias = self.conditioning(labels, cond)
        if bias is not None:
            v_pre, h_pre = v_pre + bias, h_pre + bias
        gated = self.dropout(_gate(h_pre))  # (B, C, H, W)
        return self.dropout(_gate(v_pre)), h + self.h_res(gated), self.h_skip(gated)


class CausalSelfAttention(nn.Module):
    """Pre-norm causal multi-head self-attention plus feed-forward over raster positions (PixelSNAIL).

    The work is split into :meth:`project`, :meth:`attend` and :meth:`update` so that a sampler can project
    only the newest position and attend to cached keys / values of earlier positions.
    """

    def __init__(self, channels: int, heads: int, shape: tuple[int, int], dropout: float):
        super().__init__()
        self.heads, self.width = heads, shape[1]
        self.norm = nn.LayerNorm(channels)
        # Learned 2-D positions: attention is permutation-invariant and would not know the map's geometry.
        self.row_embed = nn.Embedding(shape[0], channels)
        self.col_embed = nn.Embedding(shape[1], channels)
        nn.init.normal_(self.row_embed.weight, std=0.02)
        nn.init.normal_(self.col_embed.weight, std=0.02)
        self.q_proj = nn.Linear(channels, channels)
        self.k_proj = nn.Linear(channels, channels)
        self.v_proj = nn.Linear(channels, channels)
        self.out_proj = nn.Linear(channels, channels)
        self.ff_norm = nn.LayerNorm(channels)
        hidden = 2 * channels
        self.ff = nn.Sequential(nn.Linear(channels, hidden), nn.GELU(), nn.Linear(hidden, channels))
        self.dropout = nn.Dropout(dropout)

    def _heads(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        return x.view(b, n, self.heads, c // self.heads).transpose(1, 2)  # (B, heads, N, C / heads)

    def project(self, tokens: Tensor, positions: Tensor) -> tuple[Tensor, ...]:
        """Queries, keys, values (B, heads, N, C / heads) of tokens (B, N, C) at flat ``positions`` (N,)."""
        pos = self.row_embed(positions // self.width) + self.col_embed(positions % self.width)  # (N, C)
        x = self.norm(tokens) + pos  # (B, N, C)
        return self._heads(self.q_proj(x)), self._heads(self.k_proj(x)), self._heads(self.v_proj(x))

    def attend(self, q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, k_pos: Tensor) -> Tensor:
        """Attention of queries at ``q_pos`` (Nq,) over keys / values at ``k_pos`` (Nk,); returns (B, Nq, C).

        Every query must have at least one key at a position <= its own (its own position, in practice).
        """
        mask = _causal_mask(q_pos, k_pos)  # (Nq, Nk)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, heads, Nq, C / heads)
        b, _, nq, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, nq, -1))  # (B, Nq, C)

    def update(self, tokens: Tensor, attended: Tensor) -> Tensor:
        """Add the attention output, then a position-wise feed-forward, as residuals (B, N, C)."""
        tokens = tokens + self.dropout(attended)
        return tokens + self.dropout(self.ff(self.ff_norm(tokens)))

    def forward(self, h: Tensor) -> Tensor:
        b, c, height, width = h.shape
        tokens = h.flatten(2).transpose(1, 2)  # (B, H*W, C), raster order
        pos = torch.arange(height * width, device=h.device)
        q, k, v = self.project(tokens, pos)
        tokens = self.update(tokens, self.attend(q, k, v, pos, pos))
        return tokens.transpose(1, 2).reshape(b, c, height, width)  # (B, C, H, W)


class _ResBlock(nn.Module):
    """ReLU, 3x3 conv, ReLU, 1x1 conv, plus identity (the VQ-VAE residual block)."""

    def __init__(self, channels: int):
        super().__init__()
        conv3, conv1 = nn.Conv2d(channels, channels, 3, padding=1), nn.Conv2d(channels, channels, 1)
        self.net = nn.Sequential(nn.ReLU(), conv3, nn.ReLU(), conv1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.net(x)


class ConditionNet(nn.Module):
    """Turns a conditioning code map (B, h, w) into features (B, cond_channels, H, W) at the prior's size.

    The conditioning map is fully known before sampling starts, so this network is not causal.
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


class PixelCNNPrior(nn.Module):
    """Gated PixelCNN prior without blind spot, with optional attention, class and spatial conditioning."""

    def __init__(self, config: PriorConfig):
        super().__init__()
        self.config = config
        c = config.channels
        self.embed = nn.Embedding(config.num_codes, c)
        self.cond_net = ConditionNet(config) if config.cond_num_codes > 0 else None
        cond_channels = config.cond_channels if self.cond_net is not None else 0
        self.blocks = nn.ModuleList(
            GatedBlock(c, config.kernel_size, config.dropout, config.num_classes, cond_channels)
            for _ in range(config.layers)
        )
        # Keyed by the index of the gated block each attention block follows.
        heads, every = config.attn_heads, config.attn_every
        after = [i for i in range(config.layers) if heads > 0 and (i + 1) % every == 0]
        attn = {str(i): CausalSelfAttention(c, heads, config.shape, config.dropout) for i in after}
        self.attn = nn.ModuleDict(attn)
        self.head = nn.Sequential(nn.ReLU(), nn.Conv2d(c, c, 1), nn.ReLU(), nn.Conv2d(c, config.num_codes, 1))
        # Small output weights: a fresh model predicts close to uniform, so the first loss is ~log2(K) bits.
        with torch.no_grad():
            self.head[-1].weight.mul_(0.1)
            self.head[-1].bias.zero_()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _check_inputs(self, codes: Any, labels: Any, cond: Any) -> None:
        cfg = self.config
        _check_codes("codes", codes, (-1, *cfg.shape), cfg.num_codes)
        b = codes.shape[0]
        if cfg.num_classes > 0:
            if labels is None:
                raise ValueError(f"labels are required: the prior has num_classes={cfg.num_classes}")
            _check_codes("labels", labels, (b,), cfg.num_classes)
        elif labels is not None:
            raise ValueError("labels given, but the prior is not class-conditional (num_classes=0)")
        if cfg.cond_num_codes > 0:
            if cond is None:
                raise ValueError(f"cond is required: the prior is conditioned on a {cfg.cond_shape} code map")
            _check_codes("cond", cond, (b, *cfg.cond_shape), cfg.cond_num_codes)
        elif cond is not None:
            raise ValueError("cond given, but the prior has no spatial conditioning (cond_num_codes=0)")

    def forward(self, codes: Tensor, labels: Tensor | None = None, cond: Tensor | None = None) -> Tensor:
        """Logits (B, num_codes, H, W); the logits at position i depend only on ``codes`` at positions < i.

        Args:
            codes: (B, H, W) integer codes in [0, num_codes).
            labels: (B,) class labels, required iff ``num_classes > 0``.
            cond: (B, *cond_shape) conditioning codes, required iff ``cond_num_codes > 0``.

        Raises:
            ValueError: on a wrong shape, dtype or value range, or a missing / unexpected conditioning input.
        """
        self._check_inputs(codes, labels, cond)
        labels = labels.long() if labels is not None else None
        cond_map = self.cond_net(cond.long()) if self.cond_net is not None else None  # (B, c, H, W)
        x = self.embed(codes.long()).permute(0, 3, 1, 2)  # (B, C, H, W)
        # The one place causality is established: afterwards every conv only looks up / left.
        v, h = _shift_down(x), _shift_right(x)  # (B, C, H, W) each
        skip = torch.zeros_like(h)
        for i, block in enumerate(self.blocks):
            v, h, s = block(v, h, labels, cond_map)
            skip = skip + s
            if str(i) in self.attn:
                h = self.attn[str(i)](h)
        # The final horizontal stream joins the skips so that a last attention block reaches the output too.
        return self.head(skip + h)  # (B, K, H, W)

    def nll_bits(self, codes: Tensor, labels: Tensor | None = None, cond: Tensor | None = None) -> Tensor:
        """Mean negative log-likelihood of ``codes`` in bits per code (a scalar)."""
        logits = self(codes, labels, cond)  # (B, K, H, W)
        return F.cross_entropy(logits.float(), codes.long()) / math.log(2)

    loss = nll_bits


@torch.no_grad()
def sample_naive(
    model: PixelCNNPrior,
    n: int,
    labels: Tensor | None = None,
    cond: Tensor | None = None,
    temperature: float = 1.0,
    generator: RandomSource = None,
    top_k: int = 0,
    top_p: float = 1.0,
) -> Tensor:
    """Draw ``n`` code maps in raster order, rerunning the full forward pass for every position.

    Slow (H * W forward passes) but obviously correct; the cached sampler (steps/nn/sampler.py) is tested against
    it. Both draw through :func:`steps.nn.draw.draw_codes`, so the same random streams give the same codes.

    Args:
        model: the prior; it is put in eval mode while sampling and its previous mode restored afterwards.
        n: number of samples.
        labels: (n,) class labels for a class-conditional prior.
        cond: (n, *cond_shape) conditioning codes for a spatially conditioned prior.
        temperature: divides the logits; < 1 sharpens, > 1 flattens.
        generator: the random streams (see :func:`steps.nn.draw.uniforms`): one generator for the batch, one
            generator or int seed per sample, or None.
        top_k: keep only the ``top_k`` most likely codes (0: off).
        top_p: keep the smallest set of most likely codes whose probability reaches ``top_p`` (1: off).

    Returns:
        (n, H, W) int64 codes.
    """
    if not _is_int(n) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    check_controls(temperature, top_k, top_p)
    height, width = model.config.shape
    device = next(model.parameters()).device
    u = uniforms(n, height * width, generator, device)  # (n, H*W)
    codes = torch.zeros(n, height, width, dtype=torch.long, device=device)
    was_training = model.training
    model.eval()
    try:
        for r in range(height):
            for c in range(width):
                logits = model(codes, labels, cond)[:, :, r, c]  # (n, K)
                codes[:, r, c] = draw_codes(logits, u[:, r * width + c], temperature, top_k, top_p)
    finally:
        model.train(was_training)
    return codes
