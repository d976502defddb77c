"""Unit tests of the code priors (steps/nn/prior.py): shapes, causality, conditioning, likelihood, samples."""

from __future__ import annotations

import dataclasses
import io
import json
import math
import re

import pytest
import torch

from steps.nn import pixelcnn as prior
from steps.nn.draw import SamplingControls
from steps.nn.pixelcnn import PixelCNNConfig, PixelCNNPrior
from steps.nn.prior import sample_naive

TINY = dict(num_codes=11, shape=(5, 4), channels=16, layers=3, kernel_size=3, dropout=0.0)
# Every conditioning mode; the spatial ones cover both an upsampling factor of 2 and of 1.
MODES = {
    "plain": {},
    "class": dict(num_classes=3),
    "spatial": dict(cond_num_codes=7, cond_shape=(5, 2), cond_channels=8, cond_res_blocks=1),
    "attention": dict(attn_heads=2, attn_every=1),
    "all": dict(attn_heads=4, num_classes=3, cond_num_codes=7, cond_shape=(5, 4), cond_channels=8),
}


def make_model(seed: int = 0, **overrides) -> PixelCNNPrior:
    torch.manual_seed(seed)
    model = PixelCNNPrior(PixelCNNConfig(**{**TINY, **overrides}))
    # The real init shrinks the output layer towards uniform predictions; random weights make every dependence
    # of a logit on an input large enough to measure.
    torch.nn.init.normal_(model.head[-1].weight)
    return model.eval()


def make_inputs(model: PixelCNNPrior, batch: int, seed: int = 1) -> dict[str, torch.Tensor | None]:
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    return dict(
        codes=torch.randint(0, cfg.num_codes, (batch, *cfg.shape), generator=g),
        labels=torch.randint(0, cfg.num_classes, (batch,), generator=g) if cfg.num_classes else None,
        cond=torch.randint(0, cfg.cond_num_codes, (batch, *cfg.cond_shape), generator=g)
        if cfg.cond_num_codes
        else None,
    )


def causality_check(model: PixelCNNPrior, codes, labels=None, cond=None, seed=2) -> tuple[float, float]:
    """For every raster position i, redraw every code at positions >= i and measure how the logits move.

    Returns:
        (leak, reach): the largest logit change at positions <= i (0 for a causal model) and the largest
        change at positions > i (> 0 for a model that uses its context), over all i.
    """
    b, h, w = codes.shape
    k = model.config.num_codes
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        base = model(codes, labels, cond).reshape(b, k, h * w)  # (B, K, N)
        leak = reach = 0.0
        for i in range(h * w):
            flat = codes.reshape(b, h * w).clone()
            # A non-zero offset mod K changes every code at positions >= i.
            flat[:, i:] = (flat[:, i:] + torch.randint(1, k, flat[:, i:].shape, generator=g)) % k
            diff = (model(flat.reshape(b, h, w), labels, cond).reshape(b, k, h * w) - base).abs()
            leak = max(leak, diff[:, :, : i + 1].max().item())
            if i + 1 < h * w:
                reach = max(reach, diff[:, :, i + 1 :].max().item())
    return leak, reach


def logit_change(model: PixelCNNPrior, inputs: dict, changed: tuple, watched: tuple) -> float:
    """Largest change of the logits at ``watched`` when only the code at ``changed`` is altered."""
    codes = inputs["codes"].clone()
    codes[:, changed[0], changed[1]] = (codes[:, changed[0], changed[1]] + 1) % model.config.num_codes
    with torch.no_grad():
        before = model(**inputs)[:, :, watched[0], watched[1]]
        after = model(codes, inputs["labels"], inputs["cond"])[:, :, watched[0], watched[1]]
    return (after - before).abs().max().item()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", [(5, 4), (4, 6)])
