"""A real ``mlflow server`` on 127.0.0.1 that tests stop and start again, for tracking-outage tests.

``TrackingServer(tmp_path)`` picks a free port and keeps its SQLite store and artifacts under ``tmp_path``; ``start()``
runs the server in its own process group and waits for ``/health``; ``stop()`` ends the whole group (SIGTERM, then
SIGKILL) and waits until the port refuses connections. ``uri`` is always the loopback address; ``host="0.0.0.0"`` makes
the server listen on every interface too, and it takes any Host header (this node's IP need not be a private one). A
restarted server has the same port and the same store, as a restarted tracking server on a head node would.
``auth=(user, password)`` runs MLflow's authentication app (``--app-name basic-auth``, as cluster.yaml does) with that
user as its admin: every request then needs the login.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


AUTH_INI = """[mlflow]
default_permission = READ
database_uri = sqlite:///{db}
admin_username = {user}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
"""


class TrackingServer:
    def __init__(self, where: Path, host: str = "127.0.0.1", auth: tuple[str, str] | None = None) -> None:
        self.where = Path(where)
        self.auth = auth
        self.host = host  # "0.0.0.0" for a pipeline's workers, which reach a loopback URI through this node's IP
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 90.0) -> None:
        assert self.proc is None, "already running"
        mlflow = Path(sys.executable).with_name("mlflow")
        # Without MLflow's job runner (a pool of processes for its GenAI jobs, which the pipeline never starts), as
        # cluster.yaml runs the server: on two cores its start-up otherwise competes with the pipeline under test.
        env, app = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}, []
        if self.auth:
            ini = self.where / "basic_auth.ini"
            ini.write_text(AUTH_INI.format(db=self.where / "basic_auth.db", user=self.auth[0]))
            env.update(MLFLOW_AUTH_CONFIG_PATH=str(ini), MLFLOW_AUTH_ADMIN_PASSWORD=self.auth[1],
                       MLFLOW_FLASK_SERVER_SECRET_KEY=os.urandom(16).hex())  # fmt: skip
            app = ["--app-name", "basic-auth"]
        for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            env.pop(name, None)
        with open(self.where / "mlflow-server.log", "ab") as log:  # the child keeps its own copy of the handle
            self.proc = subprocess.Popen(
                [str(mlflow), "server", *app, "--host", self.host, "--allowed-hosts", "*", "--port", str(self.port),
                 "--workers", "1",
                 "--backend-store-uri", f"sqlite:///{self.where / 'mlflow.db'}",
                 "--artifacts-destination", str(self.where / "mlflow-artifacts")],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=self.where, env=env,
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited ({self.proc.returncode}): see {self.where}/mlflow-server.log")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.25)
        self.stop()
        raise TimeoutError(f"mlflow server on port {self.port} not up within {timeout} s")

    def stop(self) -> None:
        if self.proc is None:
            return
        for sig, wait in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and _group_alive(self.proc.pid):
                self.proc.poll()
                time.sleep(0.1)
            if not _group_alive(self.proc.pid):
                break
        self.proc.wait(timeout=10)
        self.proc = None
        deadline = time.monotonic() + 30
        while _listening(self.port) and time.monotonic() < deadline:  # a restart must find the port free
            time.sleep(0.1)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True
