"""A PixelCNN prior's weights rearranged for incremental sampling (steps/nn/sampler.py): per gated block and per
attention block, the matrices one position or one row needs, with biases folded where a product can carry them."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from steps.nn.pixelcnn import CausalSelfAttention, GatedBlock


def bias_row(weight_t: Tensor, bias: Tensor) -> Tensor:
    """(in + 1, out): ``weight_t`` (in, out) with ``bias`` (out,) as a last row, for inputs with a constant 1 column.

    ``[x, 1] @ W`` is ``x @ weight_t + bias`` in one matrix product instead of a product and an add (or a bias copy,
    which is what a biased product costs on a GPU at batch 1).
    """
    return torch.cat([weight_t, bias[None]]).contiguous()


class LayerWeights:
    """One gated block's weights, rearranged for row-wise and position-wise use."""

    def __init__(self, block: GatedBlock) -> None:
        # detach(): the sampler keeps the storages it was built from alive, so captured graphs never read freed memory.
        p = block.pad
        self.v_w, self.v_b = block.v_conv.weight.detach(), block.v_conv.bias.detach()  # (2C, C, p+1, k), (2C,)
        self.vh_w = block.v_to_h.weight[:, :, 0].detach()  # (2C, 2C, 1), a 1-D conv over a row
        self.vh_b = block.v_to_h.bias + block.h_conv.bias  # (2C,); h_conv's bias folded into the row term
        # h_conv tap t (weight (2C, C, 1, p+1)) reads column c - p + t, so the input at column c reaches column c + j
        # through tap p - j: the taps side by side, (C, (p+1) * 2C), add one column's input to columns c..c+p.
        taps = block.h_conv.weight[:, :, 0, :]  # (2C, C, p+1)
        self.scatter_w = torch.cat([taps[:, :, p - j].t() for j in range(p + 1)], dim=1).contiguous()
        res_skip = torch.cat([block.h_res.weight[:, :, 0, 0], block.h_skip.weight[:, :, 0, 0]]).t()  # (C, 2C)
        self.rs_w = bias_row(res_skip, torch.cat([block.h_res.bias, block.h_skip.bias]))  # (C+1, 2C)
        self.class_w = block.class_bias.weight.detach() if block.class_bias is not None else None  # (classes, 2C)
        proj = block.cond_proj
        self.cond_w = proj.weight[:, :, 0].detach() if proj is not None else None  # (2C, cond_channels, 1)
        self.cond_b = proj.bias.detach() if proj is not None else None


class AttentionWeights:
    """One attention block's weights: fused q/k/v projection, position table, output and feed-forward maps."""

    def __init__(self, attn: CausalSelfAttention, height: int, width: int) -> None:
        self.heads = attn.heads
        self.scale = (attn.q_proj.weight.shape[0] // attn.heads) ** -0.5  # scaled_dot_product_attention's default
        self.eps, self.ff_eps = attn.norm.eps, attn.ff_norm.eps
        pos = torch.arange(height * width, device=attn.row_embed.weight.device)
        table = attn.row_embed(pos // width) + attn.col_embed(pos % width)  # (N, C), as in project()
        # norm(h) + pos: the position joins the norm's shift, one shift row per position.
        self.norm_w, self.norm_b = attn.norm.weight.detach(), attn.norm.bias + table  # (C,), (N, C)
        self.qkv_w = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]).t().contiguous()
        self.qkv_b = torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias])  # (3C,)
        self.out_w, self.out_b = attn.out_proj.weight.detach().t(), attn.out_proj.bias.detach()  # (C, C), (C,)
        ff1, gelu, ff2 = attn.ff
        self.ff_norm_w, self.ff_norm_b = attn.ff_norm.weight.detach(), attn.ff_norm.bias.detach()
        self.ff1_w, self.ff1_b = ff1.weight.detach().t(), ff1.bias.detach()  # (C, 2C), (2C,)
        self.gelu = gelu.approximate
        self.ff2_w = bias_row(ff2.weight.t(), ff2.bias)  # (2C+1, C)

    def step(self, stream: Tensor, cache: Tensor, ff_in: Tensor, attention: str, i: int) -> None:
        """Attention of position ``i`` over positions <= i, then the feed-forward, added to ``stream`` (B, C) in place.

        ``cache`` is this block's ("sdpa": (B, N, 3C) queries, keys, values; "bmm": (2, B, heads, N, C / heads) keys,
        values); ``ff_in`` (B, 2C + 1) the feed-forward's hidden layer with its column of ones.
        """
        c = stream.shape[1]
        x = F.layer_norm(stream, (c,), self.norm_w, self.norm_b[i], self.eps)  # (B, C)
        out = (self._sdpa if attention == "sdpa" else self._bmm)(cache, x, i)  # (B, C)
        stream.addmm_(out, self.out_w).add_(self.out_b)  # update(): + out_proj(out)
        x = F.layer_norm(stream, (c,), self.ff_norm_w, self.ff_norm_b, self.ff_eps)  # (B, C)
        hidden = torch.addmm(self.ff1_b, x, self.ff1_w, out=ff_in[:, :-1])  # (B, 2C)
        torch.ops.aten.gelu_(hidden, approximate=self.gelu)  # in place: gelu.out into a strided view fails on CPU
        stream.addmm_(ff_in, self.ff2_w)  # + ff(ff_norm(tokens)), bias included

    def _sdpa(self, qkv: Tensor, x: Tensor, i: int) -> Tensor:
        """Attention output (B, C) from the fused kernel; ``qkv`` (B, N, 3C) caches q, k, v, row i holding the bias."""
        (b, c), heads = x.shape, self.heads
        qkv[:, i].addmm_(x, self.qkv_w)  # this position's queries, keys and values, in the cache
        q = qkv[:, i, :c].view(b, 1, heads, -1).transpose(1, 2)  # (B, heads, 1, C / heads)
        k = qkv[:, : i + 1, c : 2 * c].view(b, i + 1, heads, -1).transpose(1, 2)  # (B, heads, i+1, C / heads)
        v = qkv[:, : i + 1, 2 * c :].view(b, i + 1, heads, -1).transpose(1, 2)  # (B, heads, i+1, C / heads)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, 1, C / heads)
        return out.transpose(1, 2).reshape(b, c)

    def _bmm(self, kv: Tensor, x: Tensor, i: int) -> Tensor:
        """Attention output (B, C) from batched products; ``kv`` (2, B, heads, N, C / heads) caches keys, values."""
        (b, c), heads, n = x.shape, self.heads, kv.shape[3]
        qkv = torch.addmm(self.qkv_b, x, self.qkv_w)  # (B, 3C)
        kv[:, :, :, i] = qkv[:, c:].view(b, 2, heads, -1).transpose(0, 1)  # this position's keys and values
        q = (qkv[:, :c] * self.scale).view(b * heads, 1, -1)  # (B*heads, 1, C / heads), contiguous
        keys = kv[0].view(b * heads, n, -1)[:, : i + 1]  # (B*heads, i+1, C / heads)
        weights = torch.softmax(torch.bmm(q, keys.transpose(1, 2)), dim=-1)  # (B*heads, 1, i+1)
        return torch.bmm(weights, kv[1].view(b * heads, n, -1)[:, : i + 1]).view(b, c)  # (B, C)