def test_output_shape(mode: str, shape: tuple[int, int]) -> None:
    overrides = dict(MODES[mode], shape=shape)
    if "cond_shape" in overrides:
        overrides["cond_shape"] = (shape[0], shape[1] // 2)
    model = make_model(**overrides)
    logits = model(**make_inputs(model, batch=3))
    assert logits.shape == (3, TINY["num_codes"], *shape)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kernel_size", [3, 5])
def test_causal_and_no_blind_spot(mode: str, kernel_size: int) -> None:
    model = make_model(kernel_size=kernel_size, **MODES[mode])
    inputs = make_inputs(model, batch=2)
    leak, reach = causality_check(model, **inputs)
    assert leak < 1e-5, f"logits at position <= i changed by {leak} when codes >= i changed"
    assert reach > 1e-3, "logits never depend on earlier codes: the check could not fail"
    height, width = model.config.shape
    for r in range(1, height):
        for c in range(width - 1):
            # Up and to the right: exactly what the masked PixelCNN's blind spot hides.
            assert logit_change(model, inputs, (r - 1, c + 1), (r, c)) > 1e-4, (r, c)
    for r in range(height):
        for c in range(1, width):
            assert logit_change(model, inputs, (r, c - 1), (r, c)) > 1e-4, (r, c)


def test_attention_reaches_beyond_the_receptive_field() -> None:
    # One 3x3 layer sees only one row up and one column left / right; the attention sees everything before.
    model = make_model(layers=1, attn_heads=2, attn_every=1)
    inputs = make_inputs(model, batch=2)
    assert logit_change(model, inputs, (0, 0), (4, 3)) > 1e-4
    plain = make_model(layers=1)
    assert logit_change(plain, inputs, (0, 0), (4, 3)) == 0.0


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


@pytest.mark.parametrize(
    "broken, mode",
    [
        ("_shift_down", "plain"),
        ("_shift_right", "plain"),
        ("_shift_right", "all"),
        ("_causal_mask", "attention"),
    ],
)
def test_causality_check_detects_a_broken_model(monkeypatch, broken: str, mode: str) -> None:
    model = make_model(**MODES[mode])
    inputs = make_inputs(model, batch=2)
    assert causality_check(model, **inputs)[0] < 1e-5
    if broken == "_causal_mask":
        monkeypatch.setattr(prior, broken, lambda q, k: torch.ones(len(q), len(k), dtype=torch.bool))
    else:
        monkeypatch.setattr(prior, broken, _identity)
    assert causality_check(model, **inputs)[0] > 1e-3


def test_class_labels_change_the_logits() -> None:
    model = make_model(**MODES["class"])
    inputs = make_inputs(model, batch=2)
    other = dict(inputs, labels=(inputs["labels"] + 1) % 3)
    with torch.no_grad():
        assert not torch.allclose(model(**inputs), model(**other), atol=1e-4)


def test_cond_codes_change_the_logits_everywhere() -> None:
    model = make_model(**MODES["spatial"])
    inputs = make_inputs(model, batch=2)
    other = dict(inputs, cond=(inputs["cond"] + 1) % 7)
    with torch.no_grad():
        diff = (model(**inputs) - model(**other)).abs().amax(dim=(0, 1))  # (H, W)
    # The conditioning map is known in full, so even the first position sees it.
    assert (diff > 1e-4).all()


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(codes=torch.zeros(2, 4, 4, dtype=torch.long)), "codes must have shape"),
        (dict(codes=torch.zeros(2, 5, 4)), "integer"),
        (dict(codes=torch.full((2, 5, 4), 11)), r"codes values must be in \[0, 11\)"),
        (dict(labels=None), "labels are required"),
        (dict(labels=torch.tensor([0, 3])), "labels values"),
        (dict(labels=torch.tensor([0])), "labels must have shape"),
        (dict(cond=None), "cond is required"),
        (dict(cond=torch.zeros(2, 5, 4, dtype=torch.long)), "cond must have shape"),
        (dict(cond=torch.full((2, 5, 2), -1)), "cond values"),
    ],
)
def test_forward_rejects_bad_inputs(change: dict, match: str) -> None:
    model = make_model(num_classes=3, cond_num_codes=7, cond_shape=(5, 2))
    with pytest.raises(ValueError, match=match):
        model(**{**make_inputs(model, batch=2), **change})


def test_forward_rejects_unexpected_conditioning() -> None:
    model = make_model()
    codes = make_inputs(model, batch=2)["codes"]
    with pytest.raises(ValueError, match="not class-conditional"):
        model(codes, labels=torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="no spatial conditioning"):
        model(codes, cond=torch.zeros(2, 5, 4, dtype=torch.long))


