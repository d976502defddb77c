"""Gaussian VAE baseline (Kingma & Welling 2014) with the same encoder/decoder as the VQ models.

The encoder predicts a diagonal Gaussian posterior q(z|x) over a latent map at ``image_size / downsample``; a sample is
drawn with the reparameterisation trick z = mu + sigma * eps. The training loss is the negative ELBO per pixel:
the reconstruction MSE plus ``kl_weight`` times KL(q(z|x) || N(0, I)) divided by the number of image values, so the
two terms are on the scale the VQ models report. New images decode draws from the prior N(0, I).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from steps.nn.blocks import Autoencoder, AutoencoderOutput, Decoder, Encoder, SingleScaleConfig


@dataclass(frozen=True)
class VAEConfig(SingleScaleConfig):
    latent_channels: int = 16
    kl_weight: float = 1.0

    def validate(self) -> None:
        super().validate()
        self.require_min(1, "latent_channels")
        self.require_min(0, "kl_weight")

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        side = self.image_size // self.downsample
        return (self.latent_channels, side, side)


class VAE(Autoencoder):
    """Gaussian VAE (kind ``vae``): no code levels; new images decode N(0, I) draws (:meth:`sample`)."""

    config_cls = VAEConfig

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.config = config
        c, rb, rc = config.channels, config.res_blocks, config.res_channels
        self.enc = Encoder(config.in_channels, c, rb, rc, factor=config.downsample)
        self.to_posterior = nn.Conv2d(c, 2 * config.latent_channels, 1)
        self.dec = Decoder(config.latent_channels, config.in_channels, c, rb, rc, factor=config.downsample)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and log-variance, each (B, latent_channels, S/d, S/d)."""
        c, s = self.config.in_channels, self.config.image_size
        if x.dim() != 4 or tuple(x.shape[1:]) != (c, s, s):
            raise ValueError(f"expected images of shape (B, {c}, {s}, {s}), got {tuple(x.shape)}")
        mu, logvar = self.to_posterior(self.enc(x)).chunk(2, dim=1)
        return mu, logvar.clamp(-30.0, 20.0)  # keeps exp() finite early in training

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.dec(z)

    def forward(self, x: torch.Tensor) -> AutoencoderOutput:
        mu, logvar = self.encode(x)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if self.training else mu
        recon = self.decode(z)
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum() / x.numel()  # nats per image value
        return AutoencoderOutput(recon, F.mse_loss(recon, x), self.config.kl_weight * kl, {"kl": kl.detach()})

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None, temperature: float = 1.0) -> torch.Tensor:
        """Decode ``n`` draws from the prior N(0, temperature^2 I): (n, C, S, S)."""
        device = next(self.parameters()).device
        on = generator.device if generator is not None else device  # a CPU generator draws on the CPU
        z = torch.randn((n, *self.config.latent_shape), generator=generator, device=on).to(device) * temperature
        return self.decode(z)
