"""Three levels end to end (``python -m pipeline debug=tiny3``: top 4x4, middle 8x8, bottom 16x16 codes), proved by
``pipeline.verify``; its registered generator loads, completes images, and both servers answer for it over HTTP."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from servers import image, mlflow_serve, png_base64, post, ray_serve
from tiny_pipeline import pipeline

from pipeline import Generator
from pipeline.verify import verify
from steps.artifacts.autoencoder import Autoencoder
from steps.artifacts.codes import CodeDataset, read_code_meta
from steps.artifacts.priors import Priors

pytestmark = pytest.mark.e2e
MODEL = "models:/vqvae2-generator/1"
SHAPES = {"top": (4, 4), "middle": (8, 8), "bottom": (16, 16)}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("levels")
    (path / "console.txt").write_text(pipeline(path, "debug=tiny3"))
    return path


def output(workdir: Path, step: str) -> str:
    (out,) = [p.parent for p in (workdir / "artifacts" / step).glob("*/_SUCCESS")]
    return str(out)


@pytest.fixture(scope="module")
def gen(workdir) -> Generator:
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{workdir / 'mlflow.db'}"
    try:
        return Generator.load(MODEL, device="cpu")
    finally:
        del os.environ["MLFLOW_TRACKING_URI"]


def test_every_step_speaks_three_levels_and_verify_proves_the_outputs(workdir):
    report = verify(str(workdir / "artifacts"))
    assert report.ok and not report.in_progress, report.errors
    assert report.rows and all(r.found == r.expected and not r.duplicates for r in report.rows.values()), report.rows
    autoencoder = Autoencoder.open(output(workdir, "train_vqvae"))
    assert autoencoder.levels == ("top", "middle", "bottom") and autoencoder.shapes == SHAPES
    codes = output(workdir, "encode")
    assert read_code_meta(codes).shapes == SHAPES
    table = pq.read_table(CodeDataset.open(codes).split_uri("train"))
    assert [table.schema.field(lv).type.list_size for lv in SHAPES] == [16, 64, 256]
    priors = Priors.open(output(workdir, "train_prior"))
    assert priors.load("middle").config.cond_shape == (4, 4) and priors.load("bottom").config.cond_shape == (8, 8)
    assert pq.read_table(Path(output(workdir, "sample")) / "codes").column_names[2:5] == list(SHAPES)
    metrics = json.loads((Path(output(workdir, "evaluate")) / "metrics.json").read_text())["metrics"]
    assert all(metrics[f"nll_bits_{lv}"] > 0 and 0 < metrics[f"usage_{lv}"] <= 1 for lv in SHAPES)
    assert "train_prior[middle]" in (workdir / "console.txt").read_text()


def test_the_registered_generator_encodes_decodes_and_completes(gen):
    images = gen.generate(3, labels=[1, 2, 3], seed=0)
    codes = gen.encode(images)
    assert {lv: tuple(c.shape[1:]) for lv, c in codes.items()} == SHAPES
    assert gen.decode(codes).shape == images.shape
    filled = gen.complete(images, keep_rows=16, n=2, labels=[1, 2, 3], seed=1)
    assert filled.shape == (6, 1, 32, 32)
    given = {lv: c.repeat_interleave(2, 0) for lv, c in codes.items()}
    _, kept = gen.draw(list(range(6)), [1, 1, 2, 2, 3, 3], given=given, keep_rows=16)
    for lv, (h, _) in SHAPES.items():
        rows = 16 // (32 // h)
        assert torch.equal(kept[lv][:, :rows], codes[lv].repeat_interleave(2, 0)[:, :rows]), lv


def test_both_servers_answer_for_three_levels(workdir, gen):
    picture = gen.generate(1, labels=[4], seed=3)[0].numpy()  # (1, 32, 32)
    expected = gen.complete(picture[None], keep_rows=16, labels=4, seed=5)[0].numpy()
    sent = png_base64(picture)
    with mlflow_serve(workdir, MODEL) as url:
        status, body = post(f"{url}/invocations", {"dataframe_records": [{"label": 3, "seed": 0}]})
        assert status == 200, body
        (row,) = body["predictions"]
        assert [len(row[lv]) for lv in SHAPES] == [16, 64, 256]
        request = {"dataframe_records": [{"label": 4, "seed": 5, "image": sent}], "params": {"keep_rows": 16}}
        status, body = post(f"{url}/invocations", request)
        assert status == 200, body
        completed = body["predictions"][0]["png"]
        assert np.array_equal(image(completed), expected[0]), "the MLflow model completes as Generator.complete"
        status, body = post(f"{url}/invocations", {**request, "params": {"keep_rows": 40}})
        assert status == 400 and "keep_rows" in json.dumps(body), body
    with ray_serve(workdir, MODEL, {"label": 3, "seed": 0}) as url:
        status, body = post(url, {"label": 4, "seed": 5, "image": sent, "keep_rows": 16})
        assert status == 200 and body["png"] == completed, "Ray Serve completes as the MLflow model"
        status, body = post(url, {"label": 4, "seed": 5, "image": base64.b64encode(b"nope").decode(), "keep_rows": 8})
        assert status == 400 and "image" in body["error"], body
