"""Unit tests of the cached sampler (steps/nn/sampler.py) and the shared drawing function (steps/nn/draw.py).

Exactness: for every prior variant the cached, teacher-forced logits equal the full forward pass at every position,
and with the same seeds the cached and the naive sampler return identical codes. The sampling comparisons use
float64 models, so that no float32 rounding tie can make a draw flip between the two samplers.
"""

from __future__ import annotations

import pickle

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import steps.nn.sampler as sampler_module
from steps.nn.draw import DEFAULT, ControlError, SamplingControls, draw_codes, filtered_probs, uniforms
from steps.nn.pixelcnn import PixelCNNConfig, PixelCNNPrior
from steps.nn.prior import sample_naive
from steps.nn.sampler import CachedSampler, sample

BASE = dict(num_codes=11, channels=16, layers=3)
VARIANTS = {
    "plain": {},
    "class": dict(num_classes=3),
    "spatial": dict(cond_num_codes=7, cond_channels=8, cond_res_blocks=1),
    "attention": dict(attn_heads=2, attn_every=1),
    "all": dict(attn_heads=4, attn_every=2, num_classes=3, cond_num_codes=7, cond_channels=8),
}
# Non-square maps, one narrower than the 5-wide kernel; spatial conditioning upsamples by (1, 2) or (2, 1).
SHAPES = {(5, 4): (5, 2), (3, 7): (3, 7), (4, 2): (2, 2)}


pytestmark = pytest.mark.usefixtures("one_thread")


def make_model(variant: str, shape=(5, 4), kernel_size=3, seed=0, dtype=torch.float32, **extra) -> PixelCNNPrior:
    overrides = dict(VARIANTS[variant], **extra)
    if "cond_num_codes" in overrides:
        overrides["cond_shape"] = SHAPES[shape]
    torch.manual_seed(seed)
    model = PixelCNNPrior(PixelCNNConfig(**BASE, shape=shape, kernel_size=kernel_size, **overrides))
    torch.nn.init.normal_(model.head[-1].weight)  # far from uniform: every logit difference is visible
    return model.to(dtype).eval()


