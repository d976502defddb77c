"""The ``tune_decoder`` step: retrain a VQ model's decoder adversarially, its codes frozen (VQGAN, Esser et al. 2021).

Optional (``tune_decoder.enabled``). It reads train_vqvae's autoencoder and the shard step's images, trains
:class:`steps.nn.adversarial.DecoderGAN` (the decoder against a patch discriminator from scratch, L1 + MSE plus the
adaptively weighted hinge loss) with :func:`steps.training.loop.fit`, and writes an autoencoder artifact
(:class:`steps.artifacts.autoencoder.TunedAutoencoder`): the same model with the new decoder, its checkpoint naming
the model it came from. Encoder and codebooks are untouched, so the code dataset and the priors of train_vqvae's model
stay valid: sample, evaluate and the registered models decode with the tuned decoder, while encode and train_prior
(and their cached outputs) do not depend on this step. Turning it on, or changing it, reruns only sample and evaluate.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from steps.artifacts.autoencoder import CODES_OF, DECODER_OF, RECON_GRID, Autoencoder, AutoencoderWriter
from steps.artifacts.checkpoints import CheckpointFile
from steps.artifacts.images import ImageShards
from steps.core.step import MetricsSink, StepResult, TaskWrap, require_input
from steps.nn.adversarial import AdversaryConfig, DecoderGANConfig
from steps.training.images import AutoencoderTask, image_dataset
from steps.training.loop import checkpoint_file, final_payload, fit
from steps.training.task import TrainConfig

STEP = "tune_decoder"
PREFIX = "autoencoder."  # where DecoderGAN keeps the autoencoder's weights


@dataclass(frozen=True)
class TuneDecoderConfig(AdversaryConfig):
    """Settings of the tune_decoder step: the discriminator and loss weights
    (:class:`steps.nn.adversarial.AdversaryConfig`), and how to train.

    Attributes:
        enabled: run the step; off, sample and evaluate decode with train_vqvae's decoder.
        train: how to train; ``lr`` is the decoder's and the discriminator's.
    """

    enabled: bool = False
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(steps=1000, lr=1e-4, warmup_steps=0, lr_schedule="constant")
    )
    grid_images: int = 16  # val images shown in recon.png

    def validate(self) -> None:
        super().validate()
        self.require("grid_images", self.grid_images >= 1, ">= 1")
        self.require("gan_start", self.gan_start < self.train.steps or self.gan_weight == 0,
                     f"< train.steps ({self.train.steps}), or the adversarial term never starts")  # fmt: skip

    def model(self, autoencoder: Any) -> DecoderGANConfig:
        """The trained model of ``autoencoder``'s config (a VQ kind) with this step's discriminator and losses."""
        return DecoderGANConfig(autoencoder=autoencoder, **self.adversary())


class DecoderTuneTask(AutoencoderTask):
    """Trains :class:`~steps.nn.adversarial.DecoderGAN` from the weights of ``base`` (the discriminator fresh)."""

    def __init__(self, model_config: DecoderGANConfig, base: CheckpointFile, grid_images: int) -> None:
        super().__init__(model_config, grid_images)
        self.name = STEP
        self.base = base  # travels without its bytes; read (and digest-checked) again on the worker

    def build_model(self) -> torch.nn.Module:
        model = super().build_model()
        model.autoencoder.load_state_dict(self.base.state_dict())
        return model

    def loss(self, model, x):
        out = model(x)
        return out.loss, out.stats


def autoencoder_payload(payload: Mapping[str, Any], base: Autoencoder) -> dict[str, Any]:
    """The autoencoder checkpoint of a finished tune: ``base``'s kind and config, the tuned weights (without the
    discriminator), and where it came from."""
    weights = {k[len(PREFIX) :]: v for k, v in payload["model"].items() if k.startswith(PREFIX)}
    return {
        "format": payload["format"],
        "kind": base.kind,
        "config": base.config.to_dict(),
        "model": weights,
        "step": payload["step"],
        "metrics": payload["metrics"],
        CODES_OF: base.codes_digest,
        DECODER_OF: base.model_uri,
    }


def run(
    cfg: TuneDecoderConfig, inputs: Mapping[str, str], out: str, sink: MetricsSink | None = None,
    wrap_task: TaskWrap | None = None,
) -> StepResult:  # fmt: skip
    """Retrain the decoder of ``inputs["train_vqvae"]`` on the images of ``inputs["shard"]``; write the tuned
    autoencoder to ``out``.

    Raises:
        MissingInputError: no finished shard or train_vqvae output.
        FieldError: the autoencoder makes no codes (a VAE), or the discriminator does not fit its images.
        ValueError: the shards' images differ from the model's.
    """
    shards = ImageShards.open(require_input(inputs, STEP, "shard"))
    base = Autoencoder.open(require_input(inputs, STEP, "train_vqvae"))
    if shards.image_shape != base.image_shape:
        raise ValueError(
            f"image shards at {shards.uri} hold {shards.channels}-channel {shards.image_size}px images, but the "
            f"autoencoder {base.model_uri} takes {'x'.join(map(str, base.image_shape))}"
        )
    model_cfg = cfg.model(base.config)
    datasets = {"train": image_dataset(shards, "train")}
    val = image_dataset(shards, "val")
    if val is not None:
        datasets["val"] = val
    writer = AutoencoderWriter(out)
    task = DecoderTuneTask(model_cfg, base.checkpoint, cfg.grid_images)
    result = fit(task, cfg.train, datasets, storage=writer.train_state, name=STEP, sink=sink, wrap_task=wrap_task)
    payload = autoencoder_payload(final_payload(result), base)
    metrics = {k.replace("/", "_"): float(v) for k, v in (result.metrics or {}).items()}
    grid = checkpoint_file(result, RECON_GRID) if val is not None else None
    artifacts = writer.write(payload, grid, {"step": payload["step"], **metrics})
    info = {"kind": base.kind, "step": int(payload["step"]), "decoder_of": base.model_uri}
    return StepResult(metrics=metrics, artifacts=artifacts, info=info)