def test_fresh_nll_is_near_uniform_and_falls_when_overfitting() -> None:
    torch.manual_seed(0)
    model = PixelCNNPrior(PixelCNNConfig(**{**TINY, **MODES["all"], "num_codes": 16}))
    inputs = make_inputs(model, batch=4)
    start = model.nll_bits(**inputs)
    assert start.shape == ()
    assert abs(start.item() - math.log2(16)) < 0.5
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(100):
        opt.zero_grad()
        loss = model.nll_bits(**inputs)
        loss.backward()
        opt.step()
    assert model.nll_bits(**inputs).item() < 0.5 * start.item()


@pytest.mark.parametrize("mode", ["plain", "all"])
def test_sample_naive_shape_range_and_determinism(mode: str) -> None:
    model = make_model(**MODES[mode]).train()
    cond = make_inputs(model, batch=3)
    cond.pop("codes")
    a = sample_naive(model, 3, **cond, generator=torch.Generator().manual_seed(5))
    b = sample_naive(model, 3, **cond, generator=torch.Generator().manual_seed(5))
    assert a.shape == (3, *model.config.shape) and a.dtype == torch.long
    assert a.min() >= 0 and a.max() < model.config.num_codes
    assert torch.equal(a, b)
    assert model.training, "sample_naive must restore the previous mode"


def test_sample_naive_temperature() -> None:
    model = make_model()

    def draw(temperature: float, seed: int) -> torch.Tensor:
        return sample_naive(
            model, 4, controls=SamplingControls(temperature=temperature), generator=torch.Generator().manual_seed(seed)
        )

    cold = [draw(1e-3, seed) for seed in (1, 2)]
    hot = [draw(1.0, seed) for seed in (1, 2)]
    # Near zero temperature the sampler is greedy, so the seed no longer matters.
    assert torch.equal(cold[0], cold[1])
    assert not torch.equal(hot[0], hot[1])
    with pytest.raises(ValueError, match="temperature"):
        sample_naive(model, 1, controls=SamplingControls(temperature=0.0))


@pytest.mark.parametrize(
    "field, value",
    [
        ("num_codes", 0),
        ("shape", (0, 4)),
        ("shape", (4,)),
        ("channels", 0),
        ("layers", 0),
        ("kernel_size", 4),
        ("kernel_size", 1),
        ("dropout", 1.0),
        ("num_classes", -1),
        ("attn_heads", -1),
        ("attn_heads", 3),
        ("attn_every", 0),
        ("attn_every", 4),
        ("cond_num_codes", -1),
        ("cond_shape", (3, 2)),
        ("cond_shape", (0, 2)),
        ("cond_channels", 0),
        ("cond_res_blocks", -1),
    ],
)
def test_config_validation_names_the_field(field: str, value) -> None:
    base = dict(TINY, attn_heads=2, cond_num_codes=7, cond_shape=(5, 2))
    with pytest.raises(ValueError, match=re.escape(f"PixelCNNConfig.{field} ")):
        PixelCNNConfig(**{**base, field: value})


def test_kernel_size_message() -> None:
    with pytest.raises(ValueError, match=re.escape("PixelCNNConfig.kernel_size must be odd and >= 3, got 4")):
        PixelCNNConfig(kernel_size=4)


def test_config_dict_round_trip_through_a_checkpoint() -> None:
    cfg = PixelCNNConfig(**{**TINY, **MODES["all"], "dropout": 0.1})
    data = cfg.to_dict()
    assert data["shape"] == [5, 4] and isinstance(data["cond_shape"], list)
    json.dumps(data)  # plain python primitives only
    buffer = io.BytesIO()
    model = PixelCNNPrior(cfg).eval()
    torch.save({"config": data, "state_dict": model.state_dict()}, buffer)
    buffer.seek(0)
    ckpt = torch.load(buffer, weights_only=True)
    restored = PixelCNNConfig.from_dict(ckpt["config"])
    assert restored == cfg and restored.shape == (5, 4)
    clone = PixelCNNPrior(restored).eval()
    clone.load_state_dict(ckpt["state_dict"])
    inputs = make_inputs(model, batch=2)
    with torch.no_grad():
        assert torch.equal(model(**inputs), clone(**inputs))
    with pytest.raises(ValueError, match="PixelCNNConfig.bogus is not a setting"):
        PixelCNNConfig.from_dict({**data, "bogus": 1})
    assert dataclasses.replace(cfg, layers=2).to_dict()["layers"] == 2
