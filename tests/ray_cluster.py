"""A throwaway local Ray head with token auth, driven through the same CLI a GPU cluster is (docs/cluster.md).

``start_head()`` runs ``ray start --head --block`` with ``RAY_AUTH_MODE=token`` and returns a :class:`LocalCluster`
to submit jobs to, poll and stop; ``start_worker_node(head)`` joins a second node (its own ports, temp dir and
session) that :meth:`WorkerNode.kill` loses the way a machine is lost. It must coexist with any other Ray on the
machine (the in-process ``ray_local`` fixture, another test run), so it shares nothing with them:

- its own ``--temp-dir`` (short, under /tmp: Ray's unix sockets must fit in 107 bytes), so a bare ``ray.init()``
  elsewhere never finds it through ``/tmp/ray/ray_current_cluster``;
- every fixed port passed explicitly and free (GCS, dashboard, client server, dashboard agent, metrics,
  runtime-env agent); worker ports random;
- its own token from ``ray get-auth-token --generate`` run with ``HOME`` in the temp dir, handed to Ray through
  ``RAY_AUTH_TOKEN_PATH``: the user's ``~/.ray/auth_token`` is neither read nor written, and the token is never
  printed;
- a scrubbed environment: no inherited ``RAY_ADDRESS``, ``RAY_AUTH_*`` or other ``RAY_*`` variable;
- stopped by signalling its own ``ray start --block`` process group, never with ``ray stop`` (which stops every
  Ray on the host, the ``ray_local`` fixture's included).

Jobs run on the Python that started the head (this virtualenv), like on a cluster where the image's Python runs
them; ``python`` in an entrypoint resolves to it because its directory leads ``PATH``.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

# The `ray` next to this interpreter (the venv's), not whatever `ray` is first on PATH.
RAY = str(Path(sys.executable).with_name("ray")) if Path(sys.executable).with_name("ray").exists() else "ray"

# Kept out of the working_dir upload (Ray also honours .gitignore); the limit is 100s of MiB and .venv is GBs.
DEFAULT_EXCLUDES = (
    ".venv",
    ".git",
    "outputs",
    "multirun",
    "mlruns",
    "mlartifacts",
    "*.db",
    ".pytest_cache",
    ".ruff_cache",
    "**/__pycache__",
)
TERMINAL = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})


class ClusterError(RuntimeError):
    """The local head did not start, or a CLI call against it failed; the message carries the relevant log."""


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports that are free on 127.0.0.1 right now (held open together so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def scrubbed_env(**extra: str) -> dict[str, str]:
    """This process's environment without any ``RAY_*`` variable, the venv first on PATH, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update(extra)
    return env


def generate_token(home: Path) -> Path:
    """Create a token with the documented ``ray get-auth-token --generate``, in ``home`` instead of the user's.

    Returns the token file (mode 0600). The command also prints the token: stdout is discarded, never shown.
    """
    home.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [RAY, "get-auth-token", "--generate"],
        env=scrubbed_env(HOME=str(home)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        timeout=120,
        check=False,
    )
    path = home / ".ray" / "auth_token"
    if proc.returncode != 0 or not path.is_file():
        raise ClusterError(f"ray get-auth-token --generate failed ({proc.returncode}):\n{proc.stderr}")
    path.chmod(0o600)
    return path


def _group_alive(pgid: int) -> bool:
    """Whether any non-zombie process is left in process group ``pgid``."""
    proc = Path("/proc")
    if not proc.is_dir():  # not Linux: signal 0 (counts zombies too, so may wait out the grace period)
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        return True
    for stat in proc.glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            # "pid (comm) state ppid pgrp ...": comm may hold spaces, so split after the last ')'.
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if fields[0] != "Z" and int(fields[2]) == pgid:
                return True
    return False


