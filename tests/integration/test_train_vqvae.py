"""train_vqvae on local Ray: a short run, its artifacts and metrics, resume after a crash, model variants."""

import json
from dataclasses import replace

import pytest
import torch

from steps import train_vqvae
from steps.common import JsonlSink, MissingInputError
from steps.nn.checkpoint import load_model
from steps.nn.vae import VAEConfig
from steps.nn.vqvae import VQVAE2Config, VQVAEConfig
from steps.training import NonFiniteLossError, TrainConfig

TINY_TRAIN = TrainConfig(
    batch_size=16,
    steps=12,
    lr=2e-3,
    warmup_steps=2,
    checkpoint_every=6,
    log_every=3,
    val_batches=2,
    max_failures=0,
    cpus_per_worker=1,
)
TINY_VQ = {
    "image_size": 32,
    "in_channels": 1,
    "channels": 16,
    "res_channels": 8,
    "res_blocks": 1,
    "codebook_size": 32,
    "embed_dim": 8,
}


def read_sink(path):
    return [json.loads(line) for line in open(path)]


def test_train_vqvae2(ray_local, digit_shards, tmp_path):
    cfg = train_vqvae.TrainVQVAEConfig(model=VQVAE2Config(**TINY_VQ), train=TINY_TRAIN, grid_images=8)
    sink = JsonlSink(str(tmp_path / "metrics.jsonl"))
    result = train_vqvae.run(cfg, {"shard": digit_shards}, str(tmp_path / "out"), sink=sink)

    model, payload = load_model(tmp_path / "out" / "model.pt", expect="vqvae2")
    assert payload["step"] == 12 and "optimizer" not in payload
    assert model.config == cfg.model
    assert (tmp_path / "out" / "recon.png").stat().st_size > 0
    assert result.metrics["val_recon_mse"] > 0 and result.metrics["step"] == 12
    logged = read_sink(tmp_path / "metrics.jsonl")
    train_steps = [r["step"] for r in logged if "train/loss" in r]
    assert train_steps == [3, 6, 9, 12]
    assert {"train/recon_mse", "train/perplexity_top", "train/usage_bottom", "train/lr"} <= set(logged[0])
    assert any("val/psnr" in r for r in logged)
    first, last = logged[0]["train/loss"], [r for r in logged if "train/loss" in r][-1]["train/loss"]
    assert last < first, "loss must fall over the run"


def test_two_workers_ddp(ray_local, digit_shards, tmp_path):
    """Two gloo workers: DDP trains, and the loop's replica check proves the codebooks stayed identical."""
    train = replace(TINY_TRAIN, num_workers=2, steps=6, checkpoint_every=3)
    cfg = train_vqvae.TrainVQVAEConfig(model=VQVAE2Config(**{**TINY_VQ, "restart_after": 2}), train=train)
    result = train_vqvae.run(cfg, {"shard": digit_shards}, str(tmp_path / "out"))
    assert result.info["step"] == 6
    model, _ = load_model(tmp_path / "out" / "model.pt", expect="vqvae2")
    assert int(model.quantizers["bottom"].restarts) > 0, "restarts happened, and replicas still matched"


def test_resume_after_a_crash_continues_from_the_checkpoint(ray_local, digit_shards, tmp_path):
    """Rank 0's process is killed (SIGKILL) after step 10, past the step-6 checkpoint and the step-9 log line: Ray
    Train restarts the workers from step 6, not from 0, and step 9 is not logged a second time."""
    train = replace(TINY_TRAIN, fail_at_step=10, max_failures=1)
    cfg = train_vqvae.TrainVQVAEConfig(model=VQVAE2Config(**TINY_VQ), train=train)
    sink = JsonlSink(str(tmp_path / "metrics.jsonl"))
    train_vqvae.run(cfg, {"shard": digit_shards}, str(tmp_path / "out"), sink=sink)
    logged = read_sink(tmp_path / "metrics.jsonl")
    steps = [r["step"] for r in logged if "train/loss" in r]
    # Steps 3, 6, 9 logged, crash after 10, resume from the step-6 checkpoint: 9 is not repeated, 12 follows.
    assert steps == [3, 6, 9, 12]
    assert [r["step"] for r in logged if "train/resumed_from" in r] == [6], "the restart shows in the metrics"
    assert torch.load(tmp_path / "out" / "model.pt", weights_only=True)["step"] == 12


