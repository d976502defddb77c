"""The transformer prior (steps/nn/transformer.py): causality, the KV-cached sampler against the forward pass and the
naive sampler, conditioning, classifier-free guidance, config checks and a short fit.

Sampling comparisons use float64 models, so that no float32 rounding tie can make a draw flip between samplers.
"""

from __future__ import annotations

import pytest
import torch

from steps.nn import registry
from steps.nn.checkpoint import checkpoint_dict, load_model
from steps.nn.config import FieldError
from steps.nn.draw import SamplingControls
from steps.nn.prior import drop_labels, sample_naive
from steps.nn.transformer import TransformerConfig, TransformerPrior, TransformerSampler

BASE = dict(num_codes=11, channels=16, layers=2, heads=2)
VARIANTS = {
    "plain": {},
    "class": dict(num_classes=3),
    "spatial": dict(cond_num_codes=7, cond_shape=(2, 2), cond_channels=8, cond_res_blocks=1),
    "guided": dict(num_classes=3, class_dropout=0.2, cond_num_codes=7, cond_shape=(2, 2), cond_channels=8),
}


pytestmark = pytest.mark.usefixtures("one_thread")


def make_model(variant: str, shape=(4, 4), dtype=torch.float32, seed=0) -> TransformerPrior:
    torch.manual_seed(seed)
    model = TransformerPrior(TransformerConfig(**BASE, shape=shape, **VARIANTS[variant]))
    torch.nn.init.normal_(model.head.weight, std=0.3)  # far from uniform, not yet one-hot
    torch.nn.init.normal_(model.start.weight)  # classes that matter
    return model.to(dtype).eval()


def conditioning(model: TransformerPrior, batch: int, seed: int = 1) -> dict:
    cfg, g = model.config, torch.Generator().manual_seed(seed)
    labels = torch.randint(0, cfg.num_classes, (batch,), generator=g) if cfg.num_classes else None
    cond = torch.randint(0, cfg.cond_num_codes, (batch, *cfg.cond_shape), generator=g) if cfg.cond_num_codes else None
    return dict(labels=labels, cond=cond)


