"""cluster.yaml: valid for Ray's cluster launcher, and it does what docs/cluster.md promises.

Validation uses the launcher's own code path, offline: ``prepare_config`` (merge with the provider defaults, as
``ray up`` does first) then ``validate_config`` (the JSON schema in ``ray/autoscaler/ray-schema.json``). No cloud
credentials or network: the AWS-specific bootstrap (key pairs, subnets, IAM) is what ``ray up`` adds on top.
The MLflow start commands are also run for real, on localhost, to prove their shell works.
"""

from __future__ import annotations

import base64
import copy
import functools
import itertools
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

REPO = Path(__file__).resolve().parents[2]
CLUSTER_YAML = REPO / "cluster.yaml"
CONTAINER_HOME = "/home/ray"  # HOME of the rayproject/ray images' `ray` user
IMAGE = re.compile(r"^rayproject/ray:(?P<ray>\d+\.\d+\.\d+)-py(?P<py>\d+)-(?P<platform>cpu|gpu|cu\d+)$")


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


@pytest.fixture(scope="module")
def cfg(raw) -> dict:
    """The config as ``ray up`` sees it after filling in defaults (setup commands merged per node kind)."""
    prepared = prepare_config(copy.deepcopy(raw))
    validate_config(prepared)
    return prepared


def _worker_types(cfg: dict) -> dict[str, dict]:
    return {k: v for k, v in cfg["available_node_types"].items() if k != cfg["head_node_type"]}


def _docker_env(cfg: dict, kind: str, node_type: dict | None = None) -> dict[str, str]:
    """``-e KEY=VALUE`` settings of the containers of ``kind`` ("head" or "worker"), node-type overrides included."""
    docker = cfg["docker"]
    options = list(docker.get("run_options", [])) + list(docker.get(f"{kind}_run_options", []))
    if node_type is not None:
        options += node_type.get("docker", {}).get("worker_run_options", [])
    env = {}
    for option in options:
        words = shlex.split(option)
        for flag, value in itertools.pairwise(words):
            if flag in ("-e", "--env") and "=" in value:
                key, val = value.split("=", 1)
                env[key] = val
    return env


def _ray_start(commands: list[str]) -> str:
    starts = [c for c in commands if "ray start" in c]
    assert len(starts) == 1, commands
    return starts[0]


def test_valid_for_the_cluster_launcher(cfg):
    validate_config(cfg)  # the schema, once more, explicitly
    assert cfg["head_node_type"] in cfg["available_node_types"]
    assert cfg["max_workers"] >= max(t["max_workers"] for t in _worker_types(cfg).values())


def test_images_pinned_to_installed_ray(cfg):
    docker = cfg["docker"]
    images = {kind: docker.get(f"{kind}_image", docker.get("image")) for kind in ("head", "worker")}
    parsed = {kind: IMAGE.match(image or "") for kind, image in images.items()}
    assert all(parsed.values()), f"expected rayproject/ray:<version>-py<XY>-<cpu|gpu>, got {images}"
    assert {m["ray"] for m in parsed.values()} == {ray.__version__}, "cluster.yaml images and installed Ray differ"
    assert parsed["head"]["py"] == parsed["worker"]["py"], "head and workers must run the same Python"
    assert parsed["worker"]["platform"] != "cpu", "GPU workers need a CUDA image"
    for name, node_type in _worker_types(cfg).items():  # a node type's own image is pinned the same way
        own = IMAGE.match(node_type.get("docker", {}).get("worker_image", docker["worker_image"]))
        assert own and own["ray"] == ray.__version__ and own["py"] == parsed["head"]["py"], name
        if node_type["resources"].get("GPU", 0):
            assert own["platform"] != "cpu", f"{name}: GPU workers need a CUDA image"


