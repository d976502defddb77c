"""tune_decoder on local Ray: two DDP workers retrain the decoder against a discriminator, the codes stay the model's,
and bad inputs are refused before training."""

import json
from dataclasses import replace

import pytest
import torch

from steps import tune_decoder
from steps.artifacts.autoencoder import Autoencoder, TunedAutoencoder
from steps.artifacts.base import Upstream
from steps.core.step import JsonlSink, MissingInputError
from steps.nn import registry
from steps.nn.config import FieldError

TRAIN = dict(steps=6, lr=1e-3, checkpoint_every=3, log_every=3, val_batches=1, max_failures=0, batch_size=16)


@pytest.fixture(scope="module")
def cfg(tiny):
    return tiny("tune_decoder.enabled=true", "tune_decoder.gan_start=3", "tune_decoder.grid_images=4",
                *tiny.overrides("tune_decoder.train", **TRAIN)).tune_decoder  # fmt: skip


@pytest.fixture(scope="module")
def base(artifacts, tmp_path_factory) -> str:
    return artifacts.autoencoder(tmp_path_factory.mktemp("vq"), artifacts.small_vqvae2())


def test_two_workers_tune_the_decoder_and_keep_the_codes(ray_local, digit_shards, base, tmp_path, cfg):
    """Two gloo workers (the loop's replica check proves both ranks hold the same decoder and discriminator)."""
    sink = JsonlSink(str(tmp_path / "metrics.jsonl"))
    two = replace(cfg, train=replace(cfg.train, num_workers=2))
    result = tune_decoder.run(two, {"shard": digit_shards, "train_vqvae": base}, str(tmp_path / "out"), sink=sink)

    tuned, original = TunedAutoencoder.open(str(tmp_path / "out")), Autoencoder.open(base)
    assert tuned.verify(Upstream({Autoencoder: base})) == {}, "encoder and codebooks are the base's, bit for bit"
    assert tuned.decoder_of == original.model_uri == result.info["decoder_of"] and result.info["step"] == 6
    assert tuned.codes_digest == original.digest != tuned.digest
    assert set(tuned.checkpoint.state_dict()) == set(original.checkpoint.state_dict()), "no discriminator weights"
    model = tuned.load()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, original.checkpoint.state_dict()[k])}
    assert changed == model.decoder_parameter_names()
    assert (tmp_path / "out" / "recon.png").stat().st_size > 0 and result.metrics["val_recon_mse"] > 0
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in logged if "train/loss" in r]
    assert [r["step"] for r in train] == [3, 6]
    assert train[0]["train/gan_lambda"] == 0 < train[-1]["train/gan_lambda"], "the adversarial term starts at update 4"
    assert {"train/d_loss", "train/g_loss", "train/recon_l1"} <= set(train[0])


def test_clear_errors(digit_shards, base, artifacts, tiny, tmp_path, cfg):
    with pytest.raises(MissingInputError, match="run the train_vqvae step"):
        tune_decoder.run(cfg, {"shard": digit_shards}, str(tmp_path / "out"))
    rgb = artifacts.autoencoder(tmp_path / "rgb", artifacts.small_vqvae2(in_channels=3))
    with pytest.raises(ValueError, match=r"1-channel 32px images, but the autoencoder .* takes 3x32x32"):
        tune_decoder.run(cfg, {"shard": digit_shards, "train_vqvae": rgb}, str(tmp_path / "out"))
    vae = artifacts.autoencoder(tmp_path / "vae", registry.build(tiny(tiny.SMALL[0], "model=vae").train_vqvae.model))
    with pytest.raises(FieldError, match="DecoderGANConfig.autoencoder must be a model with codes"):
        tune_decoder.run(cfg, {"shard": digit_shards, "train_vqvae": vae}, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists(), "nothing is written before the inputs are checked"
