"""Every step's settings check themselves on construction and name the field at fault (no Ray, no Hydra).

How the pipeline re-labels these errors with the user's key (``data.image_size``) is tests/unit/test_config.py's.
"""

from __future__ import annotations

import re

import pytest

from steps.encode import EncodeConfig
from steps.evaluate import EvaluateConfig
from steps.nn.config import FieldError
from steps.sample import SampleConfig
from steps.shard import ShardConfig
from steps.train_classifier import TrainClassifierConfig
from steps.train_prior import LevelPriors, TrainPriorConfig
from steps.train_vqvae import TrainVQVAEConfig
from steps.training.task import TrainConfig

BAD = [
    # shard
    (ShardConfig, {"source": "webdataset"}, "source"),
    (ShardConfig, {"source": "image_folder"}, "path"),
    (ShardConfig, {"path": "/data"}, "path"),
    (ShardConfig, {"image_size": 36}, "image_size must be a multiple of 8 in [32, 1024], got 36"),
    (ShardConfig, {"image_size": 2048}, "image_size"),
    (ShardConfig, {"image_size": "32"}, "image_size must be an integer"),
    (ShardConfig, {"channels": 2}, "channels"),
    (ShardConfig, {"val_fraction": 1.0}, "val_fraction"),
    (ShardConfig, {"val_fraction": -0.1}, "val_fraction"),
    (ShardConfig, {"rows_per_shard": 0}, "rows_per_shard"),
    (ShardConfig, {"limit": 0}, "limit"),
    (ShardConfig, {"on_bad_file": "ignore"}, "on_bad_file"),
    (ShardConfig, {"image_column": ""}, "image_column"),
    (ShardConfig, {"label_column": ""}, "label_column"),
    (ShardConfig, {"id_column": ""}, "id_column"),
    # training
    (TrainConfig, {"lr": -1.0}, "lr must be a positive number"),
    (TrainConfig, {"lr": float("inf")}, "lr"),
    (TrainConfig, {"steps": 0}, "steps"),
    (TrainConfig, {"lr_schedule": "step"}, "lr_schedule"),
    (TrainConfig, {"grad_clip": -1.0}, "grad_clip"),
    (TrainConfig, {"use_gpu": "yes"}, "use_gpu must be true or false"),
    (TrainConfig, {"min_workers": -1}, "min_workers"),
    (TrainConfig, {"num_workers": 2, "min_workers": 3}, "min_workers must be at most num_workers (2), got 3"),
    (TrainVQVAEConfig, {"grid_images": 0}, "grid_images"),
    (TrainVQVAEConfig, {"model": {"kind": "gan"}}, "model unknown autoencoder kind 'gan'"),
    (TrainPriorConfig, {"class_conditional": 1}, "class_conditional"),
    (LevelPriors, {"top": {"kernel_size": 4}}, "kernel_size must be odd"),
    (LevelPriors, {"middle": {"kernel_size": 4}}, "kernel_size must be odd"),
    # encode
    (EncodeConfig, {"batch_size": 0}, "batch_size"),
    (EncodeConfig, {"num_actors": 1.5}, "num_actors"),
    (EncodeConfig, {"cpus_per_actor": 0}, "cpus_per_actor"),
    # sample
    (SampleConfig, {"num_samples": 0}, "num_samples"),
    (SampleConfig, {"shard_size": -1}, "shard_size"),
    (SampleConfig, {"temperature": 0.0}, "temperature"),
    (SampleConfig, {"labels": [-1]}, "labels"),
    (SampleConfig, {"labels": []}, "labels"),
    (SampleConfig, {"seed": -1}, "seed"),
    (SampleConfig, {"num_actors": 0}, "num_actors"),
    (SampleConfig, {"grid_size": 0}, "grid_size"),
    (SampleConfig, {"write_pngs": 1}, "write_pngs"),
    (SampleConfig, {"top_k": -1}, "top_k"),
    (SampleConfig, {"top_k": 1.5}, "top_k"),
    (SampleConfig, {"top_p": 0.0}, "top_p"),
    (SampleConfig, {"top_p": 1.5}, "top_p"),
    (SampleConfig, {"reject_threshold": 1.0}, "reject_threshold"),
    (SampleConfig, {"reject_threshold": -0.1}, "reject_threshold"),
    (SampleConfig, {"reject_threshold": 0.5}, "reject_threshold > 0 needs sample.classifier"),
    (SampleConfig, {"max_attempts": 0}, "max_attempts"),
    (SampleConfig, {"classifier": ""}, "classifier"),
    # evaluate
    (EvaluateConfig, {"max_val_images": 2}, "max_val_images"),
    (EvaluateConfig, {"knn_k": 0}, "knn_k"),
    (EvaluateConfig, {"use_gpu": "yes"}, "use_gpu"),
    # the rejection classifier
    (TrainClassifierConfig, {"steps": 0}, "steps"),
    (TrainClassifierConfig, {"lr": 0.0}, "lr"),
]


@pytest.mark.parametrize(("cls", "kwargs", "message"), BAD, ids=[f"{c.__name__}-{m.split()[0]}" for c, _, m in BAD])
def test_bad_values_fail_naming_the_field(cls, kwargs, message):
    with pytest.raises(FieldError, match=re.escape(message)) as err:
        cls(**kwargs)
    assert message.startswith(err.value.field) or err.value.field == "model", "the error carries the field"


@pytest.mark.parametrize("cls", sorted({c for c, _, _ in BAD}, key=lambda c: c.__name__), ids=lambda c: c.__name__)
def test_defaults_are_valid_and_round_trip(cls):
    cfg = cls()
    assert cls.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(FieldError, match="is not a setting"):
        cls.from_dict({**cfg.to_dict(), "bogus": 1})


def test_a_few_valid_non_defaults():
    ShardConfig(source="parquet", path="x.parquet", val_fraction=0, label_column=None, limit=5)
    assert SampleConfig(labels=(1, 2)).labels == [1, 2]  # a tuple (or Hydra's ListConfig) becomes a list
    assert TrainConfig(lr=1).lr == 1.0 and isinstance(TrainConfig(lr=1).lr, float)
    # Ray Train's ScalingConfig(num_workers=...): (min, max) only when elastic training is asked for
    assert [TrainConfig(num_workers=4, min_workers=m).workers for m in (0, 1, 4)] == [4, (1, 4), 4]


def test_settings_that_cannot_change_results_are_marked_on_the_field():
    """What the fingerprint leaves out comes from the fields' metadata, not from a list of names."""
    base = TrainConfig().result_dict()
    assert "max_failures" not in base and "cache_data" not in base and "min_workers" not in base and "lr" in base
    sample = SampleConfig().result_dict()
    assert "num_actors" not in sample and "cpus_per_actor" not in sample and "seed" in sample
    assert "num_actors" not in EncodeConfig().result_dict()
    nested = TrainVQVAEConfig().result_dict()
    assert "max_failures" not in nested["train"] and nested["model"]["quantizer"]["__type__"] == "EMAQuantizerConfig"
