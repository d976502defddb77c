"""The registered generator served over real HTTP: ``mlflow models serve`` and the Ray Serve app, the same images.

The servers load the generator of the session's tiny run (``tiny_run``, tests/e2e/conftest.py) by its version, the
first in that store, and start as a user starts them. (Moving the ``current`` alias is tested in test_pipeline.py.)
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.e2e
MODEL = "models:/vqvae2-generator/1"


@pytest.fixture(scope="module")
def workdir(tiny_run) -> Path:
    return tiny_run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict, timeout: float = 120) -> tuple[int, dict]:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            answer = json.loads(response.read())
            if "X-Batch-Size" in response.headers:
                answer["batch"] = int(response.headers["X-Batch-Size"])
            return response.status, answer
    except urllib.error.HTTPError as err:
        text = err.read()
        try:
            return err.code, json.loads(text or b"{}")
        except ValueError:  # a proxy's plain-text answer (e.g. 404 before the app is deployed)
            return err.code, {"error": text.decode(errors="replace")}


def wait_until(check, proc: subprocess.Popen, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{what} exited with {proc.returncode}")
        with contextlib.suppress(OSError):
            if check():
                return
        time.sleep(1)
    raise AssertionError(f"{what} did not come up in {seconds} s")


@contextlib.contextmanager
def server(cmd: list[str], workdir: Path, log: Path):
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'mlflow.db'}", "PYTHONUNBUFFERED": "1"}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])  # as an activated venv
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def image(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


@pytest.fixture(scope="module")
def mlflow_png(workdir) -> str:
    """mlflow models serve: the image of {"label": 3, "seed": 0} at temperature 0.9 (and the 400s)."""
    port = free_port()
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", MODEL, "--env-manager", "local", "-p", str(port),
           "-h", "127.0.0.1"]  # fmt: skip
    with server(cmd, workdir, workdir / "mlflow-serve.log") as proc:
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: urllib.request.urlopen(f"{url}/ping", timeout=5).status == 200, proc, 240, "mlflow serve")
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
    port = 8000  # serve run's HTTP proxy
    cmd = [str(Path(sys.executable).parent / "serve"), "run", "pipeline.serving.ray_serve:app", f"model={MODEL}",
           "max_batch_size=8", "batch_wait_timeout_s=0.2"]  # fmt: skip
    with server(cmd, workdir, workdir / "ray-serve.log") as proc:
        url = f"http://127.0.0.1:{port}/"

        def ready() -> bool:
            status, _ = post(url, {"label": 3, "seed": 0}, timeout=30)
            return status == 200

        wait_until(ready, proc, 300, "serve run")
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
