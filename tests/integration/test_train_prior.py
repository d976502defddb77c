"""train_prior on local Ray: both levels side by side, class conditioning, and the errors users hit."""

import json
from dataclasses import replace

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from steps import train_prior
from steps.codes import CodeMeta, codes_to_arrow
from steps.common import JsonlSink, MissingInputError, write_json
from steps.nn.checkpoint import load_model
from steps.training import TrainConfig

TINY_TRAIN = TrainConfig(
    batch_size=16, steps=12, lr=3e-3, warmup_steps=2, checkpoint_every=6, log_every=6, val_batches=2, max_failures=0
)
TINY = train_prior.PriorHParams(channels=16, layers=2, kernel_size=3, dropout=0.0, cond_channels=8, cond_res_blocks=1)


def write_codes(root, labels: bool, levels=("top", "bottom"), n=160) -> str:
    """A code dataset whose codes follow the label, so a prior has something to learn."""
    shapes = {"top": (4, 4), "bottom": (8, 8)}
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
    for split, idx in (("train", slice(0, n - 32)), ("val", slice(n - 32, n))):
        ids = [f"img-{i:04d}" for i in range(n)][idx]
        table = codes_to_arrow(ids, y[idx] if labels else None, {lv: c[idx] for lv, c in codes.items()}, meta)
        (root / split).mkdir(parents=True)
        pq.write_table(table, root / split / "part-00000.parquet")
    write_json(str(root / "codes.json"), meta.to_dict())
    return str(root)


def test_two_levels_in_parallel(ray_local, tmp_path):
    codes = write_codes(tmp_path / "codes", labels=False)
    cfg = train_prior.TrainPriorConfig(top=replace(TINY, attn_heads=2), bottom=TINY, train=TINY_TRAIN, parallel=True)
    sink = JsonlSink(str(tmp_path / "metrics.jsonl"))
    result = train_prior.run(cfg, {"encode": codes}, str(tmp_path / "out"), sink=sink)

    top, top_payload = load_model(tmp_path / "out" / "top.pt", expect="prior")
    bottom, bottom_payload = load_model(tmp_path / "out" / "bottom.pt", expect="prior")
    assert top_payload["level"] == "top" and top_payload["vqvae"] == "feedbeefcafe0001"
    assert top.config.shape == (4, 4) and top.config.attn_heads == 2 and top.config.cond_num_codes == 0
    assert bottom.config.shape == (8, 8) and bottom.config.cond_shape == (4, 4) and bottom.config.cond_num_codes == 16
    assert top_payload["step"] == bottom_payload["step"] == 12
    assert 0 < result.metrics["top_val_nll_bits"] < 5 and 0 < result.metrics["bottom_val_nll_bits"] < 5
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    names = set().union(*logged)
    assert {"top/train/nll_bits", "bottom/train/nll_bits", "top/val/nll_bits", "bottom/val/nll_bits"} <= names
    summary = json.loads((tmp_path / "out" / "priors.json").read_text())
    assert summary["levels"] == ["top", "bottom"] and summary["vqvae"] == "feedbeefcafe0001"
    # The learned bottom prior really uses the top codes: its NLL changes when the conditioning changes.
    b = torch.randint(0, 16, (4, 8, 8))
    with torch.no_grad():
        assert bottom.nll_bits(b, cond=torch.zeros(4, 4, 4, dtype=torch.long)) != bottom.nll_bits(
            b, cond=torch.full((4, 4, 4), 5, dtype=torch.long)
        )


def test_class_conditional_one_level(ray_local, tmp_path):
    codes = write_codes(tmp_path / "codes", labels=True, levels=("top",))
    cfg = train_prior.TrainPriorConfig(top=TINY, train=replace(TINY_TRAIN, steps=6), class_conditional=True)
    train_prior.run(cfg, {"encode": codes}, str(tmp_path / "out"))
    model, payload = load_model(tmp_path / "out" / "top.pt", expect="prior")
    assert payload["num_classes"] == 10 and model.config.num_classes == 10
    assert not (tmp_path / "out" / "bottom.pt").exists()


def test_clear_errors(tmp_path):
    codes = write_codes(tmp_path / "codes", labels=False)
    with pytest.raises(ValueError, match="class_conditional=true.*no labels"):
        train_prior.run(train_prior.TrainPriorConfig(class_conditional=True), {"encode": codes}, str(tmp_path / "o"))
    with pytest.raises(MissingInputError, match="run the encode step"):
        train_prior.run(train_prior.TrainPriorConfig(), {}, str(tmp_path / "o"))
    with pytest.raises(FileNotFoundError, match="run the encode step"):
        train_prior.run(train_prior.TrainPriorConfig(), {"encode": str(tmp_path / "nothing")}, str(tmp_path / "o"))
    with pytest.raises(ValueError, match=r"PriorHParams\.kernel_size must be odd"):
        replace(TINY, kernel_size=4)  # checked when the config is built, before any step runs