@dataclass
class LocalCluster:
    """A running local head. Build it with :func:`start_head`; always :meth:`stop` it."""

    root: Path  # temp dir: token, Ray's --temp-dir, the head's log
    token_path: Path
    gcs_port: int
    dashboard_port: int
    process: subprocess.Popen
    jobs: list[str] = field(default_factory=list)

    @property
    def address(self) -> str:
        """The dashboard / Jobs API address that ``ray job submit --address`` takes."""
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def log_path(self) -> Path:
        return self.root / "ray-start.log"

    # ----------------------------------------------------------------------------------------- clients
    def client_env(self, authenticated: bool = True) -> dict[str, str]:
        """Environment for a CLI client: with the token (the documented two variables), or with none at all.

        The unauthenticated one also gets an empty ``HOME``, so no ``~/.ray/auth_token`` lying around can leak in.
        """
        if authenticated:
            return scrubbed_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(self.token_path))
        empty_home = self.root / "no-token-home"
        empty_home.mkdir(exist_ok=True)
        return scrubbed_env(HOME=str(empty_home))

    def ray_cli(self, *args: str, authenticated: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
        """Run ``ray <args>`` as a client of this cluster; output captured as text."""
        return subprocess.run(
            [RAY, *args],
            env=self.client_env(authenticated),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            cwd=self.root,
        )

    def http_get(self, path: str, token: str | None = None) -> tuple[int, str]:
        """(status, body) of a GET on the dashboard, with ``Authorization: Bearer <token>`` when given."""
        req = urllib.request.Request(self.address + path)
        if token is not None:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as err:
            return err.code, err.read().decode()

    def job_client(self):
        """``ray.job_submission.JobSubmissionClient`` carrying the token as a header (no process-wide state)."""
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.address, headers={"Authorization": f"Bearer {self._token()}"})

    def _token(self) -> str:
        return self.token_path.read_text().strip()

    # ----------------------------------------------------------------------------------------- jobs
    def submit(
        self,
        entrypoint: Sequence[str],
        working_dir: str | os.PathLike,
        excludes: Sequence[str] = DEFAULT_EXCLUDES,
        authenticated: bool = True,
    ) -> str:
        """``ray job submit --no-wait`` of ``entrypoint`` with ``working_dir`` uploaded; returns the submission id.

        Raises:
            ClusterError: the CLI failed (for instance, the cluster refused the request), with its output.
        """
        submission_id = f"e2e-{uuid.uuid4().hex[:12]}"
        proc = self.ray_cli(
            "job",
            "submit",
            "--address",
            self.address,
            "--submission-id",
            submission_id,
            "--working-dir",
            str(working_dir),
            "--runtime-env-json",
            json.dumps({"excludes": list(excludes)}),
            "--no-wait",
            "--",
            *entrypoint,
            authenticated=authenticated,
        )
        if proc.returncode != 0:
            raise ClusterError(f"ray job submit failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        self.jobs.append(submission_id)
        return submission_id

    def status(self, job_id: str) -> str:
        return str(self.job_client().get_job_status(job_id).value)

    def logs(self, job_id: str) -> str:
        return self.job_client().get_job_logs(job_id)

    def wait(self, job_id: str, timeout_s: float = 900, poll_s: float = 2.0) -> str:
        """Poll until the job is SUCCEEDED, FAILED or STOPPED; returns that status.

        Raises:
            TimeoutError: still running after ``timeout_s`` (the job is stopped; the message has its logs).
            ClusterError: the head died meanwhile.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            if self.process.poll() is not None:
                raise ClusterError(f"the Ray head exited ({self.process.returncode}):\n{self.tail_log()}")
            status = self.status(job_id)
            if status in TERMINAL:
                return status
            if time.monotonic() > deadline:
                logs = self.logs(job_id)
                with contextlib.suppress(Exception):
                    self.job_client().stop_job(job_id)
                raise TimeoutError(f"job {job_id} still {status} after {timeout_s:.0f}s; its logs:\n{logs}")
            time.sleep(poll_s)

    # ----------------------------------------------------------------------------------------- lifecycle
    def wait_ready(self, timeout_s: float) -> None:
        """Block until the Jobs API answers an authenticated request (the last thing a head brings up)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ClusterError(f"ray start exited ({self.process.returncode}):\n{self.tail_log()}")
            with contextlib.suppress(OSError):
                if self.http_get("/api/jobs/", token=self._token())[0] == 200:
                    return
            time.sleep(1.0)
        raise ClusterError(f"the Jobs API did not come up within {timeout_s:.0f}s:\n{self.tail_log()}")

    def tail_log(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, grace_s: float = 20.0, keep_files: bool = False) -> None:
        """Stop unfinished jobs, then the head: SIGTERM to ``ray start --block`` (which shuts its processes down),
        SIGKILL to whatever of its process group is left after ``grace_s``. Idempotent."""
        if self.process.poll() is None:
            with contextlib.suppress(Exception):
                client = self.job_client()
                for job_id in self.jobs:
                    if str(client.get_job_status(job_id).value) not in TERMINAL:
                        client.stop_job(job_id)
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=grace_s)
        pgid = self.process.pid  # start_new_session: the leader's pid is the group id
        deadline = time.monotonic() + grace_s
        while _group_alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.5)
        if _group_alive(pgid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=10)
        atexit.unregister(self.stop)
        if not keep_files:
            shutil.rmtree(self.root, ignore_errors=True)


def start_head(num_cpus: int = 2, ready_timeout_s: float = 180.0) -> LocalCluster:
    """Start a token-authenticated local head (see the module docstring) and wait until it takes jobs."""
    root = Path(tempfile.mkdtemp(prefix="rayjob-", dir="/tmp" if os.path.isdir("/tmp") else None))
    token_path = generate_token(root / "home")
    gcs, dashboard, client_server, agent_http, agent_grpc, metrics, runtime_env = free_ports(7)
    cmd = [
        RAY,
        "start",
        "--head",
        "--block",
        # Ray resolves a loopback address to the machine's routable IP for its internal addresses anyway; the
        # dashboard below is what clients use, and it stays on loopback.
        "--node-ip-address=127.0.0.1",
        f"--port={gcs}",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard}",
        f"--num-cpus={num_cpus}",
        f"--temp-dir={root / 'ray'}",
        f"--ray-client-server-port={client_server}",
        f"--dashboard-agent-listen-port={agent_http}",
        f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--metrics-export-port={metrics}",
        f"--runtime-env-agent-port={runtime_env}",
        "--min-worker-port=0",
        "--max-worker-port=0",
        "--disable-usage-stats",
    ]
    with open(root / "ray-start.log", "wb") as log:
        process = subprocess.Popen(
            cmd,
            env=scrubbed_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_path)),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=root,
            start_new_session=True,  # own process group: stop() signals exactly these processes
        )
    cluster = LocalCluster(root, token_path, gcs, dashboard, process)
    atexit.register(cluster.stop)  # a crashed or interrupted test run still takes its head down
    try:
        cluster.wait_ready(ready_timeout_s)  # its errors carry the head's log
    except BaseException:
        cluster.stop()
        raise
    return cluster


