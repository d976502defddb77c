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

from steps.nn.blocks import Autoencoder, ConfigBase, Decoder, Encoder, check_positive, log2_exact
from steps.nn.vqvae import AutoencoderOutput


@dataclass(frozen=True)
class VAEConfig(ConfigBase):
    image_size: int = 32
    in_channels: int = 3
    channels: int = 128
    res_blocks: int = 2
    res_channels: int = 32
    latent_channels: int = 16
    downsample: int = 4
    kl_weight: float = 1.0

    def __post_init__(self) -> None:
        log2_exact("VAEConfig", "downsample", self.downsample)
        check_positive(
            "VAEConfig",
            in_channels=self.in_channels,
            channels=self.channels,
            res_channels=self.res_channels,
            latent_channels=self.latent_channels,
        )
        if self.res_blocks < 0:
            raise ValueError(f"VAEConfig.res_blocks must be >= 0, got {self.res_blocks}")
        if self.kl_weight < 0:
            raise ValueError(f"VAEConfig.kl_weight must be >= 0, got {self.kl_weight}")
        if not 32 <= self.image_size <= 256 or self.image_size % self.downsample:
            raise ValueError(
                f"VAEConfig.image_size must be in [32, 256] and a multiple of {self.downsample}, got {self.image_size}"
            )

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        side = self.image_size // self.downsample
        return (self.latent_channels, side, side)


class VAE(Autoencoder):
    kind = "vae"
    config_cls = VAEConfig
    levels: tuple[str, ...] = ()

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