@pytest.mark.parametrize(
    "demand,expected",
    [
        ([{"CPU": 1}] * 24, "cpu_worker"),  # shard: Ray Data read/resize/write tasks
        ([{"CPU": 1}], "cpu_worker"),  # evaluate: one task (evaluate.use_gpu=false)
        ([{"CPU": 4, "GPU": 1}] * 4, "gpu_worker"),  # train_vqvae under ray=cluster
    ],
)
def test_cpu_only_steps_do_not_start_gpu_nodes(cfg, demand, expected):
    """Ray's own autoscaler planning, from an idle cluster (the head has CPU: 0), for each kind of step's demand."""
    from ray.autoscaler._private.node_provider_availability_tracker import NodeAvailabilitySummary
    from ray.autoscaler._private.resource_demand_scheduler import _default_utilization_scorer, get_nodes_for

    types = {name: dict(t) for name, t in cfg["available_node_types"].items()}
    summary = NodeAvailabilitySummary(node_availabilities={})
    scorer = functools.partial(_default_utilization_scorer, node_availability_summary=summary)
    launch, unfulfilled = get_nodes_for(types, {}, cfg["head_node_type"], cfg["max_workers"], demand, scorer)
    assert not unfulfilled and set(launch) == {expected}, launch


def test_gpu_workers_autoscale_from_zero(cfg):
    head = cfg["available_node_types"][cfg["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0, "the head is a CPU node"
    gpu_types = {k: t for k, t in _worker_types(cfg).items() if t["resources"].get("GPU", 0) >= 1}
    assert gpu_types, "no GPU worker type"
    for name, node_type in gpu_types.items():
        assert node_type["min_workers"] == 0, f"{name}: GPUs must not idle while no job runs"
        assert node_type["max_workers"] >= 1, name


def test_token_auth_on_every_node(raw, cfg):
    from ray._private.authentication.authentication_token_setup import _get_default_token_path

    head_env = _docker_env(cfg, "head")
    worker_envs = {name: _docker_env(cfg, "worker", t) for name, t in _worker_types(cfg).items()}
    for where, env in {"head": head_env, **worker_envs}.items():
        assert env.get("RAY_AUTH_MODE") == "token", f"{where}: container without RAY_AUTH_MODE=token"
        assert env.get("RAY_AUTH_TOKEN_PATH") == head_env.get("RAY_AUTH_TOKEN_PATH"), f"{where}: other token path"
    token_path = head_env["RAY_AUTH_TOKEN_PATH"]

    # The same file, shipped to every node (file_mounts reach workers through the head), from the place
    # `ray get-auth-token --generate` writes it on the user's machine, which `ray job submit` also reads.
    mounts = {remote.replace("~/", CONTAINER_HOME + "/", 1): local for remote, local in cfg["file_mounts"].items()}
    assert token_path in mounts, f"nothing mounted at RAY_AUTH_TOKEN_PATH={token_path}"
    default = "~/" + str(_get_default_token_path().relative_to(Path.home()))
    assert mounts[token_path] == default

    # The start commands say it too, so they read right on their own.
    head_start = _ray_start(cfg["head_start_ray_commands"])
    worker_start = _ray_start(cfg["worker_start_ray_commands"])
    for start in (head_start, worker_start):
        assert "RAY_AUTH_MODE=token" in start and f"RAY_AUTH_TOKEN_PATH={token_path}" in start
    assert "--head" in head_start and "--address=$RAY_HEAD_IP:6379" in worker_start

    text = CLUSTER_YAML.read_text()
    assert "RAY_AUTH_TOKEN=" not in text, "the token never goes into the config"
    assert not re.search(r"\b[0-9a-f]{64}\b", text), "something token-shaped is in cluster.yaml"


def test_project_installed_on_every_node(raw, cfg):
    assert raw["file_mounts"].get("~/vqvae2") == ".", "the repo (ray up runs from its root) goes to ~/vqvae2"
    for kind in ("head", "worker"):
        installs = [c for c in cfg[f"{kind}_setup_commands"] if "pip install" in c and "-e ~/vqvae2" in c]
        assert installs, f"{kind} nodes do not install the project"
    # The upload skips what git ignores: .venv alone is gigabytes.
    assert ".gitignore" in cfg["rsync_filter"]
    assert ".venv" in (REPO / ".gitignore").read_text().split()  # the folder, or a link to one


def _mlflow_commands(cfg: dict) -> list[str]:
    return [c for c in cfg["head_start_ray_commands"] if "mlflow" in c]


def test_mlflow_server_on_the_head_only(cfg):
    servers = [c for c in _mlflow_commands(cfg) if "mlflow server" in c]
    assert len(servers) == 1
    server = servers[0]
    assert "--host 0.0.0.0" in server and "--port 5000" in server
    # Behind a login: the authentication app, installed on the head, the login copied to every node.
    assert "--app-name basic-auth" in server and any("mlflow[auth]" in c for c in cfg["head_setup_commands"])
    assert "~/.mlflow/credentials" in cfg["file_mounts"]
    settings = yaml.safe_dump(cfg)
    assert not re.search(r"(?i)password\s*[=:]\s*[^\s\"'(]", settings), "no password in cluster.yaml's settings"
    assert re.search(r"--backend-store-uri (sqlite|postgresql)\S*://\S+", server)
    # Artifacts on shared storage, proxied by the server: workers only need http://<head>:5000.
    assert re.search(r"--artifacts-destination s3://\S+", server)
    worker_commands = cfg["worker_setup_commands"] + cfg["worker_start_ray_commands"]
    assert not any("mlflow server" in c for c in worker_commands)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_mlflow_start_commands_run(cfg, tmp_path):
    """The head's MLflow commands, run here with local paths: the server comes up healthy, a rerun stops it."""
    store, port = tmp_path / "mlflow", _free_port()
    store.mkdir()

    def local(cmd: str) -> str:
        cmd = cmd.replace("~/mlflow", str(store)).replace(f"{CONTAINER_HOME}/mlflow", str(store))
        cmd = re.sub(r"--artifacts-destination \S+", f"--artifacts-destination file://{tmp_path}/artifacts", cmd)
        return cmd.replace("--port 5000", f"--port {port}").replace(":5000/", f":{port}/")

    stop_cmd, auth_cmd, start_cmd, health_cmd = (local(c) for c in _mlflow_commands(cfg))
    assert "kill" in stop_cmd and "mlflow server" in start_cmd and "/health" in health_cmd
    env = {**os.environ, "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])}
    # The login file_mounts copies to every node: here in a HOME of the test's own.
    home, password = tmp_path / "home", os.urandom(8).hex()
    (home / ".mlflow").mkdir(parents=True)
    login = f"[mlflow]\nmlflow_tracking_username = admin-x\nmlflow_tracking_password = {password}\n"
    (home / ".mlflow" / "credentials").write_text(login)
    env["HOME"] = str(home)
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        env.pop(name, None)
    # MLflow's job runner (GenAI scoring, trace archival) adds a dozen processes and seconds to the start-up;
    # nothing here uses it, and the commands under test are the same without it.
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"

    def sh(cmd: str, timeout: float) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "-c", cmd], env=env, cwd=tmp_path, timeout=timeout, capture_output=True)

    pid_file = store / "server.pid"
    try:
        assert sh(stop_cmd, 30).returncode == 0  # no server yet: a no-op
        made = sh(auth_cmd, 60)
        assert made.returncode == 0, made.stderr.decode()[-3000:]
        ini = (store / "basic_auth.ini").read_text()
        assert "admin_username = admin-x" in ini and password not in ini
        assert sh(start_cmd, 30).returncode == 0
        health = sh(health_cmd, 300)
        assert health.returncode == 0, health.stdout.decode()[-3000:]
        pgid = int(pid_file.read_text())
        search = f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search?max_results=1"
        assert _status(search) == 401, "every request needs the login"
        assert _status(search, ("admin-x", password)) == 200, "the credentials file's user is the admin"
        assert password not in (store / "server.log").read_text(errors="replace")
        assert sh(stop_cmd, 30).returncode == 0
        deadline = time.monotonic() + 30
        while _alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not _alive(pgid), "the stop command left the MLflow server running"
    finally:
        if pid_file.exists() and _alive(pgid := int(pid_file.read_text())):
            os.killpg(pgid, signal.SIGKILL)  # the group this test started, nothing else


def _status(url: str, login: tuple[str, str] | None = None) -> int:
    request = urllib.request.Request(url)
    if login:
        request.add_header("Authorization", "Basic " + base64.b64encode(":".join(login).encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def _alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    if not Path("/proc").is_dir():
        return True
    # Signal 0 also reaches zombies that nobody reaped yet; count only running members.
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False
