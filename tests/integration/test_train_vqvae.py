"""train_vqvae on local Ray: a short run, its artifacts and metrics, resume after a crash, model variants."""

import json
from dataclasses import replace

import pytest
import torch

from pipeline.faults import Faults
from steps import train_vqvae
from steps.artifacts.autoencoder import Autoencoder
from steps.artifacts.checkpoints import TRAIN_STATE_FILE
from steps.core.step import JsonlSink, MissingInputError
from steps.training.loop import NonFiniteLossError

# debug=tiny with small codebooks, 12 steps, a log line every 3 and a checkpoint every 6 steps.
TRAIN = dict(steps=12, lr=2e-3, checkpoint_every=6, log_every=3, val_batches=2, max_failures=0)


@pytest.fixture(scope="module")
def cfg(tiny):
    return tiny(*tiny.SMALL, "train_vqvae.grid_images=8", *tiny.overrides("train_vqvae.train", **TRAIN)).train_vqvae


def read_sink(path):
    return [json.loads(line) for line in open(path)]


def test_train_vqvae2(ray_local, digit_shards, tmp_path, cfg):
    sink = JsonlSink(str(tmp_path / "metrics.jsonl"))
    result = train_vqvae.run(cfg, {"shard": digit_shards}, str(tmp_path / "out"), sink=sink)

    autoencoder = Autoencoder.open(str(tmp_path / "out"))
    assert autoencoder.kind == "vqvae2" and autoencoder.config == cfg.model
    assert autoencoder.checkpoint.extra("step") == 12 and autoencoder.checkpoint.extra("optimizer") is None
    assert result.artifacts["recon_grid"].endswith(".png") and (tmp_path / "out" / "recon.png").stat().st_size > 0
    assert result.artifacts["model"] == autoencoder.model_uri
    assert result.metrics["val_recon_mse"] > 0 and result.metrics["step"] == 12
    logged = read_sink(tmp_path / "metrics.jsonl")
    train_steps = [r["step"] for r in logged if "train/loss" in r]
    assert train_steps == [3, 6, 9, 12]
    assert {"train/recon_mse", "train/perplexity_top", "train/usage_bottom", "train/lr"} <= set(logged[0])
    assert any("val/psnr" in r for r in logged)
    first, last = logged[0]["train/loss"], [r for r in logged if "train/loss" in r][-1]["train/loss"]
    assert last < first, "loss must fall over the run"


def test_two_workers_ddp(ray_local, digit_shards, tmp_path, cfg):
    """Two gloo workers: DDP trains, and the loop's replica check proves the codebooks stayed identical."""
    train = replace(cfg.train, num_workers=2, steps=6, checkpoint_every=3)
    model = replace(cfg.model, quantizer=replace(cfg.model.quantizer, restart_after=2))
    result = train_vqvae.run(replace(cfg, model=model, train=train), {"shard": digit_shards}, str(tmp_path / "out"))
    assert result.info["step"] == 6
    trained = Autoencoder.open(str(tmp_path / "out")).load()
    assert trained.quantizers["bottom"].restart_count() > 0, "restarts happened, and replicas still matched"


def test_resume_after_a_crash_continues_from_the_checkpoint(ray_local, digit_shards, tmp_path, cfg):
    """Rank 0's process is killed (SIGKILL) after step 10, past the step-6 checkpoint and the step-9 log line: Ray
    Train restarts the workers from step 6, not from 0, and step 9 is not logged a second time."""
    sink = JsonlSink(str(tmp_path / "metrics.jsonl"))
    train_vqvae.run(replace(cfg, train=replace(cfg.train, max_failures=1)), {"shard": digit_shards},
                    str(tmp_path / "out"), sink=sink, wrap_task=Faults(kill_at={"train_vqvae": 10}).wrap)  # fmt: skip
    logged = read_sink(tmp_path / "metrics.jsonl")
    steps = [r["step"] for r in logged if "train/loss" in r]
    # Steps 3, 6, 9 logged, crash after 10, resume from the step-6 checkpoint: 9 is not repeated, 12 follows.
    assert steps == [3, 6, 9, 12]
    assert [r["step"] for r in logged if "train/resumed_from" in r] == [6], "the restart shows in the metrics"
    assert Autoencoder.open(str(tmp_path / "out")).checkpoint.extra("step") == 12