@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_at_i_depend_only_on_codes_before_i(variant: str) -> None:
    model = make_model(variant, dtype=torch.float64)
    ctx = conditioning(model, batch=1)
    codes = torch.randint(0, 11, (1, 4, 4), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        base = model(codes, **ctx).flatten(2)  # (1, K, N)
        for j in range(16):
            changed = codes.clone().flatten()
            changed[j] = (changed[j] + 1) % 11
            diff = (model(changed.view(1, 4, 4), **ctx).flatten(2) - base).abs().amax(dim=1)[0]  # (N,)
            assert diff[: j + 1].max() == 0, f"position <= {j} reads code {j}"
            if j + 1 < 16:
                assert diff[j + 1] > 0, f"position {j + 1} does not read code {j}"


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", [(4, 4), (2, 6)])
def test_cached_logits_equal_the_forward_pass(variant: str, shape) -> None:
    if variant in ("spatial", "guided") and shape != (4, 4):
        shape = (4, 6)  # the (2, 2) conditioning map must divide the map
    model = make_model(variant, shape)
    ctx = conditioning(model, batch=3)
    codes = torch.randint(0, 11, (3, *shape), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(codes, **ctx)
    sampler = TransformerSampler(model)
    cached = sampler.logits(codes, **ctx)
    assert cached.shape == full.shape
    assert (cached - full).abs().max().item() < 1e-4
    assert sampler.cache_bytes == 2 * 2 * 3 * 16 * shape[0] * shape[1] * 4  # K and V, 2 blocks, (B, N, C) float32


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("controls", [{}, dict(temperature=0.5), dict(temperature=2.0, top_k=4, top_p=0.8)])
def test_cached_and_naive_draw_the_same_codes(variant: str, controls: dict) -> None:
    model = make_model(variant, dtype=torch.float64)
    ctx = conditioning(model, batch=4)
    seeds = [11, 12, 13, 14]
    naive = sample_naive(model, 4, **ctx, generator=seeds, controls=SamplingControls(**controls))
    sampler = registry.sampler(model)
    assert isinstance(sampler, TransformerSampler)
    cached = sampler.sample(4, **ctx, generator=seeds, controls=SamplingControls(**controls))
    assert torch.equal(cached, naive)
    assert not torch.equal(
        sampler.sample(4, **ctx, generator=[21, 22, 23, 24], controls=SamplingControls(**controls)), cached
    )


@pytest.mark.parametrize("scale", [0.0, 1.5, 4.0])
def test_guided_sampling_matches_the_naive_sampler_and_its_definition(scale: float) -> None:
    model = make_model("guided", dtype=torch.float64)
    ctx = conditioning(model, batch=4)
    seeds = [5, 6, 7, 8]
    cached = TransformerSampler(model).sample(
        4, **ctx, generator=seeds, controls=SamplingControls(guidance_scale=scale)
    )
    assert torch.equal(
        cached, sample_naive(model, 4, **ctx, generator=seeds, controls=SamplingControls(guidance_scale=scale))
    )
    plain = TransformerSampler(model).sample(4, **ctx, generator=seeds)
    if scale == 0:  # no class at all: the prior's unconditional stream, i.e. the "no class" label
        null = torch.full((4,), model.config.num_classes)
        assert torch.equal(cached, TransformerSampler(model).sample(4, null, ctx["cond"], generator=seeds))
    else:
        assert not torch.equal(cached, plain)


def test_guidance_needs_a_guidable_prior_and_sane_scales() -> None:
    model = make_model("class")
    labels = torch.tensor([0, 1])
    with pytest.raises(ValueError, match=r"class_dropout > 0 \(prior.<level>.class_dropout of train_prior"):
        TransformerSampler(model).sample(2, labels, controls=SamplingControls(guidance_scale=2.0))
    guided = make_model("guided")
    ctx = conditioning(guided, batch=2)
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="guidance_scale"):
            TransformerSampler(guided).sample(2, **ctx, controls=SamplingControls(guidance_scale=bad))
    with pytest.raises(ValueError, match="labels are required"):
        TransformerSampler(guided).sample(2, None, ctx["cond"], controls=SamplingControls(guidance_scale=2.0))


def test_class_dropout_replaces_labels_at_its_rate_with_the_no_class_label() -> None:
    cfg = TransformerConfig(**BASE, num_classes=10, class_dropout=0.25)
    torch.manual_seed(0)
    labels = torch.randint(0, 10, (20000,))
    dropped = drop_labels(cfg, labels)
    null = dropped == 10
    assert 0.23 < null.float().mean().item() < 0.27
    assert torch.equal(dropped[~null], labels[~null])
    assert drop_labels(TransformerConfig(**BASE, num_classes=10), labels) is labels  # class_dropout 0: untouched


def test_labels_and_classes_change_the_logits() -> None:
    model = make_model("guided")
    codes = torch.zeros(3, 4, 4, dtype=torch.long)
    cond = torch.zeros(3, 2, 2, dtype=torch.long)
    with torch.no_grad():
        out = model(codes, torch.tensor([0, 1, 3]), cond)  # 3: the "no class" label of a guidable prior
    assert not torch.allclose(out[0], out[1]) and not torch.allclose(out[1], out[2])
    with pytest.raises(ValueError, match=r"labels values must be in \[0, 4\)"):
        model(codes, torch.tensor([0, 1, 4]), cond)
    with pytest.raises(ValueError, match="cond is required"):
        model(codes, torch.tensor([0, 1, 2]))


@pytest.mark.parametrize(
    ("field", "value"), [("heads", 3), ("channels", 0), ("dropout", 1.0), ("class_dropout", 1.0), ("mlp_ratio", 0)]
)
def test_config_validation_names_the_field(field: str, value) -> None:
    with pytest.raises(FieldError, match=field):
        TransformerConfig(**{**BASE, field: value})


def test_registry_builds_it_and_checkpoints_round_trip() -> None:
    cfg = registry.config_from_dict("prior", {"kind": "transformer", **BASE, "shape": (4, 4), "num_classes": 3})
    assert isinstance(cfg, TransformerConfig) and registry.kind_of(cfg) == "transformer"
    model = registry.build(cfg)
    loaded, _ = load_model(checkpoint_dict(model), expect="prior")
    assert isinstance(loaded, TransformerPrior) and loaded.config == cfg
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_a_short_fit_learns_the_data() -> None:
    # Two fixed maps, one per class: the conditional NLL must fall far below the uniform log2(11) = 3.46 bits.
    torch.manual_seed(0)
    model = TransformerPrior(TransformerConfig(**BASE, shape=(3, 3), num_classes=2, dropout=0.0)).train()
    codes = torch.randint(0, 11, (2, 3, 3))
    labels = torch.tensor([0, 1])
    first = model.nll_bits(codes, labels).item()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(150):
        opt.zero_grad()
        model.nll_bits(codes, labels).backward()
        opt.step()
    assert first > 3.0 and model.nll_bits(codes, labels).item() < 0.3
    drawn = TransformerSampler(model).sample(2, labels, controls=SamplingControls(temperature=0.1), generator=[0, 1])
    assert torch.equal(drawn, codes)  # the memorised maps, drawn by class