def conditioning(model: PixelCNNPrior, batch: int, seed: int = 1) -> dict:
    cfg, g = model.config, torch.Generator().manual_seed(seed)
    labels = torch.randint(0, cfg.num_classes, (batch,), generator=g) if cfg.num_classes else None
    cond = torch.randint(0, cfg.cond_num_codes, (batch, *cfg.cond_shape), generator=g) if cfg.cond_num_codes else None
    return dict(labels=labels, cond=cond)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("kernel_size", [3, 5])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_cached_logits_equal_the_forward_pass(variant: str, kernel_size: int, shape: tuple[int, int]) -> None:
    model = make_model(variant, shape, kernel_size)
    ctx = conditioning(model, batch=3)
    codes = torch.randint(0, 11, (3, *shape), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(codes, **ctx)  # (B, K, H, W)
    cached = CachedSampler(model).logits(codes, **ctx)
    assert cached.shape == full.shape
    assert (cached - full).abs().max().item() < 1e-4


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize(("kernel_size", "shape"), [(3, (5, 4)), (5, (3, 7))])
@pytest.mark.parametrize("controls", [{}, dict(temperature=0.5), dict(temperature=2.0, top_k=4, top_p=0.8)])
def test_cached_and_naive_draw_the_same_codes(variant: str, kernel_size: int, shape, controls: dict) -> None:
    model = make_model(variant, shape, kernel_size, dtype=torch.float64)
    ctx = conditioning(model, batch=4)
    seeds = [11, 12, 13, 14]
    naive = sample_naive(model, 4, **ctx, generator=seeds, controls=SamplingControls(**controls))
    cached = sample(model, 4, **ctx, generator=seeds, controls=SamplingControls(**controls))
    assert torch.equal(cached, naive)
    # The draws depend on the seeds: otherwise the comparison above could not fail.
    assert not torch.equal(
        sample(model, 4, **ctx, generator=[21, 22, 23, 24], controls=SamplingControls(**controls)), cached
    )


def test_float32_teacher_forced_logits_on_sampled_codes() -> None:
    # The sampler's own logits along its own draws are the forward pass's logits of the finished maps.
    model = make_model("all", (5, 4), 5)
    ctx = conditioning(model, batch=3)
    codes = sample(model, 3, **ctx, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(codes, **ctx)
    assert (CachedSampler(model).logits(codes, **ctx) - full).abs().max().item() < 1e-4


@pytest.mark.parametrize("variant", ["plain", "all"])
def test_top_k_1_is_greedy(variant: str) -> None:
    model = make_model(variant, (4, 2), 3)
    ctx = conditioning(model, batch=3)
    codes = sample(model, 3, **ctx, generator=[1, 2, 3], controls=SamplingControls(top_k=1, temperature=3.0))
    with torch.no_grad():
        assert torch.equal(codes, model(codes, **ctx).argmax(dim=1))  # every code is the argmax given its prefix
    assert torch.equal(codes, sample(model, 3, **ctx, generator=[4, 5, 6], controls=SamplingControls(top_k=1)))
    assert torch.equal(
        codes, sample(model, 3, **ctx, generator=[4, 5, 6], controls=SamplingControls(top_p=1e-9))
    )  # nucleus of one code


def test_top_k_and_top_p_restrict_the_support() -> None:
    model = make_model("attention", (5, 4), 3, dtype=torch.float64)
    seeds = list(range(16))
    with torch.no_grad():
        codes = sample(model, 16, generator=seeds, controls=SamplingControls(top_k=3))
        logits = model(codes)  # (B, K, H, W)
        rank = (logits > logits.gather(1, codes[:, None])).sum(dim=1)  # codes more likely than the drawn one
        assert rank.max() <= 2 and rank.max() > 0
        codes = sample(model, 16, generator=seeds, controls=SamplingControls(top_p=0.5))
        probs = torch.softmax(model(codes), dim=1)
        before = (probs * (probs > probs.gather(1, codes[:, None]))).sum(dim=1)  # mass of more likely codes
        assert before.max() < 0.5 and (before > 0).any()


def test_seed_per_sample_does_not_depend_on_the_batch() -> None:
    model = make_model("all", (5, 4), 3, dtype=torch.float64)
    ctx = conditioning(model, batch=3)
    batch = sample(model, 3, **ctx, generator=[7, 8, 9])
    alone = sample(model, 1, labels=ctx["labels"][1:2], cond=ctx["cond"][1:2], generator=[8])
    assert torch.equal(batch[1:2], alone)
    gens = [torch.Generator().manual_seed(s) for s in (7, 8, 9)]
    assert torch.equal(sample(model, 3, **ctx, generator=gens), batch)  # an int seed is a fresh CPU generator
    # Generators advance: passing them again (the next level) continues their streams.
    assert not torch.equal(sample(model, 3, **ctx, generator=gens), batch)


def test_sampler_restores_the_mode_and_ignores_dropout() -> None:
    model = make_model("all", (5, 4), 3, dropout=0.5).train()
    ctx = conditioning(model, batch=2)
    codes = torch.randint(0, 11, (2, 5, 4))
    sampler = CachedSampler(model)
    cached = sampler.logits(codes, **ctx)
    assert model.training
    with torch.no_grad():
        assert (cached - model.eval()(codes, **ctx)).abs().max().item() < 1e-4


def test_cache_bytes_count_every_cache() -> None:
    model = make_model("all", (5, 4), 5)  # channels 16, 3 layers, attention after layer 1 only, 4 heads
    sampler = CachedSampler(model)
    sampler.sample(2, **conditioning(model, batch=2))
    c, p, (h, w), f = 16, 2, (5, 4), 4  # f: bytes per float32
    # Per layer: the last p+1 vertical input rows and the row of horizontal pre-activations (B, W, 2C); per attention
    # block: queries, keys and values of every position (B, H*W, 3C); the conditioning features.
    vertical, row_terms = 3 * 2 * c * (p + 1) * w, 3 * 2 * w * 2 * c
    queries_keys_values, cond_map = 2 * h * w * 3 * c, 2 * 8 * h * w
    assert sampler.cache_bytes == f * (vertical + row_terms + queries_keys_values + cond_map)


@pytest.mark.parametrize("variant", ["attention", "all"])
@pytest.mark.parametrize("attention", ["sdpa", "bmm"])
def test_both_ways_to_attend(variant: str, attention: str) -> None:
    model = make_model(variant, (5, 4), 5)
    ctx = conditioning(model, batch=3)
    codes = torch.randint(0, 11, (3, 5, 4), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(codes, **ctx)
    assert (CachedSampler(model, attention=attention).logits(codes, **ctx) - full).abs().max().item() < 1e-4
    model = make_model(variant, (5, 4), 5, dtype=torch.float64)
    controls = dict(generator=[1, 2, 3], controls=SamplingControls(top_p=0.9))
    cached = CachedSampler(model, attention=attention).sample(3, **ctx, **controls)
    assert torch.equal(cached, sample_naive(model, 3, **ctx, **controls))


def test_attention_choice_and_its_cache() -> None:
    model = make_model("all", (5, 4), 5)  # channels 16, 3 layers, attention after layer 1 only, 4 heads
    auto = CachedSampler(model)
    assert auto.attention_for(1) == "sdpa" and auto.attention_for(sampler_module.BMM_FROM_BATCH) == "bmm"
    assert CachedSampler(model, attention="sdpa").attention_for(10_000) == "sdpa"
    with pytest.raises(ValueError, match="attention must be one of"):
        CachedSampler(model, attention="flash")
    sampler = CachedSampler(model, attention="bmm")
    sampler.sample(2, **conditioning(model, batch=2))
    c, p, (h, w), f = 16, 2, (5, 4), 4
    vertical, row_terms = 3 * 2 * c * (p + 1) * w, 3 * 2 * w * 2 * c
    keys_values, cond_map = 2 * 2 * h * w * c, 2 * 8 * h * w  # keys and values per head, no queries
    assert sampler.cache_bytes == f * (vertical + row_terms + keys_values + cond_map)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (dict(temperature=0.0), "temperature must be > 0, got 0.0"),
        (dict(temperature=float("nan")), "temperature must be a number, got nan"),
        (dict(top_k=-1), "top_k must be an int >= 0 (0: off), got -1"),
        (dict(top_k=1.5), "top_k must be an integer, got 1.5"),
        (dict(top_k=True), "top_k must be an integer, got True"),
        (dict(top_p=0.0), "top_p must be in (0, 1] (1: off), got 0.0"),
        (dict(top_p=1.5), "top_p must be in (0, 1] (1: off), got 1.5"),
        (dict(guidance_scale=-1.0), "guidance_scale must be a finite number >= 0 (1: off), got -1.0"),
        (dict(guidance_scale=float("inf")), "guidance_scale must be a finite number >= 0 (1: off), got inf"),
        (dict(temperature="0.9"), "temperature must be a number, got '0.9'"),
    ],
)
def test_sampling_controls_are_checked_once_where_they_are_made(bad: dict, message: str) -> None:
    """One check for every caller (sample step, Generator, MLflow model, Ray Serve), naming the control as users
    spell it; a ControlError is a FieldError, so a config can name its own field instead."""
    with pytest.raises(ControlError) as caught:
        SamplingControls(**bad)
    assert str(caught.value) == message and caught.value.field == next(iter(bad))
    with pytest.raises(ControlError, match=next(iter(bad))):
        SamplingControls.parse(bad)


def test_sampling_controls_parse_loose_values_and_refuse_unknown_names() -> None:
    assert SamplingControls.parse({"top_k": 3.0, "temperature": 1}) == SamplingControls(top_k=3, temperature=1.0)
    assert SamplingControls.parse({}) == SamplingControls() == DEFAULT
    with pytest.raises(ControlError, match="temprature is not a sampling control; they are temperature, top_k"):
        SamplingControls.parse({"temprature": 0.5})
    assert SamplingControls(guidance_scale=2.0).at_level(False) == SamplingControls()
    assert SamplingControls(guidance_scale=2.0).at_level(True).guidance_scale == 2.0
    with pytest.raises(ValueError, match="guidance_scale=2.0 needs class-conditional priors .* these priors have none"):
        SamplingControls(guidance_scale=2.0).check_guidance(False)
    SamplingControls(guidance_scale=2.0).check_guidance(True)
    SamplingControls().check_guidance(False)  # no guidance asked: nothing to check
    assert pickle.loads(pickle.dumps(ControlError("top_k", "must be >= 0"))).field == "top_k"  # crosses Ray


def test_bad_inputs_are_refused() -> None:
    model = make_model("class", (4, 2), 3)
    sampler = CachedSampler(model)
    with pytest.raises(ValueError, match="labels are required"):
        sampler.sample(2)
    with pytest.raises(ValueError, match="labels must have shape"):
        sampler.sample(2, labels=torch.tensor([0]))
    with pytest.raises(ValueError, match="one generator or seed per sample"):
        sampler.sample(2, labels=torch.tensor([0, 1]), generator=[1, 2, 3])
    with pytest.raises(ValueError, match="n must be"):
        sampler.sample(0)


# ------------------------------------------------------------------------------------------------ CUDA graphs
# What CPU can prove about the graph path: the captured steps never synchronise with the host, rerunning them on the
# same buffers (what a replay does) gives the codes fresh buffers give, and configurations are keyed and evicted
# correctly. A stand-in for GraphSequence replays the steps eagerly; tests/gpu/test_cuda.py runs the real graphs.
class NoHostSync(TorchDispatchMode):
    """Fails on any operation that needs a tensor value on the host (.item(), int(t), bool(t), nonzero): on a GPU
    those synchronise, which a CUDA graph capture refuses."""

    SYNC = (torch.ops.aten._local_scalar_dense, torch.ops.aten.is_nonzero, torch.ops.aten.nonzero)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in self.SYNC:
            raise AssertionError(f"{func} synchronises with the host inside a captured step")
        return func(*args, **(kwargs or {}))


class EagerGraphs:
    """GraphSequence's interface on CPU: warm-up now, 'replay' calls the steps, none of which may synchronise."""

    def __init__(self, steps, warm_up, device) -> None:
        warm_up()
        self.steps, self.warm_up_seconds, self.capture_seconds = steps, 0.0, 0.0

    def replay(self) -> None:
        with NoHostSync():
            for step in self.steps:
                step()


@pytest.fixture
def graph_sampler(monkeypatch):
    """A CachedSampler on the graph path, with the graphs replaced by EagerGraphs."""
    monkeypatch.setattr(sampler_module, "GraphSequence", EagerGraphs)

    def make(model: PixelCNNPrior, **kwargs) -> CachedSampler:
        sampler = CachedSampler(model, **kwargs)
        sampler.cuda_graphs = True  # the constructor only allows it on a CUDA device
        return sampler

    return make


def test_cuda_graphs_need_a_cuda_device() -> None:
    model = make_model("plain", (4, 2), 3)
    assert not CachedSampler(model).cuda_graphs  # None: graphs only on CUDA
    assert not CachedSampler(model, cuda_graphs=False).cuda_graphs
    with pytest.raises(ValueError, match="cuda_graphs=True needs the model on a CUDA device"):
        CachedSampler(model, cuda_graphs=True)
    with pytest.raises(ValueError, match="max_graphs"):
        CachedSampler(model, max_graphs=0)


@pytest.mark.parametrize(("variant", "attention"), [("all", "sdpa"), ("all", "bmm"), ("spatial", "auto")])
def test_replays_equal_fresh_eager_calls(graph_sampler, variant: str, attention: str) -> None:
    model = make_model(variant, (5, 4), 5, dtype=torch.float64)
    ctx = conditioning(model, batch=3)
    sampler = graph_sampler(model, attention=attention)
    first = sampler.sample(3, **ctx, generator=[1, 2, 3], controls=SamplingControls(top_k=5))
    assert torch.equal(first, sample(model, 3, **ctx, generator=[1, 2, 3], controls=SamplingControls(top_k=5)))
    assert torch.equal(first, sample_naive(model, 3, **ctx, generator=[1, 2, 3], controls=SamplingControls(top_k=5)))
    # The same configuration replays on the same buffers (no new capture); every cache is reset in between.
    ctx2 = conditioning(model, batch=3, seed=7)
    second = sampler.sample(3, **ctx2, generator=[4, 5, 6], controls=SamplingControls(top_k=5))
    assert sampler.captures == 1
    assert torch.equal(second, sample(model, 3, **ctx2, generator=[4, 5, 6], controls=SamplingControls(top_k=5)))
    assert not torch.equal(first, second)
    assert torch.equal(
        first, sample(model, 3, **ctx, generator=[1, 2, 3], controls=SamplingControls(top_k=5))
    )  # not overwritten by the replay
    eager = CachedSampler(model, attention=attention)
    eager.sample(3, **ctx, generator=[1, 2, 3])
    assert sampler.cache_bytes == eager.cache_bytes


def test_configurations_are_keyed_and_the_least_recent_dropped(graph_sampler) -> None:
    model = make_model("class", (4, 2), 3, dtype=torch.float64)
    sampler = graph_sampler(model, max_graphs=2)
    labels = torch.tensor([0, 1])

    def draw(n: int = 2, **controls) -> torch.Tensor:
        codes = sampler.sample(n, labels[:n], generator=list(range(n)), controls=SamplingControls(**controls))
        assert torch.equal(
            codes, sample(model, n, labels[:n], generator=list(range(n)), controls=SamplingControls(**controls))
        )
        return codes

    draw()
    draw(temperature=0.5)  # a new temperature is new work: captured anew
    draw(top_p=0.9)  # a third configuration: the first one is dropped
    assert sampler.captures == 3 and len(sampler._graphs) == 2
    draw(top_p=0.9)
    draw(temperature=0.5)
    assert sampler.captures == 3  # both still held
    draw()
    draw(1)  # a new batch size
    assert sampler.captures == 5


def test_a_failed_capture_falls_back_to_eager(monkeypatch) -> None:
    def fail(*args) -> None:
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(sampler_module, "GraphSequence", fail)
    model = make_model("class", (4, 2), 3, dtype=torch.float64)
    sampler = CachedSampler(model)
    sampler.cuda_graphs = True
    labels = torch.tensor([0, 2])
    with pytest.warns(RuntimeWarning, match="capture failed, sampling eagerly"):
        codes = sampler.sample(2, labels, generator=[1, 2])
    assert torch.equal(codes, sample(model, 2, labels, generator=[1, 2]))
    assert not sampler.cuda_graphs and sampler.captures == 0


def test_the_loop_never_synchronises() -> None:
    # Eager too: every step of the raster loop runs without reading a tensor value on the host.
    model = make_model("all", (5, 4), 5)
    ctx = conditioning(model, batch=2)
    sampler = CachedSampler(model)
    row = sampler._row

    def guarded(*args) -> None:
        with NoHostSync():
            row(*args)

    sampler._row = guarded
    sampler.sample(2, **ctx, generator=[1, 2], controls=SamplingControls(top_k=3, top_p=0.7))


@pytest.mark.parametrize(("attention", "per_block"), [("sdpa", 9), ("bmm", 13)])
def test_operations_per_position(attention: str, per_block: int) -> None:
    """Kernel budget: with graphs each operation is a replayed kernel (~1-3 us); this guards against regressions.

    The default 32x32 top prior (10 gated layers, attention after every 2nd) costs, per position: 1 lookup; 4 per
    layer (input product, tanh, glu, residual / skip product); per attention block 9 with the fused kernel (norm,
    q/k/v product, attention, output product, its bias, norm, feed-forward product, gelu, product) or 13 with
    batched products (+ caching keys / values, scaling queries, a second product, a softmax); 5 for the head; the draw.
    """
    cfg = PixelCNNConfig(
        num_codes=512, shape=(2, 32), channels=128, layers=10, kernel_size=5, attn_heads=4, attn_every=2
    )
    torch.manual_seed(0)
    sampler = CachedSampler(PixelCNNPrior(cfg).eval(), attention=attention)
    counts: list[int] = []
    position = sampler._position

    def counted(*args) -> None:
        with CountOps() as ops:
            position(*args)
        counts.append(ops.count)

    sampler._position = counted
    sampler.sample(1, generator=[0])
    draw = 7  # to float64, / temperature, softmax, cumsum, * u, searchsorted, clamp
    expected = 1 + 4 * 10 + per_block * 5 + 5 + draw + 1  # ... + writing the code
    assert max(counts[1:]) == expected, (max(counts), expected)  # column 0 skips layer 0's input product


class CountOps(TorchDispatchMode):
    """Counts the operations that launch work (views and allocations launch none)."""

    def __enter__(self):
        self.count = 0
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view and func.overloadpacket not in (torch.ops.aten.empty, torch.ops.aten.empty_strided):
            self.count += 1
        return func(*args, **(kwargs or {}))


# ------------------------------------------------------------------------------------------------ drawing
def test_draw_is_an_inverse_cdf() -> None:
    logits = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4]])).expand(5, 4)
    u = torch.tensor([0.0, 0.099, 0.1, 0.31, 0.999])
    assert draw_codes(logits, u).tolist() == [0, 0, 1, 2, 3]


