"""Finite scalar quantisation (steps/nn/fsq.py): the grid, the straight-through gradient, code indices that round-trip
through lookup, the levels a codebook size picks, and FSQ inside a VQ-VAE-2 from config to checkpoint."""

import itertools
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from pipeline.config import ConfigError, load, register
from steps.nn import registry
from steps.nn.checkpoint import load_model, save_checkpoint
from steps.nn.config import FieldError
from steps.nn.fsq import FSQConfig, FSQuantizer, levels_for
from steps.nn.vqvae import VQVAE, VQVAE2, VQVAE2Config, VQVAEConfig

CONF = Path(__file__).resolve().parents[2] / "conf"
TINY = {"channels": 16, "res_channels": 8, "res_blocks": 1}


def test_every_grid_point_is_a_code_and_looks_up_to_its_value():
    q = FSQuantizer(FSQConfig(levels=(4, 3, 5))).eval()
    grid = torch.tensor(list(itertools.product(*[range(n) for n in (4, 3, 5)])))  # (60, 3) digits
    # Inputs at the centres of the rounding cells: tanh^-1 of each grid value in the bounded range.
    levels = torch.tensor([4.0, 3.0, 5.0])
    half_l = (levels - 1) * (1 + 1e-3) / 2
    offset = torch.tensor([0.5, 0.0, 0.0])
    target = grid.float() - (levels // 2)  # integers in each channel's range, e.g. -2..1 for 4 levels
    z = torch.atanh((target + offset) / half_l) - torch.atanh(offset / half_l)  # (60, 3)
    out = q(z.T.reshape(1, 3, 60, 1))
    codes = out.codes.flatten()
    assert sorted(codes.tolist()) == list(range(60))  # all 60 codes, each once
    assert torch.equal(q.lookup(out.codes), out.quantized)  # lookup gives exactly what the encoder path gives
    values = out.quantized.reshape(3, 60).T
    torch.testing.assert_close(values, target / (levels // 2))
    assert q.usage_fraction() == 1.0 and q.usage_perplexity() == pytest.approx(60.0)


@pytest.mark.parametrize("levels", [(8,), (5,), (8, 5, 5, 5), (2, 7)])
def test_each_channel_takes_exactly_its_number_of_values_in_minus_one_to_one(levels):
    q = FSQuantizer(FSQConfig(levels=levels)).train()
    out = q(torch.randn(64, len(levels), 8, 8) * 4)  # wide inputs reach the outermost values
    for i, n in enumerate(levels):
        seen = out.quantized[:, i].unique()
        assert len(seen) == n and seen.min() >= -1 and seen.max() <= 1, (i, seen)
    assert out.codes.min() >= 0 and out.codes.max() < q.config.codebook_size
    assert out.commit_loss.item() == 0.0  # no codebook to commit to


def test_the_gradient_passes_straight_through_the_rounding():
    q = FSQuantizer(FSQConfig(levels=(5, 5))).train()
    z = torch.randn(2, 2, 3, 3, requires_grad=True)
    q(z).quantized.sum().backward()
    # d/dz of tanh(z) * half_l / half_width, the rounding contributing the identity
    expect = (1 - torch.tanh(z.detach()) ** 2) * (4 * (1 + 1e-3) / 2) / 2
    torch.testing.assert_close(z.grad, expect)


def test_lookup_refuses_codes_outside_the_grid():
    q = FSQuantizer(FSQConfig(levels=(3, 3)))
    with pytest.raises(ValueError, match=r"code values must be in \[0, 9\)"):
        q.lookup(torch.full((1, 2, 2), 9))


@pytest.mark.parametrize(
    "size,levels", [(64, (8, 8)), (128, (8, 4, 4)), (240, (8, 6, 5)), (512, (8, 8, 8)), (1000, (8, 5, 5, 5))]
)
def test_a_codebook_size_picks_the_fewest_most_even_levels(size, levels):
    assert levels_for(size) == levels
    assert FSQConfig().resized(codebook_size=size).levels == levels


@pytest.mark.parametrize("size", [11, 2, 97, 2 * 11])
def test_a_size_without_levels_fails_naming_the_override(size):
    with pytest.raises(ValueError, match="product of factors from 3 to 8"):
        levels_for(size)
    with pytest.raises(FieldError, match="top_codebook_size"):
        VQVAE2Config(quantizer={"kind": "fsq"}, top_codebook_size=size)


def test_config_errors_name_the_field():
    with pytest.raises(FieldError, match="levels"):
        FSQConfig(levels=(8, 1))
    with pytest.raises(FieldError, match="levels"):
        FSQConfig(levels=(8, 8, 8, 8, 8, 8))  # 262144 codes: more than int16 holds
    with pytest.raises(FieldError, match="bottom_embed_dim"):  # the code dimension is len(levels)
        VQVAE2Config(quantizer={"kind": "fsq", "levels": [5, 5, 5]}, bottom_embed_dim=8)


def test_a_vqvae2_with_fsq_encodes_decodes_and_saves(tmp_path):
    torch.manual_seed(0)
    cfg = VQVAE2Config(**TINY, quantizer={"kind": "fsq", "levels": [5, 5, 5]}, top_codebook_size=64)
    assert cfg.codebook_sizes == {"top": 64, "bottom": 125}
    model = VQVAE2(cfg).train()
    x = torch.randn(2, 3, 32, 32)
    model(x).recon_loss.backward()  # the encoder learns through the straight-through rounding
    assert model.enc_bottom.net[0].weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        enc = model.encode(x)
        assert enc.codes[0].shape == (2, 4, 4) and int(enc.codes[0].max()) < 64
        torch.testing.assert_close(model.decode_codes(*enc.codes), model.decode(enc.quantized))
    path = tmp_path / "model.pt"
    save_checkpoint(path, model, step=1)
    loaded, _ = load_model(path)
    assert loaded.config == cfg and registry.kind_of(loaded.quantizers["top"]) == "fsq"
    with torch.no_grad():
        assert torch.equal(loaded.encode(x).codes[1], enc.codes[1])


def test_a_one_level_vqvae_takes_fsq_too():
    model = VQVAE(VQVAEConfig(**TINY, quantizer={"kind": "fsq", "levels": [8, 6, 5]})).eval()
    with torch.no_grad():
        codes = model.encode(torch.randn(1, 3, 32, 32)).codes[0]
    assert model.config.codebook_sizes == {"top": 240} and int(codes.max()) < 240


def test_the_pipeline_config_selects_fsq_per_level():
    register()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = load(compose("config", overrides=["debug=tiny", "model/quantizer=fsq", "model.top_codebook_size=64"]))
        assert cfg.train_vqvae.model.codebook_sizes == {"top": 64, "bottom": 1000}
        with pytest.raises(ConfigError, match="model.top_codebook_size"):
            load(compose("config", overrides=["model/quantizer=fsq", "model.top_codebook_size=97"]))
