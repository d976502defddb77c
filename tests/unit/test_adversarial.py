"""The adversarial decoder fine-tune (steps/nn/adversarial.py): what learns and what stays frozen, each part's gradient,
the adaptive weight, its start, and its config errors."""

import copy

import pytest
import torch
import torch.nn.functional as F

from steps.nn import registry
from steps.nn.adversarial import DecoderGAN, DecoderGANConfig, hinge_d_loss, last_layer
from steps.nn.config import FieldError
from steps.nn.quantize import EMAQuantizerConfig
from steps.nn.vae import VAEConfig
from steps.nn.vqvae import VQVAE2Config, VQVAEConfig

TINY = {"channels": 16, "res_channels": 8, "res_blocks": 1, "in_channels": 1, "quantizer": EMAQuantizerConfig(32, 8)}
MODELS = {
    "vqvae2": VQVAE2Config(**TINY),
    "three levels": VQVAE2Config(**TINY, factors=(2, 2, 2)),
    "vqvae": VQVAEConfig(**TINY),
}


def gan(autoencoder=MODELS["vqvae2"], **kw) -> DecoderGAN:
    torch.manual_seed(0)
    return registry.build(DecoderGANConfig(autoencoder=autoencoder, disc_channels=8, **kw))


def images(n=4, seed=1):
    return torch.rand(n, 1, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize("name", list(MODELS))
def test_decoder_parameters_are_exactly_what_decode_uses_and_encode_does_not(name):
    model = registry.build(MODELS[name])
    quantized = tuple(q.detach() for q in model.encode(images()).quantized)
    model.decode(quantized).sum().backward()
    reached = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert reached == model.decoder_parameter_names()
    model.zero_grad(set_to_none=True)
    model.encode(images()).quantized[-1].sum().backward()
    assert not any(model.get_parameter(n).grad is not None for n in model.decoder_parameter_names())


@pytest.mark.parametrize("name", list(MODELS))
def test_only_the_decoder_and_the_discriminator_learn(name):
    model = gan(MODELS[name], gan_start=1).train()
    before = copy.deepcopy(model.state_dict())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(3):
        out = model(images())
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    after = model.state_dict()
    tuned = {f"autoencoder.{k}" for k in model.autoencoder.decoder_parameter_names()}
    disc = {k for k in after if k.startswith("disc.")}
    frozen = set(after) - tuned - disc - {"updates"}
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen), "encoder and codebooks are untouched"
    assert all(not torch.equal(before[k], after[k]) for k in tuned), "every decoder weight learned"
    assert any(not torch.equal(before[k], after[k]) for k in disc)
    assert int(after["updates"]) == 3 and not model.autoencoder.training, "the autoencoder stays in eval mode"


def test_each_part_gets_exactly_its_own_gradient():
    """One backward of the summed loss: the decoder gets the gradient of rec + lambda * adv, the discriminator that of
    the hinge loss, as two separate optimisers would give them."""
    model = gan(gan_start=0, gan_weight=0.7).train()
    x = images()
    out = model(x)
    model.zero_grad()
    out.loss.backward()
    joint = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ref = copy.deepcopy(model)
    ref.zero_grad(set_to_none=True)
    ae = ref.autoencoder
    recon = ae.decode(tuple(q.detach() for q in ae.encode(x).quantized))
    rec = F.l1_loss(recon, x) + F.mse_loss(recon, x)
    layer = last_layer(ae.decoder_modules())
    adv = -ref.disc(recon).mean()
    g_rec = torch.autograd.grad(rec, layer, retain_graph=True)[0]
    g_adv = torch.autograd.grad(adv, layer, retain_graph=True)[0]
    lam = (g_rec.norm() / (g_adv.norm() + 1e-4)).detach()
    assert float(out.stats["gan_lambda"]) == pytest.approx(0.7 * float(lam), rel=1e-5)
    decoder = [p for n, p in ae.named_parameters() if n in ae.decoder_parameter_names()]
    for p, g in zip(decoder, torch.autograd.grad(rec + 0.7 * lam * adv, decoder, retain_graph=True), strict=True):
        name = next(n for n, q in ref.named_parameters() if q is p)
        torch.testing.assert_close(joint[name], g, rtol=1e-4, atol=1e-7)
    disc = list(ref.disc.parameters())
    d = hinge_d_loss(ref.disc(x), ref.disc(recon.detach()))
    for (name, _), g in zip(ref.disc.named_parameters(), torch.autograd.grad(d, disc), strict=True):
        torch.testing.assert_close(joint[f"disc.{name}"], g, rtol=1e-4, atol=1e-7)


def test_the_adversarial_term_starts_after_gan_start_updates():
    model = gan(gan_start=2).train()
    weights = [float(model(images()).stats["gan_lambda"]) for _ in range(3)]
    assert weights[:2] == [0.0, 0.0] and weights[2] > 0
    assert float(gan(gan_weight=0.0, gan_start=0).train()(images()).stats["gan_lambda"]) == 0.0
    model.eval()
    with torch.no_grad():
        assert float(model(images()).stats["gan_lambda"]) == 0.0 and int(model.updates) == 3, "eval counts nothing"


def test_config_errors_name_the_field():
    with pytest.raises(FieldError, match=r"DecoderGANConfig.autoencoder .*vae has none"):
        DecoderGANConfig(autoencoder=VAEConfig(**{k: v for k, v in TINY.items() if k != "quantizer"}))
    with pytest.raises(FieldError, match=r"DecoderGANConfig.disc_layers must be in \[1, log2"):
        DecoderGANConfig(autoencoder=MODELS["vqvae2"], disc_layers=4)
    with pytest.raises(FieldError, match="DecoderGANConfig.disc_channels must be a multiple of 8"):
        DecoderGANConfig(autoencoder=MODELS["vqvae2"], disc_channels=12)
    cfg = DecoderGANConfig(autoencoder=MODELS["three levels"], gan_start=7)
    assert DecoderGANConfig.from_dict(cfg.to_dict()) == cfg, "the checkpoint's config round-trips"
