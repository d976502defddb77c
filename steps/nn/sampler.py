"""Cached (incremental) sampling for :class:`~steps.nn.pixelcnn.PixelCNNPrior`.

The naive sampler reruns the whole prior on the generated prefix for each of the H * W positions. Following
Ramachandran et al. 2017 ("Fast Generation for Convolutional Autoregressive Models"), this one computes only what
depends on the newest position, from per-layer caches, and mirrors the prior's forward pass exactly:

* vertical stack: its features at row r depend only on code rows < r, so at the start of row r each layer runs its
  (k//2+1, k) convolution once over the whole row, from a cache of the last k//2+1 rows of its input. The same row
  pass precomputes the row's vertical-to-horizontal term ``v_to_h(v_pre) + bias`` for every column;
* horizontal stack: at (r, c) each layer reads the last k//2+1 columns of its input row (a per-layer row buffer)
  and the precomputed vertical term at (r, c); ``h_res`` and ``h_skip`` run as one matrix product;
* causal self-attention (PixelSNAIL): keys and values of earlier positions sit in per-block caches; the newest
  position alone is projected (q/k/v fused into one product) and attends to the cache, then the residual and
  feed-forward follow: the block's ``project`` / ``attend`` / ``update`` for one query;
* conditioning: class biases and the ConditionNet features of the top codes are computed once per batch; each
  layer's 1x1 projection of them is applied row by row as rows start (the same work as once, far less memory).

Per position the work is O(layers * C^2 + attention over the prefix) instead of a full forward pass over H * W
positions. The results equal the forward pass up to float rounding (tests/unit/test_sampler.py checks every
variant), and draws go through :func:`steps.nn.draw.draw_codes`, so with the same random streams this sampler and
:func:`steps.nn.prior.sample_naive` return the same codes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from steps.nn.draw import RandomSource, check_controls, draw_codes, uniforms
from steps.nn.pixelcnn import CausalSelfAttention, GatedBlock, PixelCNNPrior


class _Layer:
    """One gated block's weights, reshaped for row-wise and position-wise use."""

    def __init__(self, block: GatedBlock) -> None:
        c = block.h_res.weight.shape[0]
        self.v_w, self.v_b = block.v_conv.weight, block.v_conv.bias  # (2C, C, p+1, k), (2C,)
        self.vh_w = block.v_to_h.weight[:, :, 0]  # (2C, 2C, 1), a 1-D conv over a row
        self.vh_b = block.v_to_h.bias + block.h_conv.bias  # (2C,); h_conv's bias folded into the row term
        # h_conv weight (2C, C, 1, p+1) as a matrix over a window flattened column-major: ((p+1) * C, 2C).
        self.h_w = block.h_conv.weight[:, :, 0, :].permute(2, 1, 0).reshape(-1, 2 * c).contiguous()
        res_skip = torch.cat([block.h_res.weight[:, :, 0, 0], block.h_skip.weight[:, :, 0, 0]])  # (2C, C)
        self.rs_w, self.rs_b = res_skip.t().contiguous(), torch.cat([block.h_res.bias, block.h_skip.bias])
        self.class_w = block.class_bias.weight if block.class_bias is not None else None  # (classes, 2C)
        proj = block.cond_proj
        self.cond_w = proj.weight[:, :, 0] if proj is not None else None  # (2C, cond_channels, 1)
        self.cond_b = proj.bias if proj is not None else None


class _Attention:
    """One attention block's weights: fused q/k/v projection and the 2-D position table."""

    def __init__(self, attn: CausalSelfAttention, height: int, width: int) -> None:
        self.heads = attn.heads
        self.norm, self.ff_norm, self.out_proj, self.ff = attn.norm, attn.ff_norm, attn.out_proj, attn.ff
        pos = torch.arange(height * width, device=attn.row_embed.weight.device)
        self.pos = attn.row_embed(pos // width) + attn.col_embed(pos % width)  # (N, C), as in project()
        self.qkv_w = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]).t().contiguous()
        self.qkv_b = torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias])  # (3C,)

    def step(self, h: Tensor, i: int, keys: Tensor, values: Tensor) -> Tensor:
        """Tokens (B, C) at flat position ``i`` after attention over positions <= i; fills cache slot i."""
        b, c = h.shape
        x = F.layer_norm(h, (c,), self.norm.weight, self.norm.bias, self.norm.eps).add_(self.pos[i])  # (B, C)
        qkv = torch.addmm(self.qkv_b, x, self.qkv_w).view(b, 3, self.heads, -1)  # (B, 3, heads, d)
        keys[:, :, i], values[:, :, i] = qkv[:, 1], qkv[:, 2]
        out = F.scaled_dot_product_attention(qkv[:, 0, :, None], keys[:, :, : i + 1], values[:, :, : i + 1])
        tokens = self.out_proj(out.view(b, c)).add_(h)  # (B, C); update() without dropout (eval)
        return self.ff(self.ff_norm(tokens)).add_(tokens)


