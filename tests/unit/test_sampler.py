"""Unit tests of the cached sampler (steps/nn/sampler.py) and the shared drawing function (steps/nn/draw.py).

Exactness: for every prior variant the cached, teacher-forced logits equal the full forward pass at every position,
and with the same seeds the cached and the naive sampler return identical codes. The sampling comparisons use
float64 models, so that no float32 rounding tie can make a draw flip between the two samplers.
"""

from __future__ import annotations

import pytest
import torch

from steps.nn.draw import draw_codes, filtered_probs, uniforms
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


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and threads waiting on each other crawl on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
    naive = sample_naive(model, 4, **ctx, generator=seeds, **controls)
    cached = sample(model, 4, **ctx, generator=seeds, **controls)
    assert torch.equal(cached, naive)
    # The draws depend on the seeds: otherwise the comparison above could not fail.
    assert not torch.equal(sample(model, 4, **ctx, generator=[21, 22, 23, 24], **controls), cached)


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
    codes = sample(model, 3, **ctx, generator=[1, 2, 3], top_k=1, temperature=3.0)
    with torch.no_grad():
        assert torch.equal(codes, model(codes, **ctx).argmax(dim=1))  # every code is the argmax given its prefix
    assert torch.equal(codes, sample(model, 3, **ctx, generator=[4, 5, 6], top_k=1))
    assert torch.equal(codes, sample(model, 3, **ctx, generator=[4, 5, 6], top_p=1e-9))  # nucleus of one code


def test_top_k_and_top_p_restrict_the_support() -> None:
    model = make_model("attention", (5, 4), 3, dtype=torch.float64)
    seeds = list(range(16))
    with torch.no_grad():
        codes = sample(model, 16, generator=seeds, top_k=3)
        logits = model(codes)  # (B, K, H, W)
        rank = (logits > logits.gather(1, codes[:, None])).sum(dim=1)  # codes more likely than the drawn one
        assert rank.max() <= 2 and rank.max() > 0
        codes = sample(model, 16, generator=seeds, top_p=0.5)
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
    vertical, horizontal, row_terms = 3 * 2 * c * (p + 1) * w, 3 * 2 * (w + p) * c, 3 * 2 * w * 2 * c
    keys_values, cond_map = 2 * 2 * h * w * c, 2 * 8 * h * w
    assert sampler.cache_bytes == f * (vertical + horizontal + row_terms + keys_values + cond_map)


def test_bad_inputs_are_refused() -> None:
    model = make_model("class", (4, 2), 3)
    sampler = CachedSampler(model)
    with pytest.raises(ValueError, match="labels are required"):
        sampler.sample(2)
    with pytest.raises(ValueError, match="labels must have shape"):
        sampler.sample(2, labels=torch.tensor([0]))
    for bad, match in [
        (dict(temperature=0.0), "temperature"),
        (dict(top_k=-1), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
    ]:
        with pytest.raises(ValueError, match=match):
            sampler.sample(2, labels=torch.tensor([0, 1]), **bad)
        with pytest.raises(ValueError, match=match):
            sample_naive(model, 2, labels=torch.tensor([0, 1]), **bad)
    with pytest.raises(ValueError, match="one generator or seed per sample"):
        sampler.sample(2, labels=torch.tensor([0, 1]), generator=[1, 2, 3])
    with pytest.raises(ValueError, match="n must be"):
        sampler.sample(0)


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
