"""A small image classifier for classifier-based rejection sampling (VQ-VAE-2, Razavi et al. 2019, section 4).

The paper trades diversity for quality by drawing class-conditional samples and keeping those a pretrained
classifier assigns a high enough probability of the class they were drawn for. This is the classifier: a few strided
3x3 convolutions, global average pooling and a linear layer, on images in [-1, 1] at the VQ-VAE's image size. It is
deliberately small: it only has to tell the classes of the training images apart, and it runs on every sample.

:func:`fit_classifier` trains one in-process on a tensor of images; ``python -m steps.train_classifier`` wraps it
for the shard step's image shards.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from steps.nn.config import ConfigBase


@dataclass(frozen=True)
class ClassifierConfig(ConfigBase):
    """Hyper-parameters of an :class:`ImageClassifier`.

    Attributes:
        image_size: side S of the square input images.
        in_channels: image channels (1 or 3).
        num_classes: number of classes.
        channels: width of the first stage; each stride-2 stage doubles it.
        stages: stride-2 stages (each halves the image side).
        dropout: dropout before the linear layer while training.
    """

    role: ClassVar[str] = "classifier"

    image_size: int = 32
    in_channels: int = 3
    num_classes: int = 10
    channels: int = 32
    stages: int = 3
    dropout: float = 0.1

    def validate(self) -> None:
        self.require_min(1, "image_size", "in_channels", "channels")
        self.require_min(2, "num_classes")
        self.require_min(0, "stages")
        self.require(
            "stages", self.image_size % 2**self.stages == 0, f"such that 2**stages divides image_size={self.image_size}"
        )
        self.require("dropout", 0 <= self.dropout < 1, "in [0, 1)")


class ImageClassifier(nn.Module):
    """Images (B, C, S, S) in [-1, 1] -> class logits (B, num_classes) (kind ``classifier``)."""

    config_cls = ClassifierConfig

    def __init__(self, config: ClassifierConfig) -> None:
        super().__init__()
        self.config = config
        c = config.channels
        layers: list[nn.Module] = [nn.Conv2d(config.in_channels, c, 3, padding=1), nn.ReLU()]
        for _ in range(config.stages):
            layers += [nn.Conv2d(c, 2 * c, 3, stride=2, padding=1), nn.BatchNorm2d(2 * c), nn.ReLU()]
            c *= 2
        self.features = nn.Sequential(*layers)
        self.dropout = nn.Dropout(config.dropout)
        self.out = nn.Linear(c, config.num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.dropout(self.embed(x)))  # (B, num_classes)

    def embed(self, x: Tensor) -> Tensor:
        """The globally average-pooled features (B, channels * 2**stages) the linear layer reads: the evaluate step's
        second feature space, learnt on the shards' own images rather than on ImageNet."""
        cfg = self.config
        if x.dim() != 4 or tuple(x.shape[1:]) != (cfg.in_channels, cfg.image_size, cfg.image_size):
            want = (cfg.in_channels, cfg.image_size, cfg.image_size)
            raise ValueError(f"expected images of shape (B, {', '.join(map(str, want))}), got {tuple(x.shape)}")
        return self.features(x).mean(dim=(2, 3))  # (B, C'), global average pooling

    @torch.no_grad()
    def class_probability(self, x: Tensor, labels: Tensor) -> Tensor:
        """Probability (B,) the classifier (in eval mode) gives each image's own label."""
        was_training = self.training
        self.eval()
        try:
            return torch.softmax(self(x).float(), dim=1).gather(1, labels.long()[:, None]).squeeze(1)
        finally:
            self.train(was_training)


def fit_classifier(
    model: ImageClassifier,
    images: Tensor,
    labels: Tensor,
    steps: int = 300,
    batch_size: int = 64,
    lr: float = 2e-3,
    generator: torch.Generator | None = None,
) -> list[float]:
    """Train ``model`` in place with AdamW on random mini-batches of ``images`` (N, C, S, S) and ``labels`` (N,).

    Light augmentation (random shifts of up to 2 pixels) keeps a small data set from being memorised.

    Returns:
        The training loss of every step; the model is left in eval mode.
    """
    if images.shape[0] != labels.shape[0] or images.shape[0] == 0:
        raise ValueError(f"need as many labels as images (> 0), got {images.shape[0]} and {labels.shape[0]}")
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1))
    model.train()
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, images.shape[0], (min(batch_size, images.shape[0]),), generator=generator)
        x = images[idx]  # (b, C, S, S)
        shift = torch.randint(-2, 3, (2,), generator=generator).tolist()
        x = torch.roll(F.pad(x, (2, 2, 2, 2), value=-1.0), shifts=shift, dims=(2, 3))[:, :, 2:-2, 2:-2]
        loss = F.cross_entropy(model(x), labels[idx].long())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    return losses