class CachedSampler:
    """Incremental sampler for one prior; build it once per model and reuse it for every batch.

    The weights are read when the sampler is built: build a new one after changing the model's parameters.
    """

    def __init__(self, model: PixelCNNPrior) -> None:
        self.model, cfg = model, model.config
        self.height, self.width = cfg.shape
        self.pad = cfg.kernel_size // 2
        with torch.no_grad():
            self.layers = [_Layer(block) for block in model.blocks]
            self.attn = {int(i): _Attention(a, *cfg.shape) for i, a in model.attn.items()}
            # The head's 1x1 convs (ReLU, conv, ReLU, conv) as linear maps of one position's features.
            self.head = [(conv.weight[:, :, 0, 0], conv.bias) for conv in (model.head[1], model.head[3])]
        self.cache_bytes = 0  # bytes of all cache tensors of the last batch

    @torch.no_grad()
    def sample(
        self,
        n: int,
        labels: Tensor | None = None,
        cond: Tensor | None = None,
        *,
        temperature: float = 1.0,
        generator: RandomSource = None,
        top_k: int = 0,
        top_p: float = 1.0,
    ) -> Tensor:
        """Draw ``n`` code maps in raster order from the caches.

        Args:
            n: number of samples.
            labels: (n,) class label per sample, for a class-conditional prior.
            cond: (n, *cond_shape) conditioning codes (the top codes), for a spatially conditioned prior.
            temperature: divides the logits; < 1 sharpens, > 1 flattens.
            generator: the random streams (:func:`steps.nn.draw.uniforms`): one generator for the batch, or one
                generator or int seed per sample, so that a sample's codes do not depend on its batch; None uses
                torch's global generator. The same streams give the same codes as ``sample_naive``.
            top_k: keep only the ``top_k`` most likely codes (0: off).
            top_p: keep the smallest set of most likely codes whose probability reaches ``top_p`` (1: off).

        Returns:
            (n, H, W) int64 codes.

        Raises:
            ValueError: bad ``n``, controls or conditioning inputs.
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be an int >= 1, got {n!r}")
        check_controls(temperature, top_k, top_p)
        u = uniforms(n, self.height * self.width, generator, self._device)  # (n, H*W)
        codes = torch.zeros(n, self.height, self.width, dtype=torch.long, device=self._device)

        def pick(i: int, logits: Tensor) -> Tensor:
            return draw_codes(logits, u[:, i], temperature, top_k, top_p)

        return self._run(codes, labels, cond, pick)

    @torch.no_grad()
    def logits(self, codes: Tensor, labels: Tensor | None = None, cond: Tensor | None = None) -> Tensor:
        """Teacher-forced logits (B, K, H, W) of ``codes``, position by position from the caches.

        Equals ``model(codes, labels, cond)`` up to float rounding; used to test the caches.
        """
        w = self.layers[0].h_w
        out = torch.empty(
            codes.shape[0], self.model.config.num_codes, self.height, self.width, dtype=w.dtype, device=w.device
        )

        def pick(i: int, logits: Tensor) -> Tensor:
            r, c = divmod(i, self.width)
            out[:, :, r, c] = logits
            return codes[:, r, c]

        self._run(codes.clone(), labels, cond, pick)
        return out

    @property
    def _device(self) -> torch.device:
        return self.layers[0].h_w.device

    def _run(self, codes: Tensor, labels: Tensor | None, cond: Tensor | None, pick: Callable) -> Tensor:
        """Raster-order loop; ``pick(i, logits (B, K))`` returns the codes (B,) at flat position i."""
        model = self.model
        model.check_inputs(codes, labels, cond)
        was_training = model.training
        model.eval()  # no dropout; the head and attention's sub-modules are called directly
        try:
            return self._loop(codes, labels, cond, pick)
        finally:
            model.train(was_training)

    def _loop(self, codes: Tensor, labels: Tensor | None, cond: Tensor | None, pick: Callable) -> Tensor:
        model, p, width = self.model, self.pad, self.width
        b, c_, n_layers = codes.shape[0], model.config.channels, len(self.layers)
        embed = model.embed.weight  # (K, C)
        like = dict(dtype=embed.dtype, device=embed.device)
        cond_map = model.cond_net(cond.long()) if model.cond_net is not None else None  # (B, cc, H, W), once
        class_bias = [
            F.embedding(labels.long(), lay.class_w)[:, :, None] if lay.class_w is not None and labels is not None else 0
            for lay in self.layers
        ]  # (B, 2C, 1) per layer, once
        # Caches: the last p+1 input rows of each vertical conv (channel-first, as conv2d wants them); the current
        # input row of each horizontal conv with p zero columns on the left (channel-last: a window is one view);
        # the row's vertical-to-horizontal term per layer; keys / values of every attention block.
        v_rows = [torch.zeros(b, c_, p + 1, width, **like) for _ in range(n_layers)]  # (B, C, p+1, W)
        h_rows = [torch.zeros(b, width + p, c_, **like) for _ in range(n_layers)]  # (B, p+W, C)
        vh = [torch.zeros(b, width, 2 * c_, **like) for _ in range(n_layers)]  # (B, W, 2C)
        n_pos, heads = self.height * width, model.config.attn_heads
        kv = {i: [torch.zeros(b, heads, n_pos, c_ // max(heads, 1), **like) for _ in range(2)] for i in self.attn}
        cached = [*v_rows, *h_rows, *vh, *(t for pair in kv.values() for t in pair)]
        cached += [cond_map] if cond_map is not None else []
        self.cache_bytes = sum(t.numel() * t.element_size() for t in cached)
        (w1, b1), (w2, b2) = self.head

        for r in range(self.height):
            # Row start: the whole vertical stack for row r, from code rows < r.
            v_in = F.embedding(codes[:, r - 1], embed).transpose(1, 2) if r else torch.zeros(b, c_, width, **like)
            for li, lay in enumerate(self.layers):
                v_rows[li] = torch.cat([v_rows[li][:, :, 1:], v_in[:, :, None]], dim=2)  # (B, C, p+1, W)
                v_pre = F.conv2d(v_rows[li], lay.v_w, lay.v_b, padding=(0, p))[:, :, 0]  # (B, 2C, W)
                bias = class_bias[li]
                if lay.cond_w is not None:
                    bias = bias + F.conv1d(cond_map[:, :, r], lay.cond_w, lay.cond_b)  # (B, 2C, W)
                if li + 1 < n_layers:  # the last layer's vertical output feeds nothing
                    a, g = (v_pre + bias).chunk(2, dim=1)
                    v_in = torch.tanh(a) * torch.sigmoid(g)  # (B, C, W)
                vh[li] = (F.conv1d(v_pre, lay.vh_w, lay.vh_b) + bias).transpose(1, 2).contiguous()  # (B, W, 2C)
            h_rows[0][:, p].zero_()  # the horizontal stack's input at column 0 is the shift's zero
            for c in range(width):
                i = r * width + c
                skip = None
                for li, lay in enumerate(self.layers):
                    window = h_rows[li][:, c : c + p + 1].reshape(b, -1)  # (B, (p+1)*C): columns c-p..c
                    pre = torch.addmm(vh[li][:, c], window, lay.h_w)  # (B, 2C)
                    gated = torch.tanh(pre[:, :c_]).mul_(torch.sigmoid(pre[:, c_:]))  # (B, C)
                    res_skip = torch.addmm(lay.rs_b, gated, lay.rs_w)  # (B, 2C)
                    h = res_skip[:, :c_].add_(h_rows[li][:, c + p])  # (B, C)
                    skip = res_skip[:, c_:] if skip is None else skip.add_(res_skip[:, c_:])
                    if li in self.attn:
                        h = self.attn[li].step(h, i, *kv[li])
                    if li + 1 < n_layers:
                        h_rows[li + 1][:, c + p] = h
                logits = F.linear(F.relu(F.linear(F.relu(skip + h), w1, b1)), w2, b2)  # (B, K)
                code = pick(i, logits)
                codes[:, r, c] = code
                if c + 1 < width:  # the horizontal shift: code (r, c) is layer 0's input at (r, c + 1)
                    h_rows[0][:, c + 1 + p] = F.embedding(code, embed)
        return codes


@torch.no_grad()
def sample(
    model: PixelCNNPrior,
    n: int,
    labels: Tensor | None = None,
    cond: Tensor | None = None,
    *,
    temperature: float = 1.0,
    generator: RandomSource = None,
    top_k: int = 0,
    top_p: float = 1.0,
) -> Tensor:
    """Draw ``n`` code maps (n, H, W) with a fresh :class:`CachedSampler`; see :meth:`CachedSampler.sample`."""
    controls = dict(temperature=temperature, generator=generator, top_k=top_k, top_p=top_p)
    return CachedSampler(model).sample(n, labels, cond, **controls)