def test_crash_without_retries_fails_then_rerun_resumes(ray_local, digit_shards, tmp_path):
    train = replace(TINY_TRAIN, fail_at_step=8, fail_mode="raise", max_failures=0)
    cfg = train_vqvae.TrainVQVAEConfig(model=VQVAE2Config(**TINY_VQ), train=train)
    sink = JsonlSink(str(tmp_path / "metrics.jsonl"))
    with pytest.raises(Exception, match="injected fault"):
        train_vqvae.run(cfg, {"shard": digit_shards}, str(tmp_path / "out"), sink=sink)
    assert not (tmp_path / "out" / "model.pt").exists()
    train_vqvae.run(cfg, {"shard": digit_shards}, str(tmp_path / "out"), sink=sink)  # same out: resumes
    steps = [r["step"] for r in read_sink(tmp_path / "metrics.jsonl") if "train/loss" in r]
    assert steps == [3, 6, 9, 12]


def test_nonfinite_loss_stops_every_rank_at_once_and_keeps_the_last_checkpoint(ray_local, digit_shards, tmp_path):
    """Rank 0's loss turns NaN at step 8 of a two-worker run: both ranks stop (rank 1 does not hang in the next
    all-reduce), Ray Train does not retry although max_failures allows it, and the step-6 checkpoint survives."""
    train = replace(TINY_TRAIN, num_workers=2, nan_at_step=8, max_failures=2)
    cfg = train_vqvae.TrainVQVAEConfig(model=VQVAE2Config(**TINY_VQ), train=train)
    sink = JsonlSink(str(tmp_path / "metrics.jsonl"))
    out = tmp_path / "out"
    with pytest.raises(NonFiniteLossError, match=r"rank\(s\) \[0\] at step 8.*last good checkpoint \(step 6\)"):
        train_vqvae.run(cfg, {"shard": digit_shards}, str(out), sink=sink)
    logged = read_sink(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in logged if "train/loss" in r] == [3, 6]
    assert not any("train/resumed_from" in r for r in logged), "a diverged run is not retried"
    assert not (out / "model.pt").exists()
    kept = [torch.load(p, weights_only=True)["step"] for p in out.glob("ray/**/checkpoint_*/model.pt")]
    assert max(kept) == 6


@pytest.mark.parametrize(
    "model",
    [VQVAEConfig(**TINY_VQ), VAEConfig(image_size=32, in_channels=1, channels=16, res_channels=8, res_blocks=1)],
    ids=["vqvae", "vae"],
)
def test_other_models(ray_local, digit_shards, tmp_path, model):
    cfg = train_vqvae.TrainVQVAEConfig(model=model, train=replace(TINY_TRAIN, steps=6))
    train_vqvae.run(cfg, {"shard": digit_shards}, str(tmp_path / "out"))
    loaded, _ = load_model(tmp_path / "out" / "model.pt")
    assert loaded.config == model


def test_clear_errors(digit_shards, tmp_path):
    cfg = train_vqvae.TrainVQVAEConfig(model=VQVAE2Config(**{**TINY_VQ, "in_channels": 3}), train=TINY_TRAIN)
    with pytest.raises(ValueError, match="model.in_channels=3"):
        train_vqvae.run(cfg, {"shard": digit_shards}, str(tmp_path / "out"))
    with pytest.raises(MissingInputError, match=r"run the shard step"):
        train_vqvae.run(cfg, {}, str(tmp_path / "out"))
    with pytest.raises(FileNotFoundError, match=r"run the shard step"):
        train_vqvae.run(cfg, {"shard": str(tmp_path / "nothing")}, str(tmp_path / "out"))
    with pytest.raises(ValueError, match="train_vqvae.train.lr"):
        train_vqvae.TrainVQVAEConfig(train=TrainConfig(lr=-1.0))
