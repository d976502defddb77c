"""The registered generator served over real HTTP: ``mlflow models serve`` and the Ray Serve app, the same images.

The servers load the generator of the session's tiny run (``tiny_run``, tests/e2e/conftest.py) by its version, the
first in that store, and start as a user starts them. (Moving the ``current`` alias is tested in test_pipeline.py.)
"""

from __future__ import annotations

import json
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from servers import image, mlflow_serve, post, ray_serve

pytestmark = pytest.mark.e2e
MODEL = "models:/vqvae2-generator/1"


@pytest.fixture(scope="module")
def workdir(tiny_run) -> Path:
    return tiny_run


@pytest.fixture(scope="module")
def mlflow_png(workdir) -> str:
    """mlflow models serve: the image of {"label": 3, "seed": 0} at temperature 0.9 (and the 400s)."""
    with mlflow_serve(workdir, MODEL) as url:
        request = {"dataframe_records": [{"label": 3, "seed": 0}], "params": {"temperature": 0.9}}
        status, body = post(f"{url}/invocations", request)
        assert status == 200, body
        (row,) = body["predictions"]
        assert row["label"] == 3 and row["seed"] == 0 and len(row["top"]) == 16 and len(row["bottom"]) == 64
        assert image(row["png"]).shape == (32, 32)
        status, body = post(f"{url}/invocations", {"dataframe_records": [{"label": 12, "seed": 0}]})
        assert status == 400 and "labels must be in [0, 10)" in json.dumps(body), body
        status, body = post(f"{url}/invocations", {"dataframe_records": [{"label": 1, "seed": 0}],
                                                   "params": {"top_p": 1.5}})  # fmt: skip
        assert status == 400 and "top_p" in json.dumps(body), body
        assert urllib.request.urlopen(f"{url}/ping", timeout=5).status == 200, "the server stays up"
        return row["png"]


def test_mlflow_models_serve_answers_with_pngs_and_400s(mlflow_png):
    assert image(mlflow_png).dtype == np.uint8


def test_ray_serve_app_batches_and_draws_the_same_images(workdir, mlflow_png):
    with ray_serve(workdir, MODEL, {"label": 3, "seed": 0}, "max_batch_size=8", "batch_wait_timeout_s=0.2") as url:
        status, body = post(url, {"label": 3, "seed": 0, "temperature": 0.9})
        assert status == 200 and body["png"] == mlflow_png, "the same image as the MLflow model's"
        with ThreadPoolExecutor(8) as pool:  # concurrent requests, drawn in batches
            answers = list(pool.map(lambda i: post(url, {"label": i % 10, "seed": i}), range(8)))
        assert [s for s, _ in answers] == [200] * 8
        assert len({b["png"] for _, b in answers}) == 8 and [b["seed"] for _, b in answers] == list(range(8))
        assert max(b["batch"] for _, b in answers) > 1, "concurrent requests were drawn one by one"
        alone = post(url, {"label": 5, "seed": 5})[1]
        assert alone["batch"] == 1 and alone["png"] == answers[5][1]["png"], "a batch draws what one request draws"
        for bad, reason in (({"label": 3}, "seed"), ({"label": 10, "seed": 0}, "label"), ({"seed": 0}, "label"),
                            ({"label": 1, "seed": 0, "temperature": 0}, "temperature")):  # fmt: skip
            status, body = post(url, bad)
            assert status == 400 and reason in body["error"], (bad, body)
        assert post(url, {"label": 3, "seed": 0, "temperature": 0.9})[1]["png"] == mlflow_png, "still up"
