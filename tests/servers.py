"""Starting the servers as users start them (``mlflow models serve``, ``serve run``) and talking to them over HTTP:
shared by the e2e modules that serve a generator."""

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
from pathlib import Path

import numpy as np
from PIL import Image


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


@contextlib.contextmanager
def mlflow_serve(workdir: Path, model: str):
    """``mlflow models serve -m <model> --env-manager local`` on a free port, up (its /ping answers); yields its URL."""
    port = free_port()
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model, "--env-manager", "local", "-p", str(port),
           "-h", "127.0.0.1"]  # fmt: skip
    with server(cmd, workdir, workdir / "mlflow-serve.log") as proc:
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: urllib.request.urlopen(f"{url}/ping", timeout=5).status == 200, proc, 240, "mlflow serve")
        yield url


@contextlib.contextmanager
def ray_serve(workdir: Path, model: str, first: dict, *options: str):
    """``serve run pipeline.serving.ray_serve:app model=<model> [options]``, up once request ``first`` is answered
    with 200; yields the URL of its HTTP proxy."""
    cmd = [str(Path(sys.executable).parent / "serve"), "run", "pipeline.serving.ray_serve:app", f"model={model}",
           *options]  # fmt: skip
    with server(cmd, workdir, workdir / "ray-serve.log") as proc:
        url = "http://127.0.0.1:8000/"
        wait_until(lambda: post(url, first, timeout=30)[0] == 200, proc, 300, "serve run")
        yield url


def png_base64(pixels: np.ndarray) -> str:
    """One uint8 image (C, S, S) as a base64 PNG, as a JSON client sends it."""
    out = io.BytesIO()
    Image.fromarray(pixels[0] if pixels.shape[0] == 1 else pixels.transpose(1, 2, 0)).save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode("ascii")