def test_crash_without_retries_fails_then_rerun_resumes(ray_local, digit_shards, tmp_path, cfg):
    sink = JsonlSink(str(tmp_path / "metrics.jsonl"))
    crash = Faults(kill_at={"train_vqvae": 8}, mode="raise").wrap
    with pytest.raises(Exception, match="injected fault"):
        train_vqvae.run(cfg, {"shard": digit_shards}, str(tmp_path / "out"), sink=sink, wrap_task=crash)
    assert not (tmp_path / "out" / "model.pt").exists()
    train_vqvae.run(cfg, {"shard": digit_shards}, str(tmp_path / "out"), sink=sink)  # same out: resumes
    steps = [r["step"] for r in read_sink(tmp_path / "metrics.jsonl") if "train/loss" in r]
    assert steps == [3, 6, 9, 12]


def test_nonfinite_loss_stops_every_rank_at_once_and_keeps_the_last_checkpoint(ray_local, digit_shards, tmp_path, cfg):
    """Rank 0's loss turns NaN at step 8 of a two-worker run: both ranks stop (rank 1 does not hang in the next
    all-reduce), Ray Train does not retry although max_failures allows it, and the step-6 checkpoint survives."""
    two = replace(cfg, train=replace(cfg.train, num_workers=2, max_failures=2))
    sink = JsonlSink(str(tmp_path / "metrics.jsonl"))
    out = tmp_path / "out"
    diverged = r"rank\(s\) \[0\] at step 8.*last good checkpoint \(step 6\)"
    nan = Faults(nan_at={"train_vqvae": 8})
    with pytest.raises(NonFiniteLossError, match=diverged):
        train_vqvae.run(two, {"shard": digit_shards}, str(out), sink=sink, wrap_task=nan.wrap)
    logged = read_sink(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in logged if "train/loss" in r] == [3, 6]
    assert not any("train/resumed_from" in r for r in logged), "a diverged run is not retried"
    assert not (out / "model.pt").exists()
    kept = [torch.load(p, weights_only=True)["step"] for p in out.glob(f"ray/**/checkpoint_*/{TRAIN_STATE_FILE}")]
    assert max(kept) == 6


@pytest.mark.parametrize("kind", ["vqvae", "vae"])
def test_other_models(ray_local, digit_shards, tmp_path, tiny, kind):
    small = tiny.SMALL if kind == "vqvae" else tiny.SMALL[:1]  # the VAE has no codebook
    model = tiny(*small, f"model={kind}").train_vqvae.model
    cfg = tiny.train_vqvae(*small, f"model={kind}", steps=6)
    train_vqvae.run(cfg, {"shard": digit_shards}, str(tmp_path / "out"))
    autoencoder = Autoencoder.open(str(tmp_path / "out"))
    assert autoencoder.kind == kind and autoencoder.config == model
    assert autoencoder.makes_codes == (kind == "vqvae")


def test_clear_errors(digit_shards, tmp_path, cfg):
    rgb = replace(cfg, model=replace(cfg.model, in_channels=3))
    with pytest.raises(ValueError, match="model.in_channels=3"):
        train_vqvae.run(rgb, {"shard": digit_shards}, str(tmp_path / "out"))
    with pytest.raises(MissingInputError, match=r"run the shard step"):
        train_vqvae.run(cfg, {}, str(tmp_path / "out"))
    with pytest.raises(MissingInputError, match=r"no shard manifest at .*nothing.*run the shard step"):
        train_vqvae.run(cfg, {"shard": str(tmp_path / "nothing")}, str(tmp_path / "out"))
