"""The gated PixelCNN prior (kind ``pixelcnn``) over VQ-VAE code maps (VQ-VAE-2, Razavi et al. 2019, section 3.2).

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

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from steps.nn.prior import ConditionNet, Prior, PriorConfig


@dataclass(frozen=True)
class PixelCNNConfig(PriorConfig):
    """A :class:`PixelCNNPrior` (kind ``pixelcnn``): what it models and the settings of every prior
    (:class:`PriorConfig`: ``channels`` is the width C of both stacks, ``layers`` the number of gated blocks,
    ``dropout`` inside the gated and attention blocks), and its own architecture.

    Attributes:
        kernel_size: odd kernel size k (>= 3) of the stacks' convolutions.
        attn_heads: heads of the causal self-attention; 0 means no attention blocks.
        attn_every: an attention block follows every ``attn_every`` gated blocks.
    """

    kernel_size: int = 5
    attn_heads: int = 0
    attn_every: int = 2

    def validate(self) -> None:
        super().validate()
        self.require("kernel_size", self.kernel_size >= 3 and self.kernel_size % 2 == 1, "odd and >= 3")
        self.require("attn_heads", self.attn_heads >= 0, ">= 0")
        self.require("attn_every", self.attn_every >= 1, ">= 1")
        if self.attn_heads > 0:
            self.require("attn_heads", self.channels % self.attn_heads == 0, f"a divisor of channels={self.channels}")
            self.require("attn_every", self.attn_every <= self.layers, f"<= layers={self.layers}")


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


class PixelCNNPrior(Prior):
    """Gated PixelCNN prior without blind spot, with optional attention, class and spatial conditioning."""

    config_cls = PixelCNNConfig

    def __init__(self, config: PixelCNNConfig):
        super().__init__()
        self.config = config
        c = config.channels
        self.embed = nn.Embedding(config.num_codes, c)
        self.cond_net = ConditionNet(config) if config.cond_num_codes > 0 else None
        cond_channels = config.cond_channels if self.cond_net is not None else 0
        self.blocks = nn.ModuleList(
            GatedBlock(c, config.kernel_size, config.dropout, config.label_slots, cond_channels)
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

    def forward(self, codes: Tensor, labels: Tensor | None = None, cond: Tensor | None = None) -> Tensor:
        """Logits (B, num_codes, H, W); the logits at position i depend only on ``codes`` at positions < i.

        Args:
            codes: (B, H, W) integer codes in [0, num_codes).
            labels: (B,) class labels, required iff ``num_classes > 0``.
            cond: (B, *cond_shape) conditioning codes, required iff ``cond_num_codes > 0``.

        Raises:
            ValueError: on a wrong shape, dtype or value range, or a missing / unexpected conditioning input.
        """
        self.check_inputs(codes, labels, cond)
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
