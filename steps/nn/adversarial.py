"""A sharper decoder for frozen codes: adversarial fine-tuning of a VQ model's decoder (VQGAN, Esser et al. 2021,
section 3.1; the patch discriminator of pix2pix, Isola et al. 2017, section 3.2.2).

A decoder trained on MSE alone averages over what the codes leave open and so blurs, which moves every decoded image
off the data manifold; no prior can sample past that ceiling. :class:`DecoderGAN` holds a trained VQ-VAE(-2) and a
:class:`PatchDiscriminator` trained from scratch. Only the decoder's layers (``decoder_modules``: what ``decode`` uses
and ``encode`` does not) learn; the encoder and the codebooks stay bit for bit as they were (eval mode: no codebook
updates), so every code, the code dataset and the priors trained on it stay valid and only the decoder is replaced.

Losses, per batch of real images ``x`` and their reconstructions ``x'`` from the frozen codes:

* decoder: ``l1_weight * |x' - x| + mse_weight * (x' - x)^2 + lambda * gan_weight * -D(x')`` (means), where the
  adaptive ``lambda = ||grad_L rec|| / (||grad_L adv|| + 1e-4)`` at the decoder's last layer ``L`` balances the two
  terms (VQGAN eq. 7); the adversarial term is off for the first ``gan_start`` updates, while the discriminator
  learns on its own;
* discriminator: the hinge loss ``relu(1 - D(x)) + relu(1 + D(x'))`` (means, halved).

Both are summed into one scalar, as the shared training loop wants: the decoder's term reaches the discriminator only
through detached copies of its weights, and the discriminator's term sees the reconstructions detached, so each part
gets exactly its own gradient from one backward pass and one optimiser. Pure torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from steps.nn import registry
from steps.nn.blocks import AutoencoderConfig
from steps.nn.config import ConfigBase
from steps.nn.vqvae import VQVAE2Config

EPS = 1e-4  # VQGAN's: keeps lambda finite when the adversarial gradient vanishes
MAX_LAMBDA = 1e4


@dataclass(frozen=True)
class AdversaryConfig(ConfigBase):
    """The discriminator and the loss weights of an adversarial decoder fine-tune (what ``tune_decoder`` sets).

    Attributes:
        disc_channels: width of the discriminator's first layer (doubling per stride-2 layer, at most 8x).
        disc_layers: stride-2 layers; with the two stride-1 layers after them a logit sees a patch of
            ``16 * 2**disc_layers - 10`` pixels (22 for 2, 54 for 3).
        l1_weight, mse_weight: the reconstruction term.
        gan_weight: the adversarial term's weight on top of the adaptive ``lambda`` (0: reconstruction only).
        gan_start: updates with the discriminator alone before the decoder sees its loss.
    """

    disc_channels: int = 64
    disc_layers: int = 2
    l1_weight: float = 1.0
    mse_weight: float = 1.0
    gan_weight: float = 0.5
    gan_start: int = 200

    def validate(self) -> None:
        self.require("disc_channels", self.disc_channels >= 8 and self.disc_channels % 8 == 0, "a multiple of 8")
        self.require_min(1, "disc_layers")
        self.require_min(0, "l1_weight", "mse_weight", "gan_weight", "gan_start")
        self.require("l1_weight", self.l1_weight + self.mse_weight > 0, "> 0 where mse_weight is 0")

    def adversary(self) -> dict[str, Any]:
        """These settings, for a subclass's sibling (``DecoderGANConfig(autoencoder=..., **cfg.adversary())``)."""
        return {f.name: getattr(self, f.name) for f in fields(AdversaryConfig)}


@dataclass(frozen=True)
class DecoderGANConfig(AdversaryConfig):
    """An autoencoder's decoder with a patch discriminator, for adversarial fine-tuning (the role ``adversarial``).

    Attributes:
        autoencoder: the trained model's config (a kind with codes); its encoder and codebooks stay frozen.
    """

    role: ClassVar[str] = "adversarial"

    autoencoder: AutoencoderConfig = field(default_factory=VQVAE2Config)

    def validate(self) -> None:
        super().validate()
        if not self.autoencoder.levels:
            raise self.error(
                "autoencoder", f"must be a model with codes ({registry.kind_of(self.autoencoder)} has none): only a "
                "VQ model's decoder can be retrained with its codes frozen"
            )  # fmt: skip
        self.require("disc_layers", 2**self.disc_layers <= self.autoencoder.image_size // 4,
                     f"in [1, log2(image_size / 4)] for {self.autoencoder.image_size}px images")  # fmt: skip


