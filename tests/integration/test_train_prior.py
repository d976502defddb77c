"""train_prior on local Ray: both levels side by side, class conditioning, and the errors users hit."""

import json
import logging
import time
from dataclasses import replace

import numpy as np
import pytest
import ray
import torch

from steps import train_prior
from steps.artifacts.checkpoints import TRAIN_STATE_FILE
from steps.artifacts.code_format import CodeMeta
from steps.artifacts.priors import Priors
from steps.core.step import JsonlSink, MissingInputError
from steps.nn import registry
from steps.nn.draw import SamplingControls
from steps.training import threads

LEVELS = ("top", "bottom")
TRAIN = dict(steps=12, lr=3e-3, checkpoint_every=6, log_every=6, val_batches=2, max_failures=0)


@pytest.fixture(scope="module")
def cfg(tiny):
    return tiny.train_prior("train_prior.class_conditional=false", **TRAIN)


def write_codes(root, artifacts, labels: bool, levels=("top", "bottom"), n=160, top=(4, 4)) -> str:
    """A code dataset whose codes follow the label, so a prior has something to learn."""
    shapes = {"top": top, "bottom": (8, 8)}
    meta = CodeMeta(
        levels=levels,
        shapes={lv: shapes[lv] for lv in levels},
        codebook_size={lv: 16 for lv in levels},
        vqvae="feedbeefcafe0001",
        image_size=32,
        num_classes=10 if labels else None,
    )
    rng = np.random.default_rng(0)
    y = rng.integers(0, 10, n)
    codes = {lv: (y[:, None, None] + rng.integers(0, 2, (n, *shapes[lv]))) % 16 for lv in levels}
    ids = [f"img-{i:04d}" for i in range(n)]
    splits = {
        split: (ids[idx], y[idx] if labels else None, {lv: c[idx] for lv, c in codes.items()})
        for split, idx in (("train", slice(0, n - 32)), ("val", slice(n - 32, n)))
    }
    return artifacts.codes(root, meta, splits)


def test_two_levels_in_parallel_taking_up_freed_threads(ray_local, tmp_path, artifacts, tiny, monkeypatch):
    """Both levels side by side with share_threads, in a ledger where a one-thread run on this node has already
    finished: its thread goes to the bottom level's worker (first by key among the unfinished), which trains on two
    and logs it; no worker ever counts more than the node's three. Which level finishes first is up to the machine,
    so that is all the test asserts of timing (tests/unit/test_threads.py: the arithmetic)."""
    monkeypatch.setattr(threads, "ASK_EVERY_S", 0.1)
    made = []

    class WithFinishedNeighbour(threads.ThreadLedger):
        def __init__(self) -> None:
            super().__init__()
            ray.get(self.actor.join.remote("a-finished-run[0]", ray.get_runtime_context().get_node_id(), 1))
            ray.get(self.actor.leave.remote("a-finished-run[0]"))
            made.append(self)

    monkeypatch.setattr(train_prior, "ThreadLedger", WithFinishedNeighbour)
    cfg = tiny.train_prior(
        "train_prior.class_conditional=false", "train_prior.share_threads=true",
        **{**TRAIN, "steps": 40, "log_every": 2, "checkpoint_every": 20},
    )  # fmt: skip
    codes = write_codes(tmp_path / "codes", artifacts, labels=False)
    sink = JsonlSink(str(tmp_path / "metrics.jsonl"))
    result = train_prior.run(cfg, {"encode": codes}, str(tmp_path / "out"), sink=sink)

    priors = Priors.open(str(tmp_path / "out"))
    top, bottom = priors.load("top"), priors.load("bottom")
    assert priors.checkpoint("top").extra("level") == "top"
    assert priors.checkpoint("top").extra("vqvae") == "feedbeefcafe0001"
    assert top.config.shape == (4, 4) and top.config.attn_heads == 4 and top.config.cond_num_codes == 0
    assert bottom.config.shape == (8, 8) and bottom.config.cond_shape == (4, 4) and bottom.config.cond_num_codes == 16
    assert priors.checkpoint("top").extra("step") == priors.checkpoint("bottom").extra("step") == 40
    assert 0 < result.metrics["top_val_nll_bits"] < 5 and 0 < result.metrics["bottom_val_nll_bits"] < 5
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    names = set().union(*logged)
    assert {"top/train/nll_bits", "bottom/train/nll_bits", "top/val/nll_bits", "bottom/val/nll_bits"} <= names
    assert priors.summary["levels"] == ["top", "bottom"] and priors.summary["vqvae"] == "feedbeefcafe0001"
    assert set(priors.summary["metrics"]) == {"top", "bottom"}
    # The learned bottom prior really uses the top codes: its NLL changes when the conditioning changes.
    b = torch.randint(0, 16, (4, 8, 8))
    with torch.no_grad():
        assert bottom.nll_bits(b, cond=torch.zeros(4, 4, 4, dtype=torch.long)) != bottom.nll_bits(
            b, cond=torch.full((4, 4, 4), 5, dtype=torch.long)
        )
    # The threads: the bottom took up the finished run's; the ledger is gone afterwards.
    counts = {lv: [m[f"{lv}/train/cpu_threads"] for m in logged if f"{lv}/train/cpu_threads" in m] for lv in LEVELS}
    assert len(counts["top"]) == len(counts["bottom"]) == 20, counts
    assert max(counts["bottom"]) >= 2, counts
    assert all(1 <= c <= 3 for lv in LEVELS for c in counts[lv]), counts
    assert len(made) == 1
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(made[0].actor.threads.remote("train_prior[bottom][0]"), timeout=30)


