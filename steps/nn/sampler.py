"""Cached (incremental) sampling for :class:`~steps.nn.pixelcnn.PixelCNNPrior`, eager or replayed from CUDA graphs.

The naive sampler reruns the whole prior on the generated prefix for each of the H * W positions. Following
Ramachandran et al. 2017 ("Fast Generation for Convolutional Autoregressive Models"), this one computes only what
depends on the newest position, from per-layer caches, and mirrors the prior's forward pass exactly:

* vertical stack: its features at row r depend only on code rows < r, so at the start of row r each layer runs its
  (k//2+1, k) convolution once over the whole row, from a cache of the last k//2+1 rows of its input. The same row
  pass fills the layer's row buffer with the row's vertical-to-horizontal term ``v_to_h(v_pre) + bias``;
* horizontal stack, accumulated forwards: the (1, k//2+1) convolution at column c sums taps over the input columns
  c-k//2..c. Instead of gathering that window at column c, the input at column c is added to the row buffer of
  columns c..c+k//2 as soon as it exists (one matrix product with the taps side by side), so the pre-activation at
  column c is complete once column c's own input has been added. The residual stream and the skip sum of one
  position are updated in place by one product ``[gated, 1] @ [[W_res | W_skip], [b_res | b_skip]]``;
* causal self-attention (PixelSNAIL): the newest position alone is projected (q/k/v fused into one product; the 2-D
  position embedding folded into the norm's shift) and attends to the cached keys / values of positions <= its own,
  then the residual and feed-forward follow: the block's ``project`` / ``attend`` / ``update`` for one query. Two
  ways to attend (``attention``): ``"sdpa"``, one fused kernel, with a cache per block of every position's queries,
  keys and values prefilled with the projection bias so that the q/k/v product lands in its cache row in place; and
  ``"bmm"``, two batched matrix products and a softmax over per-head key / value caches. The fused kernel tiles 32-64
  queries per block for training-sized problems, so with one query per sample and head most of its work is padding:
  fine while it is a few blocks (small batches, where fewer kernels matter more), not when the batch fills the GPU;
  the products read each key and value once, at memory speed;
* conditioning: class biases and the ConditionNet features of the top codes are computed once per batch; each
  layer's 1x1 projection of them is applied row by row as rows start (the same work as once, far less memory).

Per position the work is O(layers * C^2 + attention over the prefix) instead of a full forward pass over H * W
positions. The results equal the forward pass up to float rounding (tests/unit/test_sampler.py checks every
variant), and draws go through :func:`steps.nn.draw.draw_codes`, so with the same random streams this sampler and
:func:`steps.nn.prior.sample_naive` return the same codes.

On a GPU each position is ~100 kernels of a few microseconds, and launching them from Python costs more than running
them. The loop is therefore written for CUDA graphs (:mod:`steps.nn.cuda_graph`): it reads and writes only buffers
allocated before the loop (:class:`_Buffers`), makes no Python decision on tensor values and never synchronises with
the host (uniforms are drawn up front, inputs are checked before). With ``cuda_graphs`` on, each row of the map is
captured once per batch configuration and later calls replay the graphs: the same kernels on the same buffers, so the
codes are those of the eager loop, bit for bit. One graph per row rather than per map: a 32x32 map is ~100k kernels,
and a row (~3.5k) keeps each graph's instantiation small for the price of 32 graph launches per map. Only the
per-call setup (cache reset, conditioning features: a few kernels) stays eager.

Operations per position of the default top prior were cut from ~160 to 99 (tests/unit/test_sampler.py pins the
count); on a GPU every matrix product with an addend also costs a copy of the addend first, 42 per position before,
5 now: ~200 kernels per position became ~105 (+10 layer-norm input copies at batch > 1). Nothing computed changed:
biases ride in matrix products on a constant-1 column, products accumulate in place into the buffers that hold their
addend (row terms, q/k/v cache rows prefilled with the bias, the residual stream), a layer's residual and skip
products are one product, and elementwise ops write into the buffers their consumers read. Float rounding differs
from the forward pass only in summation order, as before.
"""

from __future__ import annotations