class PatchDiscriminator(nn.Module):
    """A real/fake logit per image patch: stride-2 4x4 convolutions, then two stride-1 ones (pix2pix's
    ``NLayerDiscriminator``), with group norm, which unlike batch norm does not depend on the batch or its split
    over workers."""

    def __init__(self, in_channels: int, channels: int, layers: int) -> None:
        super().__init__()
        mods: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        ch = channels
        for _ in range(layers - 1):
            out = min(ch * 2, channels * 8)
            mods += [nn.Conv2d(ch, out, 4, stride=2, padding=1), nn.GroupNorm(8, out), nn.LeakyReLU(0.2)]
            ch = out
        out = min(ch * 2, channels * 8)
        mods += [nn.Conv2d(ch, out, 4, stride=1, padding=1), nn.GroupNorm(8, out), nn.LeakyReLU(0.2)]
        mods.append(nn.Conv2d(out, 1, 4, stride=1, padding=1))
        self.net = nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # (B, 1, h, w) logits


class GANOutput(NamedTuple):
    loss: torch.Tensor  # scalar: decoder and discriminator terms together
    recon: torch.Tensor  # (B, C, S, S) the decoder's images of the frozen codes
    stats: dict[str, torch.Tensor]  # detached scalars to log


def hinge_d_loss(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean())


def last_layer(modules: list[nn.Module]) -> torch.Tensor:
    """The weight of the last convolution of the last module: where the adaptive weight compares gradients."""
    convs = [m for m in modules[-1].modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    return convs[-1].weight


class DecoderGAN(nn.Module):
    """A trained VQ model whose decoder alone learns, against a patch discriminator (module docstring)."""

    config_cls = DecoderGANConfig

    def __init__(self, config: DecoderGANConfig) -> None:
        super().__init__()
        self.config = config
        self.autoencoder = registry.build(config.autoencoder)
        ae_cfg = config.autoencoder
        self.disc = PatchDiscriminator(ae_cfg.in_channels, config.disc_channels, config.disc_layers)
        tuned = self.autoencoder.decoder_parameter_names()
        for name, p in self.autoencoder.named_parameters():
            p.requires_grad_(name in tuned)
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))  # resumes with the weights

    def train(self, mode: bool = True) -> DecoderGAN:
        super().train(mode)
        self.autoencoder.eval()  # always: no codebook (EMA) updates or restarts, so the codes stay as they are
        return self

    def forward(self, x: torch.Tensor) -> GANOutput:
        cfg = self.config
        with torch.no_grad():
            quantized = self.autoencoder.encode(x).quantized
        recon = self.autoencoder.decode(quantized)  # (B, C, S, S)
        mse = F.mse_loss(recon, x)
        l1 = F.l1_loss(recon, x)
        rec = cfg.l1_weight * l1 + cfg.mse_weight * mse
        d_loss = hinge_d_loss(self.disc(x), self.disc(recon.detach()))
        frozen = {k: v.detach() for k, v in self.disc.named_parameters()}
        adv = -functional_call(self.disc, frozen, (recon,)).mean()
        weight = torch.zeros((), device=x.device)
        if self.training and torch.is_grad_enabled():
            if cfg.gan_weight > 0 and int(self.updates) >= cfg.gan_start:
                weight = self.adaptive_weight(rec, adv) * cfg.gan_weight
            self.updates += 1
        loss = rec + weight * adv + d_loss
        stats = {"recon_mse": mse.detach(), "recon_l1": l1.detach(), "d_loss": d_loss.detach(),
                 "g_loss": adv.detach(), "gan_lambda": weight}  # fmt: skip
        return GANOutput(loss, recon, stats)

    def adaptive_weight(self, rec: torch.Tensor, adv: torch.Tensor) -> torch.Tensor:
        """VQGAN's lambda: the reconstruction gradient's norm over the adversarial one's, at the last layer."""
        layer = last_layer(self.autoencoder.decoder_modules())
        g_rec = torch.autograd.grad(rec, layer, retain_graph=True)[0]
        g_adv = torch.autograd.grad(adv, layer, retain_graph=True)[0]
        return (g_rec.norm() / (g_adv.norm() + EPS)).clamp(0.0, MAX_LAMBDA).detach()
