"""Train the image classifier that classifier-based rejection in the sample step uses (VQ-VAE-2, section 4).

It trains :class:`steps.nn.classifier.ImageClassifier` in-process (plain torch, no Ray: a few conv layers on the
shard step's images train in about a minute on a CPU) on the ``train`` split of an image-shard output, reports the
accuracy on ``val``, and writes a format-1 checkpoint of kind ``"classifier"``. Point the sample step at it::

    python -m steps.train_classifier outputs/shard/<fingerprint> outputs/classifier.pt --steps 600
    python -m pipeline steps=[sample] sample.classifier=outputs/classifier.pt sample.reject_threshold=0.9

The classes are the shard step's labels (class sub-folders or a label column); rows without a label are skipped.
The images must have the VQ-VAE's size and channels, and the priors must be class-conditional over the same classes
(the sample step checks both).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from steps.artifacts.images import ImageShards
from steps.io import storage
from steps.io.pixels import to_float
from steps.nn.checkpoint import checkpoint_dict, to_bytes
from steps.nn.classifier import ClassifierConfig, ImageClassifier, fit_classifier
from steps.nn.config import ConfigBase

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainClassifierConfig(ConfigBase):
    """Settings of :func:`train`: optimisation and the classifier's width (its shape comes from the shards)."""

    steps: int = 600
    batch_size: int = 64
    lr: float = 2e-3
    seed: int = 0
    channels: int = 32
    stages: int = 3
    threads: int = 0  # torch threads while training; 0 keeps torch's default

    def validate(self) -> None:
        self.require_min(1, "steps", "batch_size", "channels")
        self.require("threads", self.threads >= 0, "an int >= 0")
        self.require("lr", self.lr > 0, "> 0")


def load_split(shards: ImageShards, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Labelled images of one split (unlabelled rows teach nothing): float32 (N, C, S, S) in [-1, 1], labels (N,)."""
    images, labels = shards.read_labelled(split)
    return to_float(images), torch.from_numpy(labels)


def train(cfg: TrainClassifierConfig, shards: str, out: str) -> dict[str, Any]:
    """Train a classifier on the image shards at ``shards`` and write its checkpoint to ``out`` (a file URI).

    Returns:
        ``{"train_images", "val_images", "num_classes", "train_loss", "val_accuracy", "seconds"}``
        (``val_accuracy`` is None without a labelled val split).

    Raises:
        FileNotFoundError: no finished shard output at ``shards``.
        ValueError: no labelled training images.
    """
    t0 = time.perf_counter()
    images = ImageShards.open(shards)
    channels, size = images.channels, images.image_size
    x, y = load_split(images, "train")
    if not len(y):
        raise ValueError(f"{shards}: no labelled training images; the classifier needs the shard step's labels")
    num_classes = max(int(images.num_classes or 0), int(y.max()) + 1)
    torch.manual_seed(cfg.seed)
    model = ImageClassifier(ClassifierConfig(size, channels, num_classes, cfg.channels, cfg.stages))
    g = torch.Generator().manual_seed(cfg.seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads or threads)
    try:
        losses = fit_classifier(model, x, y, cfg.steps, cfg.batch_size, cfg.lr, generator=g)
    finally:
        torch.set_num_threads(threads)
    vx, vy = load_split(images, "val")
    accuracy = None
    if len(vy):
        with torch.no_grad():
            predicted = torch.cat([model(vx[i : i + 256]).argmax(1) for i in range(0, len(vy), 256)])
        accuracy = float((predicted == vy).float().mean())
    metrics = {
        "train_images": len(y),
        "val_images": len(vy),
        "num_classes": num_classes,
        "train_loss": float(np.mean(losses[-20:])),
        "val_accuracy": accuracy,
        "seconds": time.perf_counter() - t0,
    }
    payload = checkpoint_dict(model, shards=shards, metrics=metrics, train_config=cfg.to_dict())
    storage.write_bytes(out, to_bytes(payload))
    log.info("train_classifier: %s", metrics)
    return metrics


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("shards", help="output of the shard step (its image shards)")
    parser.add_argument("out", help="where to write the classifier checkpoint, e.g. outputs/classifier.pt")
    defaults = TrainClassifierConfig().to_dict()
    for name, value in defaults.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    args = vars(parser.parse_args(argv))
    cfg = TrainClassifierConfig(**{k: args[k] for k in defaults})
    print(json.dumps(train(cfg, args["shards"], args["out"])))


if __name__ == "__main__":
    main()