# ------------------------------------------------------------------------------------------------ more nodes
def state_api(head: LocalCluster, path: str) -> list[dict]:
    """The rows a State API listing (``/api/v0/nodes?...``, ``/api/v0/actors?...``) returns, asked with the token."""
    status, body = head.http_get(path, token=head._token())
    if status != 200:
        raise ClusterError(f"GET {path} answered {status}: {body[:2000]}")
    return json.loads(body)["data"]["result"]["result"]


def nodes(head: LocalCluster) -> list[dict]:
    """The cluster's nodes (``node_id``, ``state``, ``is_head_node``, ...)."""
    return state_api(head, "/api/v0/nodes?limit=100&detail=true")


def actors_on(head: LocalCluster, node_id: str, class_name: str) -> list[dict]:
    """The ALIVE actors of class ``class_name`` on node ``node_id``."""
    query = f"/api/v0/actors?limit=1000&detail=true&filter_keys=node_id&filter_predicates=%3D&filter_values={node_id}"
    return [a for a in state_api(head, query) if a.get("class_name") == class_name and a.get("state") == "ALIVE"]


def _session_pids(sid: int) -> list[int]:
    """Live processes of session ``sid`` (Linux /proc; elsewhere none: the process group kill has to do)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()  # state ppid pgrp session ...
            if fields[0] != "Z" and int(fields[3]) == sid:
                pids.append(int(stat.parent.name))
    return pids


@dataclass
class WorkerNode:
    """A second node of a :class:`LocalCluster` on this machine: ``ray start --address --block`` with its own ports,
    temp dir and process group. Build it with :func:`start_worker_node`."""

    root: Path
    node_id: str
    process: subprocess.Popen

    @property
    def log_path(self) -> Path:
        return self.root / "ray-start.log"

    def kill(self) -> None:
        """Lose the node the way a machine is lost: SIGKILL to every process of its session at once (raylet, object
        store, agents, and the workers, which Ray puts in process groups of their own), no goodbye to the GCS."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        for pid in _session_pids(self.process.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=10)

    def stop(self) -> None:
        """Idempotent: kill what is left of the node and remove its temp dir."""
        self.kill()
        deadline = time.monotonic() + 10
        while _session_pids(self.process.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        atexit.unregister(self.stop)
        shutil.rmtree(self.root, ignore_errors=True)


def start_worker_node(head: LocalCluster, num_cpus: int, ready_timeout_s: float = 120.0) -> WorkerNode:
    """Join a node with ``num_cpus`` CPUs to ``head`` (token auth as the head's) and wait until the GCS lists it
    ALIVE. Same machine, so every port differs from the head's and is passed explicitly."""
    before = {n["node_id"] for n in nodes(head)}
    root = Path(tempfile.mkdtemp(prefix="raynode-", dir="/tmp" if os.path.isdir("/tmp") else None))
    ports = ("node-manager", "object-manager", "dashboard-agent-listen", "dashboard-agent-grpc", "metrics-export")
    ports += ("runtime-env-agent",)
    cmd = [RAY, "start", f"--address=127.0.0.1:{head.gcs_port}", "--block", "--node-ip-address=127.0.0.1"]
    cmd += [f"--num-cpus={num_cpus}", f"--temp-dir={root / 'ray'}", "--min-worker-port=0", "--max-worker-port=0"]
    cmd += [f"--{name}-port={port}" for name, port in zip(ports, free_ports(len(ports)), strict=True)]
    cmd += ["--disable-usage-stats"]
    with open(root / "ray-start.log", "wb") as log:
        process = subprocess.Popen(
            cmd, env=head.client_env(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=root,
            start_new_session=True,
        )  # fmt: skip
    node = WorkerNode(root, "", process)
    atexit.register(node.stop)
    deadline = time.monotonic() + ready_timeout_s
    while not node.node_id:
        new = [n for n in nodes(head) if not n["is_head_node"] and n["node_id"] not in before and n["state"] == "ALIVE"]
        if new:
            node.node_id = new[0]["node_id"]
        elif process.poll() is not None or time.monotonic() > deadline:
            text = node.log_path.read_text(errors="replace")[-5000:]
            node.stop()
            raise ClusterError(f"the worker node did not join within {ready_timeout_s:.0f}s:\n{text}")
        else:
            time.sleep(1.0)
    return node