import functools
import warnings
from collections import OrderedDict
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from steps.nn.cuda_graph import GraphSequence
from steps.nn.draw import DEFAULT, RandomSource, SamplingControls, uniforms
from steps.nn.pixelcnn import PixelCNNPrior
from steps.nn.prior import Pick, check_completion, drawer, forcing, guided_inputs
from steps.nn.sampler_weights import AttentionWeights, LayerWeights, bias_row

ATTENTION = ("auto", "sdpa", "bmm")
# attention="auto" on a CPU attends with batched products from this batch size on, with the fused kernel below it.
# On CUDA it always uses batched products: on an H200 (bench/gpu.py, CUDA graphs, default 32x32 top prior) they
# took 0.30 / 0.58 / 1.23 ms per position at batch 1 / 64 / 512, the fused kernel 0.49 / 0.91 / 3.10.
BMM_FROM_BATCH = 32


class _Buffers:
    """Everything one batch reads and writes while its code maps are drawn, allocated up front.

    The loop keeps all state that outlives one step in these tensors and updates them in place: that is what lets a
    CUDA graph replay it, since a graph reads and writes the addresses it was captured with. Fresh buffers per call
    when eager; one set per captured configuration with graphs, its inputs refreshed in place before each replay.
    """

    def __init__(self, sampler: CachedSampler, batch: int, labels: bool, cond: bool) -> None:
        cfg, b = sampler.model.config, batch
        (height, width), c, p, n_pos = cfg.shape, cfg.channels, sampler.pad, cfg.shape[0] * cfg.shape[1]
        like = dict(dtype=sampler.dtype, device=sampler.device)
        ints = dict(dtype=torch.long, device=sampler.device)
        # Normal tensors even when called under torch.inference_mode(): a later call outside it updates them in place.
        with torch.inference_mode(False):
            # Inputs and output.
            self.codes = torch.zeros(b, height, width, **ints)
            self.u = torch.zeros(b, n_pos, dtype=torch.float64, device=sampler.device)  # the random streams
            self.labels = torch.zeros(b, **ints) if labels else None
            self.cond = torch.zeros(b, *cfg.cond_shape, **ints) if cond and cfg.cond_num_codes else None
            # Caches: the last p+1 input rows of each vertical conv (channel-first, as conv2d wants them); each layer's
            # horizontal pre-activations of the current row (the row term plus the inputs added so far); per attention
            # block, queries, keys and values of every position ("sdpa") or keys and values per head ("bmm"); the
            # conditioning features.
            self.v_rows = [torch.zeros(b, c, p + 1, width, **like) for _ in sampler.layers]  # (B, C, p+1, W)
            self.pre = [torch.zeros(b, width, 2 * c, **like) for _ in sampler.layers]  # (B, W, 2C)
            self.attention = sampler.attention_for(b)
            heads = max(cfg.attn_heads, 1)
            shape = (b, n_pos, 3 * c) if self.attention == "sdpa" else (2, b, heads, n_pos, c // heads)
            self.attn_cache = {i: torch.zeros(shape, **like) for i in sampler.attn}
            cond_map = self.cond is not None and sampler.model.cond_net is not None
            self.cond_map = torch.zeros(b, cfg.cond_channels, height, width, **like) if cond_map else None
            # Per-batch conditioning and per-position scratch.
            self.class_bias = [
                torch.zeros(b, 2 * c, **like) if lay.class_w is not None and labels else None for lay in sampler.layers
            ]  # (B, 2C) per layer
            self.zero_row = torch.zeros(b, c, width, **like)  # the vertical stack's input above row 0
            self.ss = torch.zeros(b, 2 * c, **like)  # (B, 2C): the residual stream, then the skip sum, of one position
            self.stream, self.skip = self.ss[:, :c], self.ss[:, c:]  # (B, C) views
            # Inputs of products whose bias rides on a last column of ones (see sampler_weights.bias_row).
            self.gated = torch.ones(b, c + 1, **like)  # a gated block's output
            self.ff_in = torch.ones(b, 2 * c + 1, **like)  # the attention feed-forward's hidden layer
            self.head_in = torch.ones(b, c + 1, **like)  # relu(skip + stream)
            self.head_mid = torch.ones(b, c + 1, **like)  # the head's hidden layer
        caches = [*self.v_rows, *self.pre, *self.attn_cache.values(), *([self.cond_map] if cond_map else [])]
        self.cache_bytes = sum(t.numel() * t.element_size() for t in caches)

    def load(self, labels: Tensor | None, cond: Tensor | None, u: Tensor | None = None) -> None:
        """Copy a call's inputs into the buffers (in place: captured graphs read these addresses)."""
        for buf, x in ((self.labels, labels), (self.cond, cond), (self.u, u)):
            if buf is not None and x is not None:
                buf.copy_(x)


class _Captured(NamedTuple):
    """The CUDA graphs of one batch configuration and the buffers they were captured on."""

    buffers: _Buffers
    graphs: GraphSequence


class CachedSampler:
    """Incremental sampler for one prior; build it once per model and reuse it for every batch.

    The weights are read when the sampler is built: build a new one after changing the model's parameters (or moving
    the model).

    Args:
        model: the prior.
        cuda_graphs: replay each row of the map from CUDA graphs (:mod:`steps.nn.cuda_graph`); None: when the model is
            on a CUDA device. The first :meth:`sample` call of a configuration (batch size, temperature, top_k, top_p,
            whether labels / cond are given, float32 matmul precision) captures the graphs, at about the cost of one
            eager call; later calls with that configuration replay them. Pays off from the second call with the same
            configuration, e.g. a sampler that draws shard after shard of the same size. Completions (``keep > 0``)
            always run eagerly.
        max_graphs: how many configurations keep their graphs and buffers (the least recently used are dropped).
            Two fit a sampling step (full shards and a last, smaller one); each holds the caches of a whole batch,
            e.g. ~3 GiB for 512 samples of the default 32x32 top prior.
        attention: how the attention blocks attend (module docstring): "sdpa", "bmm", or "auto": "bmm" on CUDA, and
            on a CPU from ``BMM_FROM_BATCH`` samples on. The codes do not depend on it beyond float rounding.

    Attributes:
        cache_bytes: bytes of all cache tensors of the last batch.
        captures: number of configurations captured so far (a replay does not count).
        capture_seconds: wall seconds of the last capture, warm-up included.
    """

    def __init__(
        self, model: PixelCNNPrior, *, cuda_graphs: bool | None = None, max_graphs: int = 2, attention: str = "auto"
    ) -> None:
        self.model, cfg = model, model.config
        self.height, self.width = cfg.shape
        self.pad = cfg.kernel_size // 2
        with torch.no_grad():
            self.layers = [LayerWeights(block) for block in model.blocks]
            self.attn = {int(i): AttentionWeights(a, *cfg.shape) for i, a in model.attn.items()}
            embed = model.embed.weight.detach()  # (K, C)
            # A code's embedding next to zeros: one lookup starts a position's residual stream and clears its skip sum.
            self.embed, self.embed_zeros = embed, torch.cat([embed, torch.zeros_like(embed)], dim=1)  # (K, 2C)
            # The head (ReLU, 1x1 conv, ReLU, 1x1 conv) as linear maps of one position's features, biases as rows.
            self.head = [bias_row(conv.weight[:, :, 0, 0].t(), conv.bias) for conv in (model.head[1], model.head[3])]
        self.device, self.dtype = embed.device, embed.dtype
        if cuda_graphs is None:
            cuda_graphs = self.device.type == "cuda"
        elif cuda_graphs and self.device.type != "cuda":
            raise ValueError(f"cuda_graphs=True needs the model on a CUDA device; it is on {self.device}")
        if isinstance(max_graphs, bool) or not isinstance(max_graphs, int) or max_graphs < 1:
            raise ValueError(f"max_graphs must be an int >= 1, got {max_graphs!r}")
        if attention not in ATTENTION:
            raise ValueError(f"attention must be one of {ATTENTION}, got {attention!r}")
        self.cuda_graphs, self.max_graphs, self.attention = cuda_graphs, max_graphs, attention
        self._graphs: OrderedDict[tuple, _Captured] = OrderedDict()
        self.cache_bytes = 0
        self.captures = 0
        self.capture_seconds = 0.0

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
        """Draw ``n`` code maps in raster order from the caches, or complete ``given`` after its first ``keep`` codes.

        Args:
            n: number of samples.
            labels: (n,) class label per sample, for a class-conditional prior.
            cond: (n, *cond_shape) conditioning codes (the top codes), for a spatially conditioned prior.
            generator: the random streams (:func:`steps.nn.draw.uniforms`): one generator for the batch, or one
                generator or int seed per sample, so that a sample's codes do not depend on its batch; None uses
                torch's global generator. The same streams give the same codes as ``sample_naive``.
            controls: temperature, top-k, top-p and classifier-free guidance
                (:func:`steps.nn.prior.guided_logits`) for priors trained with ``class_dropout``: a guided batch
                holds each sample twice, with its label and with the "no class" label, and both copies take the code
                drawn from the mixed logits.
            given: (n, H, W) integer codes whose first ``keep`` positions are kept (image completion); checked
                whenever passed, ignored with ``keep=0`` (:func:`steps.nn.prior.check_completion`).
            keep: number of leading raster positions (i = r * W + c < keep) taken from ``given`` instead of drawn,
                e.g. ``rows * W`` to keep the first rows and sample the rest; every position after them is drawn
                with the same uniforms as without forcing, and ``keep=0`` is plain sampling. The prior's causality
                makes the completion exact: a map drawn with seeds S and completed with the same seeds comes back
                unchanged. Completions run eagerly (no CUDA graph replay).

        Returns:
            (n, H, W) int64 codes.

        Raises:
            ValueError: bad ``n``, ``keep`` or ``given``, controls or conditioning inputs.
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be an int >= 1, got {n!r}")
        check_completion(self.model.config, n, given, keep)
        u = uniforms(n, self.height * self.width, generator, self.device)  # (n, H*W)
        self._check_inputs(n, labels, cond)
        labels, cond = guided_inputs(self.model.config, labels, cond, controls)
        streams = 2 if controls.guided else 1
        if controls.guided:
            u = torch.cat([u, u])
        if self.cuda_graphs and keep == 0:
            codes = self._sample_graphs(streams * n, labels, cond, u, controls)
            if codes is not None:
                return codes[:n]
        buf = _Buffers(self, streams * n, labels is not None, cond is not None)
        buf.load(labels, cond, u)
        pick = forcing(self._drawer(buf, controls), given, keep, streams=streams, device=self.device)
        self._run(buf, functools.partial(self._rows, buf, pick))
        return buf.codes[:n].clone() if controls.guided else buf.codes

    def attention_for(self, batch: int) -> str:
        """How a batch of ``batch`` samples attends: "sdpa" (one fused kernel) or "bmm" (batched products)."""
        if self.attention != "auto":
            return self.attention
        return "bmm" if self.device.type == "cuda" or batch >= BMM_FROM_BATCH else "sdpa"

    def clear_graphs(self) -> None:
        """Drop every captured configuration with its buffers (the memory returns to torch's caching allocator)."""
        self._graphs.clear()

    @torch.no_grad()
    def logits(self, codes: Tensor, labels: Tensor | None = None, cond: Tensor | None = None) -> Tensor:
        """Teacher-forced logits (B, K, H, W) of ``codes``, position by position from the caches (always eager).

        Equals ``model(codes, labels, cond)`` up to float rounding; used to test the caches.
        """
        self.model.check_inputs(codes, labels, cond)
        b = codes.shape[0]
        out = torch.empty(b, self.model.config.num_codes, self.height, self.width, dtype=self.dtype, device=self.device)
        buf = _Buffers(self, b, labels is not None, cond is not None)
        buf.load(labels, cond)
        teacher = codes.to(self.device)

        def pick(i: int, logits: Tensor) -> Tensor:
            r, c = divmod(i, self.width)
            out[:, :, r, c] = logits
            return teacher[:, r, c]

        self._run(buf, functools.partial(self._rows, buf, pick))
        return out

    def _check_inputs(self, n: int, labels: Tensor | None, cond: Tensor | None) -> None:
        """The prior's own input checks, for a batch of ``n`` (they synchronise: never inside a captured region)."""
        codes = torch.zeros((), dtype=torch.long, device=self.device).expand(n, self.height, self.width)
        self.model.check_inputs(codes, labels, cond)

    def _drawer(self, buf: _Buffers, controls: SamplingControls) -> Pick:
        """Draws from the buffer's uniforms (a view: a replay reads the uniforms loaded before it)."""
        # A guided batch holds the conditional stream, then the same samples without their class: one set of draws.
        return drawer(buf.u[: buf.u.shape[0] // 2] if controls.guided else buf.u, controls)

    def _sample_graphs(
        self, n: int, labels: Tensor | None, cond: Tensor | None, u: Tensor, controls: SamplingControls
    ) -> Tensor | None:
        """Codes (n, H, W) replayed from the configuration's graphs (captured first if new); None if capture failed."""
        key = (n, controls, labels is not None, cond is not None, *_precision())
        entry = self._graphs.pop(key, None)
        if entry is None:
            while len(self._graphs) >= self.max_graphs:  # the least recently used goes before new buffers come
                self._graphs.popitem(last=False)
            try:
                entry = self._capture(n, labels is not None, cond is not None, controls)
            except RuntimeError as e:  # e.g. an operation this torch build cannot capture: the codes are the same
                warnings.warn(f"CUDA graph capture failed, sampling eagerly from now on: {e}", RuntimeWarning, 3)
                self.cuda_graphs = False
                self.clear_graphs()
                return None
        self._graphs[key] = entry  # the most recently used last
        entry.buffers.load(labels, cond, u)
        self._run(entry.buffers, entry.graphs.replay)
        return entry.buffers.codes.clone()  # the buffer is overwritten by the next replay

    def _capture(self, n: int, labels: bool, cond: bool, controls: SamplingControls) -> _Captured:
        """Buffers for one configuration and its rows captured as CUDA graphs (after an eager warm-up of two rows)."""
        buf = _Buffers(self, n, labels, cond)
        pick = self._drawer(buf, controls)
        steps = [functools.partial(self._row, buf, r, pick) for r in range(self.height)]

        def warm_up() -> None:  # row 0 (no row above, zero inputs) and a later row: every kind of kernel runs once
            self._run(buf, lambda: [step() for step in steps[:2]])

        graphs = GraphSequence(steps, warm_up, self.device)
        self.captures += 1
        self.capture_seconds = graphs.warm_up_seconds + graphs.capture_seconds
        return _Captured(buf, graphs)

    def _run(self, buf: _Buffers, rows: Callable[[], object]) -> None:
        """Per-call preparation of ``buf``, then ``rows()`` (the eager loop or the graph replay) in eval mode."""
        model = self.model
        was_training = model.training
        model.eval()  # no dropout; the sampler reads the weights directly, only the ConditionNet is called
        try:
            self._prepare(buf)
            rows()
        finally:
            model.train(was_training)
        self.cache_bytes = buf.cache_bytes

    def _prepare(self, buf: _Buffers) -> None:
        """Reset the caches and compute the batch's conditioning (eager: a few kernels per call)."""
        for rows in buf.v_rows:
            rows.zero_()  # the rows above row 0 are the shift's zeros
        if buf.attention == "sdpa":
            for i, qkv in buf.attn_cache.items():
                qkv.copy_(self.attn[i].qkv_b.expand_as(qkv))  # each position's projection is added in place
        if buf.cond_map is not None:
            buf.cond_map.copy_(self.model.cond_net(buf.cond))  # (B, cc, H, W), once
        for lay, bias in zip(self.layers, buf.class_bias, strict=True):
            if bias is not None:
                torch.index_select(lay.class_w, 0, buf.labels, out=bias)  # (B, 2C), once

    def _rows(self, buf: _Buffers, pick: Pick) -> None:
        for r in range(self.height):
            self._row(buf, r, pick)

    def _row(self, buf: _Buffers, r: int, pick: Pick) -> None:
        """Row ``r``: the vertical stack once, then every position; the unit a CUDA graph captures."""
        self._row_start(buf, r)
        for c in range(self.width):
            self._position(buf, r, c, pick)

    def _row_start(self, buf: _Buffers, r: int) -> None:
        """The whole vertical stack for row r, from code rows < r; fills each layer's horizontal row buffer."""
        p, n_layers = self.pad, len(self.layers)
        v_in = F.embedding(buf.codes[:, r - 1], self.embed).transpose(1, 2) if r else buf.zero_row  # (B, C, W)
        for li, lay in enumerate(self.layers):
            rows = buf.v_rows[li]
            rows.copy_(torch.cat([rows[:, :, 1:], v_in[:, :, None]], dim=2))  # (B, C, p+1, W): drop the oldest row
            v_pre = F.conv2d(rows, lay.v_w, lay.v_b, padding=(0, p))[:, :, 0]  # (B, 2C, W)
            bias = buf.class_bias[li][:, :, None] if buf.class_bias[li] is not None else None  # (B, 2C, 1)
            if lay.cond_w is not None and buf.cond_map is not None:
                spatial = F.conv1d(buf.cond_map[:, :, r], lay.cond_w, lay.cond_b)  # (B, 2C, W)
                bias = spatial if bias is None else spatial.add_(bias)
            if li + 1 < n_layers:  # the last layer's vertical output feeds nothing
                a, g = (v_pre if bias is None else v_pre + bias).chunk(2, dim=1)
                v_in = torch.tanh(a) * torch.sigmoid(g)  # (B, C, W)
            row_term = F.conv1d(v_pre, lay.vh_w, lay.vh_b)  # (B, 2C, W)
            pre = buf.pre[li].transpose(1, 2)  # (B, 2C, W) view of the (B, W, 2C) row buffer
            if bias is None:
                pre.copy_(row_term)
            else:
                torch.add(row_term, bias, out=pre)

    def _position(self, buf: _Buffers, r: int, c: int, pick: Pick) -> None:
        """Position (r, c): every layer's horizontal step (and attention), the head, the draw."""
        i, p, b, width = r * self.width + c, self.pad, buf.ss.shape[0], self.width
        # Layer 0's input at (r, c) is the code at (r, c - 1) (the horizontal shift; zero in column 0), and the skip
        # sum starts at zero: both halves of ss in one lookup.
        if c:
            torch.index_select(self.embed_zeros, 0, buf.codes[:, r, c - 1], out=buf.ss)  # (B, 2C)
        else:
            buf.ss.zero_()
        for li, lay in enumerate(self.layers):
            pre = buf.pre[li]  # (B, W, 2C)
            if li or c:  # layer 0's input in column 0 is zero: nothing to add
                n = min(p + 1, width - c)  # columns c..c+n-1 read this input (the row ends at W - 1)
                pre[:, c : c + n].view(b, -1).addmm_(buf.stream, lay.scatter_w[:, : n * pre.shape[2]])
            now = pre[:, c]  # (B, 2C): column c's pre-activation, complete
            c_ = now.shape[1] // 2
            now[:, :c_].tanh_()  # the row buffer's column c is not read again in this row
            torch.ops.aten.glu.out(now, 1, out=buf.gated[:, :-1])  # tanh(a) * sigmoid(b): (B, C)
            buf.ss.addmm_(buf.gated, lay.rs_w)  # stream += h_res(gated), skip += h_skip(gated)
            if li in self.attn:
                self.attn[li].step(buf.stream, buf.attn_cache[li], buf.ff_in, buf.attention, i)
        (w1, w2), head_in, head_mid = self.head, buf.head_in, buf.head_mid
        torch.add(buf.skip, buf.stream, out=head_in[:, :-1])  # the final stream joins the skips
        head_in.relu_()  # relu(1) = 1 keeps the bias column
        torch.mm(head_in, w1, out=head_mid[:, :-1])
        head_mid.relu_()
        logits = torch.mm(head_mid, w2)  # (B, K)
        buf.codes[:, r, c] = pick(i, logits)


def _precision() -> tuple[str, bool]:
    """Float32 precision settings a captured graph bakes in (TF32 on or off for matmuls and convolutions)."""
    return torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32


@torch.no_grad()
def sample(
    model: PixelCNNPrior,
    n: int,
    labels: Tensor | None = None,
    cond: Tensor | None = None,
    *,
    generator: RandomSource = None,
    controls: SamplingControls = DEFAULT,
    given: Tensor | None = None,
    keep: int = 0,
) -> Tensor:
    """Draw ``n`` code maps (n, H, W), or complete ``given`` after its first ``keep`` codes, with a fresh
    :class:`CachedSampler`; see :meth:`CachedSampler.sample`.

    Eager on every device: a fresh sampler could never replay CUDA graphs, only pay for capturing them. Keep a
    :class:`CachedSampler` to sample repeatedly.
    """
    return CachedSampler(model, cuda_graphs=False).sample(
        n, labels, cond, generator=generator, controls=controls, given=given, keep=keep
    )