def test_filtering_by_hand() -> None:
    logits = torch.log(torch.tensor([[0.1, 0.4, 0.2, 0.3]]))
    assert filtered_probs(logits, top_k=2).tolist()[0] == pytest.approx([0, 4 / 7, 0, 3 / 7])
    # Nucleus 0.5: 0.4 alone is not enough, 0.4 + 0.3 is.
    assert (filtered_probs(logits, top_p=0.5)[0] > 0).tolist() == [False, True, False, True]
    assert (filtered_probs(logits, top_p=0.4)[0] > 0).tolist() == [False, True, False, False]
    assert (filtered_probs(logits, top_k=1, top_p=1.0)[0] > 0).tolist() == [False, True, False, False]
    flat = filtered_probs(logits, temperature=1e6)[0]
    assert flat.tolist() == pytest.approx([0.25] * 4, abs=1e-5)
    assert filtered_probs(logits, top_k=10).tolist()[0] == pytest.approx([0.1, 0.4, 0.2, 0.3])


def test_uniform_streams() -> None:
    a = uniforms(3, 5, [1, 2, 3], "cpu")
    assert a.shape == (3, 5) and a.dtype == torch.float64
    assert torch.equal(a[1], uniforms(1, 5, [2], "cpu")[0])
    b = uniforms(3, 5, torch.Generator().manual_seed(1), "cpu")
    assert torch.equal(b, uniforms(3, 5, torch.Generator().manual_seed(1), "cpu"))
    assert ((a >= 0) & (a < 1)).all()


