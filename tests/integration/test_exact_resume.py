"""Exact resume (steps/training/resume.py): a training run whose worker is SIGKILLed at step k, and restarted by Ray
Train from
the last checkpoint, ends with bitwise the same weights and logs the same metric values at the same steps as a run
that was never interrupted; so does a run that failed and is run again on the same work directory (what a rerun of a
killed driver does: tests/e2e/test_faults.py kills a real one).

The kill comes after step 5 and the checkpoint before it is step 4: the resume starts in the middle of a log window
(log every 3 steps), of an epoch, and of the quantisers' usage counts, with weight averaging, dead-code restarts, and
dropout and label dropout drawing from each rank's own random stream (two workers for the prior).
"""

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.faults import Faults
from steps import train_prior, train_vqvae
from steps.artifacts.autoencoder import Autoencoder
from steps.artifacts.code_format import CodeMeta
from steps.artifacts.priors import Priors
from steps.core.step import JsonlSink
from steps.training.resume import UNREPRODUCIBLE

# 192 training digits, one worker: 6 batches an epoch, so 12 steps cross 2 epochs.
TRAIN = dict(steps=12, batch_size=32, num_workers=1, checkpoint_every=4, log_every=3, val_batches=1, ema_decay=0.9)
KILL_AT = 5


def history(path) -> dict[tuple[str, int], float]:
    """(metric, step) -> value of a JsonlSink file; each pair logged once (asserted), timings and restarts left out."""
    out: dict[tuple[str, int], float] = {}
    for line in Path(path).read_text().splitlines():
        row = json.loads(line)
        for key, value in row.items():
            if key != "step" and not key.endswith(UNREPRODUCIBLE):
                assert (key, row["step"]) not in out, f"{key} logged twice at step {row['step']}"
                out[key, row["step"]] = value
    return out


def assert_same_checkpoint(clean, resumed) -> None:
    """Every weight and buffer equal, and the final metrics too (but the throughput)."""
    a, b = clean.payload["model"], resumed.payload["model"]
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"tensors differ after the resume: {differ}"
    kept = [{k: v for k, v in c.extra("metrics").items() if not k.endswith(UNREPRODUCIBLE)} for c in (clean, resumed)]
    assert kept[0] == kept[1]


def resumed_runs(run, tmp_path, name: str, ways: tuple[str, ...]):
    """Runs of ``run(out, sink, max_failures, wrap_task=None)``: ``clean``, and each of ``ways``: ``worker_kill``
    (rank 0 SIGKILLed after KILL_AT, Ray Train restarts the workers), ``last_step_kill`` (the same after the last
    step, its checkpoint reported but maybe not yet registered by Ray Train), ``rerun`` (an exception after KILL_AT
    without retries, then a second call on the same output). Returns their outputs and metric histories."""
    outs = {k: tmp_path / k for k in ("clean", *ways)}
    sinks = {k: JsonlSink(str(tmp_path / f"{k}.jsonl")) for k in outs}
    run(outs["clean"], sinks["clean"], 0)
    for way, at in (("worker_kill", KILL_AT), ("last_step_kill", TRAIN["steps"])):
        if way in ways:
            run(outs[way], sinks[way], 1, Faults(kill_at={name: at}).wrap)
    if "rerun" in ways:
        with pytest.raises(Exception, match="injected fault"):
            run(outs["rerun"], sinks["rerun"], 0, Faults({name: KILL_AT}, mode="raise").wrap)
        run(outs["rerun"], sinks["rerun"], 0)
    rows = {k: [json.loads(line) for line in Path(s.path).read_text().splitlines()] for k, s in sinks.items()}
    resumed = {k: [r["step"] for r in rs for key in r if key.endswith("train/resumed_from")] for k, rs in rows.items()}
    want = {"clean": [], **{w: [TRAIN["steps"] if w == "last_step_kill" else 4] for w in ways}}
    assert resumed == want, "each interrupted run resumed once, from the last checkpoint before the fault"
    return outs, {k: history(s.path) for k, s in sinks.items()}


def test_train_vqvae_resumes_bitwise(ray_local, digit_shards, tmp_path, tiny):
    cfg = tiny(
        *tiny.SMALL, "model.quantizer.restart_after=2", *tiny.overrides("train_vqvae.train", **TRAIN)
    ).train_vqvae

    def run(out, sink, max_failures, wrap_task=None):
        once = replace(cfg, train=replace(cfg.train, max_failures=max_failures))
        train_vqvae.run(once, {"shard": digit_shards}, str(out), sink=sink, wrap_task=wrap_task)

    ways = ("worker_kill", "last_step_kill", "rerun")
    outs, logged = resumed_runs(run, tmp_path, "train_vqvae", ways)
    clean = Autoencoder.open(str(outs["clean"])).checkpoint
    assert clean.extra("step") == 12
    for k in ways:
        assert_same_checkpoint(clean, Autoencoder.open(str(outs[k])).checkpoint)
        assert logged[k] == logged["clean"], k
    steps = sorted({s for key, s in logged["clean"] if key == "train/loss"})
    assert steps == [3, 6, 9, 12] and ("train/restarts_bottom", 6) in logged["clean"]


def write_codes(root, artifacts, n=160) -> str:
    meta = CodeMeta(levels=("top",), shapes={"top": (4, 4)}, codebook_size={"top": 16}, vqvae="feedbeefcafe0001",
                    image_size=32, num_classes=10)  # fmt: skip
    rng = np.random.default_rng(0)
    y = rng.integers(0, 10, n)
    codes = (y[:, None, None] + rng.integers(0, 2, (n, 4, 4))) % 16
    ids = [f"img-{i:04d}" for i in range(n)]
    splits = {s: (ids[i], y[i], {"top": codes[i]}) for s, i in (("train", slice(0, 128)), ("val", slice(128, n)))}
    return artifacts.codes(root, meta, splits)


def test_train_prior_resumes_bitwise(ray_local, tmp_path, artifacts, tiny):
    """Two workers of 64 codes each (2 batches an epoch), label dropout and dropout drawing on both ranks."""
    train = {**TRAIN, "num_workers": 2}
    cfg = tiny.train_prior("train_prior.class_conditional=true", "prior.top.class_dropout=0.3",
                           "prior.top.dropout=0.2", **train)  # fmt: skip
    codes = write_codes(tmp_path / "codes", artifacts)

    def run(out, sink, max_failures, wrap_task=None):
        once = replace(cfg, train=replace(cfg.train, max_failures=max_failures))
        train_prior.run(once, {"encode": codes}, str(out), sink=sink, wrap_task=wrap_task)

    outs, logged = resumed_runs(run, tmp_path, "train_prior", ("worker_kill",))
    clean = Priors.open(str(outs["clean"])).checkpoint("top")
    assert_same_checkpoint(clean, Priors.open(str(outs["worker_kill"])).checkpoint("top"))
    assert logged["worker_kill"] == logged["clean"]
    assert ("top/train/nll_bits", 6) in logged["clean"] and ("top/val/nll_bits", 12) in logged["clean"]
