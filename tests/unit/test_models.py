"""Autoencoders: shapes, gradients, decode_codes, checkpoints, determinism, overfitting, config validation."""

import io
import math
import pathlib

import pytest
import torch

from steps.nn import registry
from steps.nn.checkpoint import CheckpointError, checkpoint_dict, load_model, save_checkpoint
from steps.nn.quantize import EMAQuantizerConfig
from steps.nn.vae import VAE, VAEConfig
from steps.nn.vqvae import VQVAE, VQVAE2, VQVAE2Config, VQVAEConfig

TINY = {"channels": 16, "res_channels": 8, "res_blocks": 1, "quantizer": EMAQuantizerConfig(codebook_size=32, dim=8)}


def tiny_vqvae2(**kw) -> VQVAE2:
    return VQVAE2(VQVAE2Config(**{**TINY, **kw}))


@pytest.mark.parametrize("size", [32, 64, 128, 256])
@pytest.mark.parametrize("channels", [1, 3])
def test_vqvae2_shapes(size, channels):
    model = tiny_vqvae2(image_size=size, in_channels=channels, top_codebook_size=16, bottom_embed_dim=4)
    x = torch.rand(2, channels, size, size) * 2 - 1
    enc = model.encode(x)
    assert [tuple(c.shape) for c in enc.codes] == [(2, size // 8, size // 8), (2, size // 4, size // 4)]
    assert [tuple(q.shape) for q in enc.quantized] == [(2, 8, size // 8, size // 8), (2, 4, size // 4, size // 4)]
    assert enc.codes[0].max() < 16 and enc.codes[1].max() < 32
    out = model(x)
    assert out.recon.shape == x.shape
    assert set(out.stats) == {"perplexity_top", "perplexity_bottom", "commit_loss"}
    assert model.config.shapes == {"top": (size // 8, size // 8), "bottom": (size // 4, size // 4)}


@pytest.mark.parametrize(
    "factors,size,levels",
    [
        ((2, 2), 32, ("top", "bottom")),
        ((4, 2, 2), 64, ("top", "middle", "bottom")),
        ((8, 2, 2), 128, ("top", "middle", "bottom")),  # the paper's FFHQ-1024 hierarchy, at 128 pixels
        ((2, 2, 2, 2), 64, ("top", "middle1", "middle2", "bottom")),
    ],
)
def test_vqvae2_any_number_of_levels(factors, size, levels):
    model = tiny_vqvae2(image_size=size, factors=factors, top_codebook_size=16, bottom_embed_dim=4).train()
    scales = [math.prod(factors[: len(factors) - i]) for i in range(len(factors))]  # top first
    assert model.levels == levels
    assert model.config.shapes == {lv: (size // s, size // s) for lv, s in zip(levels, scales, strict=True)}
    assert model.config.codebook_sizes == {lv: 16 if lv == "top" else 32 for lv in levels}
    x = torch.rand(2, 3, size, size) * 2 - 1
    enc = model.encode(x)
    assert [tuple(c.shape) for c in enc.codes] == [(2, size // s, size // s) for s in scales]
    assert [q.shape[1] for q in enc.quantized] == [8] * (len(levels) - 1) + [4]
    out = model(x)
    assert out.recon.shape == x.shape and set(out.stats) == {f"perplexity_{lv}" for lv in levels} | {"commit_loss"}
    out.recon_loss.backward()  # every level's encoder learns from the reconstruction (straight through)
    for lv in levels:
        assert sum(p.grad.abs().sum() for p in getattr(model, f"enc_{lv}").parameters()) > 0
    model.eval()
    with torch.no_grad():
        enc = model.encode(x)
        torch.testing.assert_close(model.decode_codes(*enc.codes), model.decode(enc.quantized))
    with pytest.raises(ValueError, match=f"expects {len(levels)} code maps"):
        model.decode_codes(*enc.codes[:-1])


def test_two_level_model_keeps_its_layout_and_fingerprint():
    """Levels became a setting after two-level checkpoints and cached outputs existed: at the default factors a model
    has the modules those checkpoints hold, and its config the fingerprint it had."""
    model = tiny_vqvae2()
    modules = {name.split(".")[0] for name in model.state_dict()}
    assert modules == {"enc_bottom", "enc_top", "pre_quant_top", "dec_top", "pre_quant_bottom", "upsample_top",
                       "dec", "quantizers"}  # fmt: skip
    result = model.config.result_dict()
    assert not {"factors", "middle_codebook_size", "middle_embed_dim"} & set(result)
    assert VQVAE2Config(**TINY, factors=[4, 2]).result_dict() == result  # the default, spelled out
    assert VQVAE2Config(**TINY, factors=[2, 2, 2]).result_dict()["factors"] == [2, 2, 2]
    three = tiny_vqvae2(factors=[2, 2, 2])
    assert {"enc_middle", "dec_middle", "upsample_middle", "pre_quant_middle"} <= {
        name.split(".")[0] for name in three.state_dict()
    }


@pytest.mark.parametrize("downsample", [2, 4, 8])
def test_vqvae_and_vae_shapes(downsample):
    x = torch.randn(2, 3, 32, 32)
    vq = VQVAE(VQVAEConfig(**TINY, downsample=downsample))
    assert vq.encode(x).codes[0].shape == (2, 32 // downsample, 32 // downsample)
    assert vq(x).recon.shape == x.shape
    vae = VAE(VAEConfig(channels=16, res_channels=8, latent_channels=4, downsample=downsample))
    out = vae(x)
    assert out.recon.shape == x.shape and out.aux_loss.item() >= 0
    assert vae.sample(3, generator=torch.Generator().manual_seed(0)).shape == (3, 3, 32, 32)


@pytest.mark.parametrize("cls,cfg", [(VQVAE2, VQVAE2Config(**TINY)), (VQVAE, VQVAEConfig(**TINY))])
def test_straight_through_gradient_reaches_encoder(cls, cfg):
    model = cls(cfg).train()
    model(torch.randn(2, 3, 32, 32)).recon_loss.backward()  # reconstruction only: reaches the encoder solely via ST
    enc = model.enc_bottom if cls is VQVAE2 else model.enc
    grads = [p.grad for p in enc.parameters()]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0


def test_vae_gradient_reaches_encoder_through_reparameterisation():
    model = VAE(VAEConfig(channels=16, res_channels=8)).train()
    model(torch.randn(2, 3, 32, 32)).recon_loss.backward()
    assert model.enc.net[0].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("cls,cfg", [(VQVAE2, VQVAE2Config(**TINY)), (VQVAE, VQVAEConfig(**TINY))])
def test_decode_codes_equals_decode_quantized(cls, cfg):
    model = cls(cfg).eval()
    with torch.no_grad():
        enc = model.encode(torch.randn(3, 3, 32, 32))
        torch.testing.assert_close(model.decode_codes(*enc.codes), model.decode(enc.quantized))


def test_decode_codes_rejects_wrong_shapes():
    model = tiny_vqvae2().eval()
    with pytest.raises(ValueError, match="expects 2 code maps"):
        model.decode_codes(torch.zeros(1, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"bottom codes must have shape \(B, 8, 8\)"):
        model.decode_codes(torch.zeros(1, 4, 4, dtype=torch.long), torch.zeros(1, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="images of shape"):
        model.encode(torch.randn(1, 3, 64, 64))


@pytest.mark.parametrize(
    "model",
    [
        tiny_vqvae2(),
        tiny_vqvae2(factors=[2, 2, 2], middle_codebook_size=8),
        VQVAE(VQVAEConfig(**TINY)),
        VAE(VAEConfig(channels=16, res_channels=8)),
    ],
    ids=["vqvae2", "vqvae2-3-levels", "vqvae", "vae"],
)
def test_checkpoint_round_trip(tmp_path, model):
    model.train()
    model(torch.randn(4, 3, 32, 32))  # move EMA buffers away from their initial values
    model.eval()
    path = tmp_path / "model.pt"
    save_checkpoint(path, model, step=7)
    loaded, payload = load_model(path)
    assert type(loaded) is type(model) and loaded.config == model.config and payload["step"] == 7
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).recon, model(x).recon)
    assert not list(tmp_path.glob("*.tmp"))


def test_checkpoint_errors(tmp_path):
    model = tiny_vqvae2()
    with pytest.raises(CheckpointError, match="expected 'prior'"):
        load_model(checkpoint_dict(model), expect="prior")
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "missing.pt")
    bad = tmp_path / "corrupt.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"corrupt\.pt"):
        load_model(bad)
    payload = checkpoint_dict(model)
    payload["config"] = {**payload["config"], "quantizer": {"kind": "ema", "codebook_size": 64, "dim": 8}}
    with pytest.raises(CheckpointError, match="do not match"):
        load_model(payload)
    payload["config"] = {**payload["config"], "quantizer": {"kind": "nope"}}
    with pytest.raises(CheckpointError, match="unknown quantizer kind 'nope'"):
        load_model(payload)


class _TouchOnUnpickle:
    """Unpickling this object creates a file: proof of whether a loader executed pickled code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_checkpoint_refuses_pickled_objects(tmp_path):
    marker = tmp_path / "code-ran"
    buf = io.BytesIO()
    torch.save({"format": 1, "kind": "vqvae2", "config": {}, "model": {}, "x": _TouchOnUnpickle(marker)}, buf)
    with pytest.raises(CheckpointError, match="cannot read"):
        load_model(buf.getvalue())
    assert not marker.exists()


def test_seeded_determinism():
    def run(seed):
        torch.manual_seed(seed)
        model = tiny_vqvae2().train()
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
        for _ in range(3):
            loss = model(x).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        return model.state_dict()

    a, b, c = run(0), run(0), run(1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("kind", ["vqvae2", "vae"])
def test_overfit_one_batch(kind):
    torch.manual_seed(0)
    if kind == "vqvae2":
        quantizer = EMAQuantizerConfig(codebook_size=64, dim=16)
        model = VQVAE2(VQVAE2Config(channels=32, res_channels=16, res_blocks=1, quantizer=quantizer))
    else:
        model = VAE(VAEConfig(channels=32, res_channels=16, res_blocks=1, kl_weight=0.01))
    # Smooth random images: a real, learnable signal rather than white noise.
    x = torch.nn.functional.interpolate(torch.rand(8, 3, 8, 8) * 2 - 1, size=32, mode="bilinear")
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    model.train()
    first = None
    for _ in range(150):
        out = model(x)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        first = first if first is not None else out.recon_loss.item()
    assert out.recon_loss.item() < first / 5


@pytest.mark.parametrize(
    "build,field",
    [
        (lambda: VQVAE2Config(image_size=36), "image_size"),
        (lambda: VQVAE2Config(image_size=2048), "image_size"),
        (lambda: VQVAE2Config(image_size=48, factors=[4, 8]), "factors"),
        (lambda: VQVAE2Config(factors=[8]), "factors"),
        (lambda: VQVAE2Config(factors=[4, 3]), "factors"),
        (lambda: VQVAE2Config(factors=[2, 2, 2], middle_codebook_size=40000), "middle_codebook_size"),
        (lambda: VQVAE2Config(middle_embed_dim=8), "middle_embed_dim"),
        (lambda: VQVAE2Config(quantizer={"codebook_size": 40000}), "codebook_size"),
        (lambda: VQVAE2Config(quantizer={"kind": "nope"}), "quantizer"),
        (lambda: VQVAE2Config(channels=1.5), "channels"),
        (lambda: VQVAE2Config(in_channels=True), "in_channels"),
        (lambda: VQVAE2Config(top_codebook_size=1), "codebook_size"),
        (lambda: VQVAE2Config(channels=0), "channels"),
        (lambda: VQVAEConfig(downsample=3), "downsample"),
        (lambda: VAEConfig(kl_weight=-1.0), "kl_weight"),
    ],
)
def test_config_validation_names_the_field(build, field):
    with pytest.raises(ValueError, match=field):
        build()


def test_config_dict_round_trip():
    cfg = VQVAE2Config(**TINY, top_codebook_size=16)
    assert VQVAE2Config.from_dict(cfg.to_dict()) == cfg
    assert cfg.to_dict()["quantizer"]["kind"] == "ema"  # a polymorphic part names its kind
    with pytest.raises(ValueError, match="VQVAE2Config.bogus is not a setting"):
        VQVAE2Config.from_dict({**cfg.to_dict(), "bogus": 1})


def test_format_1_checkpoints_still_load():
    """Checkpoints of the previous format (flat quantiser settings, priors of kind "prior") load as today's."""
    model = tiny_vqvae2()
    payload = checkpoint_dict(model)
    flat = {k: v for k, v in payload["config"].items() if k != "quantizer"}
    flat |= {"codebook_size": 32, "embed_dim": 8, "beta": 0.25, "decay": 0.99, "eps": 1e-5, "restart_after": 20}
    old = {**payload, "format": 1, "config": {**flat, "kmeans_init": False}}
    loaded, upgraded = load_model(old, expect="vqvae2")
    assert loaded.config == model.config and upgraded["format"] == 2
    prior = registry.build(registry.get("pixelcnn").config(num_codes=8, shape=(2, 2), channels=8, layers=1))
    old_prior = {**checkpoint_dict(prior), "format": 1, "kind": "prior"}
    assert load_model(old_prior, expect="prior")[0].config == prior.config