@pytest.mark.parametrize("scale", [0.0, 2.5])
def test_guided_cached_and_naive_draw_the_same_codes(scale: float) -> None:
    # Classifier-free guidance doubles the batch (each sample with its class and with "no class"); both samplers mix
    # the two streams' logits the same way, and scale 0 is sampling the "no class" label plainly.
    model = make_model("all", dtype=torch.float64, class_dropout=0.1)
    torch.nn.init.normal_(model.blocks[0].class_bias.weight)  # classes that matter
    ctx = conditioning(model, batch=3)
    seeds = [1, 2, 3]
    cached = CachedSampler(model).sample(3, **ctx, generator=seeds, controls=SamplingControls(guidance_scale=scale))
    assert torch.equal(
        cached, sample_naive(model, 3, **ctx, generator=seeds, controls=SamplingControls(guidance_scale=scale))
    )
    plain = CachedSampler(model).sample(3, **ctx, generator=seeds)
    if scale == 0:
        null = torch.full((3,), model.config.num_classes)
        assert torch.equal(cached, CachedSampler(model).sample(3, null, ctx["cond"], generator=seeds))
    else:
        assert not torch.equal(cached, plain)
    with pytest.raises(ValueError, match="class_dropout"):
        CachedSampler(make_model("all")).sample(3, **ctx, controls=SamplingControls(guidance_scale=2.0))
