"""The ``train_vqvae`` step: train VQ-VAE-2, a one-level VQ-VAE or the Gaussian VAE baseline on image shards.

Reads the shard step's Parquet images with Ray Data (:mod:`steps.training.images`), trains with
:func:`steps.training.loop.fit` and writes the autoencoder artifact (:mod:`steps.artifacts.autoencoder`): the model, a
reconstruction grid, final metrics, and Ray Train's run state (a rerun of a crashed step resumes from it). The model
kind is whatever ``model`` configures: any autoencoder of :mod:`steps.nn.registry`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from steps.artifacts.autoencoder import RECON_GRID, AutoencoderWriter
from steps.artifacts.images import ImageShards
from steps.core.step import MetricsSink, StepResult, TaskWrap, require_input
from steps.nn import registry
from steps.nn.blocks import AutoencoderConfig
from steps.nn.config import ConfigBase
from steps.nn.vqvae import VQVAE2Config
from steps.training.images import AutoencoderTask, image_dataset
from steps.training.loop import checkpoint_file, final_payload, fit
from steps.training.task import TrainConfig


@dataclass(frozen=True)
class TrainVQVAEConfig(ConfigBase):
    model: AutoencoderConfig = field(default_factory=VQVAE2Config)  # any autoencoder kind of the registry
    train: TrainConfig = field(default_factory=TrainConfig)
    grid_images: int = 16  # val images shown in recon.png

    def validate(self) -> None:
        self.require("grid_images", self.grid_images >= 1, ">= 1")

    @property
    def kind(self) -> str:
        return registry.kind_of(self.model)


def run(
    cfg: TrainVQVAEConfig, inputs: Mapping[str, str], out: str, sink: MetricsSink | None = None,
    wrap_task: TaskWrap | None = None,
) -> StepResult:  # fmt: skip
    """Train ``cfg.model`` on the shards of ``inputs["shard"]``; write the autoencoder artifact to ``out``.

    Raises:
        MissingInputError: no finished shard output.
        ValueError: the shards' image size or channels differ from the model's.
    """
    shards = ImageShards.open(require_input(inputs, "train_vqvae", "shard"))
    model_cfg = cfg.model
    if shards.image_shape != (model_cfg.in_channels, model_cfg.image_size, model_cfg.image_size):
        raise ValueError(
            f"image shards at {shards.uri} hold {shards.channels}-channel {shards.image_size}px images, but the "
            f"model expects model.in_channels={model_cfg.in_channels}, model.image_size={model_cfg.image_size}"
        )
    datasets = {"train": image_dataset(shards, "train")}
    val = image_dataset(shards, "val")
    if val is not None:
        datasets["val"] = val
    writer = AutoencoderWriter(out)
    task = AutoencoderTask(model_cfg, cfg.grid_images)
    result = fit(task, cfg.train, datasets, storage=writer.train_state, name="train_vqvae", sink=sink,
                 wrap_task=wrap_task)  # fmt: skip
    payload = final_payload(result)
    metrics = {k.replace("/", "_"): float(v) for k, v in (result.metrics or {}).items()}
    grid = checkpoint_file(result, RECON_GRID) if val is not None else None
    artifacts = writer.write(payload, grid, {"step": payload["step"], **metrics})
    return StepResult(metrics=metrics, artifacts=artifacts, info={"kind": cfg.kind, "step": int(payload["step"])})