def test_a_worker_goes_on_with_its_threads_when_the_ledger_is_gone(ray_local, monkeypatch, caplog):
    monkeypatch.setattr(threads, "ASK_EVERY_S", 0.0)
    own = torch.get_num_threads()
    ledger = threads.ThreadLedger()
    try:
        first, second = threads.ThreadShare(ledger, "a[0]", 1), threads.ThreadShare(ledger, "b[0]", 1)
        second.leave()
        deadline = time.monotonic() + 30
        while first.threads != 2 and time.monotonic() < deadline:
            first.poll()
            time.sleep(0.05)
        assert first.threads == 2 and torch.get_num_threads() == 2
        ledger.close()
        with caplog.at_level(logging.WARNING, logger="steps.training.threads"):
            deadline = time.monotonic() + 30
            while "cannot reach the thread ledger" not in caplog.text and time.monotonic() < deadline:
                first.poll()
                time.sleep(0.05)
        assert "cannot reach the thread ledger" in caplog.text
        first.poll()
        first.leave()  # no error: the sharing has stopped, training goes on
        assert first.threads == 2
    finally:
        torch.set_num_threads(own)


def test_class_conditional_one_level(ray_local, tmp_path, artifacts, cfg):
    codes = write_codes(tmp_path / "codes", artifacts, labels=True, levels=("top",))
    conditional = replace(cfg, train=replace(cfg.train, steps=6), class_conditional=True)
    train_prior.run(conditional, {"encode": codes}, str(tmp_path / "out"))
    priors = Priors.open(str(tmp_path / "out"))
    assert priors.checkpoint("top").extra("num_classes") == 10 and priors.num_classes("top") == 10
    assert not priors.has("bottom") and priors.summary["levels"] == ["top"]


def test_clear_errors(tmp_path, artifacts, cfg):
    codes = write_codes(tmp_path / "codes", artifacts, labels=False)
    with pytest.raises(ValueError, match="class_conditional=true.*no labels"):
        train_prior.run(replace(cfg, class_conditional=True), {"encode": codes}, str(tmp_path / "o"))
    with pytest.raises(MissingInputError, match="run the encode step"):
        train_prior.run(cfg, {}, str(tmp_path / "o"))
    with pytest.raises(MissingInputError, match="no code dataset at .*nothing.*run the encode step"):
        train_prior.run(cfg, {"encode": str(tmp_path / "nothing")}, str(tmp_path / "o"))
    # Code maps the prior of a level cannot be conditioned on: the error names the config key and the shapes.
    odd = write_codes(tmp_path / "odd", artifacts, labels=False, top=(3, 3))
    with pytest.raises(ValueError, match=r"prior\.bottom\.cond_shape must be a divisor of shape=\[8, 8\]"):
        train_prior.run(cfg, {"encode": odd}, str(tmp_path / "o"))


def test_transformer_priors_with_class_dropout_and_weight_averaging(ray_local, tmp_path, artifacts, tiny):
    # prior=transformer for both levels, trained to sample with classifier-free guidance, with averaged weights.
    cfg = tiny.train_prior("prior=transformer", "train_prior.class_conditional=true", "prior.top.class_dropout=0.2",
                           "prior.bottom.class_dropout=0.2", ema_decay=0.9, **TRAIN)  # fmt: skip
    codes = write_codes(tmp_path / "codes", artifacts, labels=True)
    result = train_prior.run(cfg, {"encode": codes}, str(tmp_path / "out"))
    priors = Priors.open(str(tmp_path / "out"))
    for level in ("top", "bottom"):
        model = priors.load(level)
        assert type(model).__name__ == "TransformerPrior" and priors.guidable(level)
        assert model.start.num_embeddings == 11  # ten classes and "no class"
    assert 0 < result.metrics["top_val_nll_bits"] < 5
    # The published weights are the average: they differ from the optimiser's last weights kept for resuming.
    state = torch.load(next((tmp_path / "out" / "ray").rglob(TRAIN_STATE_FILE)), weights_only=True)
    assert set(state) >= {"live", "average"}
    assert any(not torch.equal(state["model"][k], state["live"][k]) for k in state["average"])
    labels = torch.arange(4)
    top = registry.sampler(priors.load("top")).sample(
        4, labels, generator=[0, 1, 2, 3], controls=SamplingControls(guidance_scale=3.0)
    )
    bottom = registry.sampler(priors.load("bottom")).sample(
        4, labels, top, generator=[0, 1, 2, 3], controls=SamplingControls(guidance_scale=3.0)
    )
    assert top.shape == (4, 4, 4) and bottom.shape == (4, 8, 8)
