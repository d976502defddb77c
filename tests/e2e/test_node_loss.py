"""A node lost mid-run on a real two-node Ray cluster: the pipeline finishes on the node that is left, nothing lost.

The cluster is two ``ray start`` processes on this machine (tests/ray_cluster.py): a token-authenticated head
with 3 CPUs, which runs the driver, and a worker node with 2. ``train_vqvae`` asks for 2 training workers of 2 CPUs
each, so neither node holds both: one worker runs on each. ``encode`` runs 2 actors, which Ray Data spreads. Once the
worker node holds a training worker (or an encode actor) and the step has made progress (a checkpoint, a code file),
the node's whole process group gets SIGKILL, the way a machine is lost: no goodbye to the GCS.

- **node_loss_train**: Ray Train restarts the worker group from the step-5 checkpoint with the one worker the head
  still fits (``train.min_workers=1``: elastic training), and training still ends at step 10.
- **node_loss_encode**: Ray Data restarts the lost actor on the head and retries the file it was encoding; a code
  file is written whole or not at all, so no row is lost or doubled.

The driver joins the cluster through ``RAY_ADDRESS`` (like a job that ``ray job submit`` starts on the head), so the
MLflow store may be a SQLite file: every node runs on this machine and reaches it. Afterwards
``python -m pipeline.verify`` (what users run after an incident) must find every row exactly once.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import time

import pytest
from ray_cluster import LocalCluster, WorkerNode, actors_on, nodes, start_head, start_worker_node

from drills.workspace import Workspace, kill
from steps.artifacts.checkpoints import TRAIN_STATE_FILE

pytestmark = pytest.mark.e2e

RUN_TIMEOUT_S = 12 * 60
HEAD_CPUS, NODE_CPUS = 3, 2  # one 2-CPU training worker fits on each node, never two on one
SETTINGS = (
    "data.limit=400",
    "data.rows_per_shard=10",  # 40 image files: encode is still busy when the node goes
    "train_vqvae.train.num_workers=2",
    "train_vqvae.train.cpus_per_worker=2",
    "train_vqvae.train.min_workers=1",
    "encode.num_actors=2",
    "encode.batch_size=8",
)


@pytest.fixture(scope="module")
def head():
    cluster = start_head(num_cpus=HEAD_CPUS)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Workspace:
    """One artifacts root for both scenarios: encode's scenario reuses the shards and VQ-VAE of training's."""
    return Workspace(tmp_path_factory.mktemp("node-loss"))


@pytest.fixture
def node(head: LocalCluster):
    worker = start_worker_node(head, num_cpus=NODE_CPUS)
    try:
        yield worker
    finally:
        worker.stop()


def run_and_lose_node(
    ws: Workspace, head: LocalCluster, node: WorkerNode, steps: str, actor: str, progress: str
) -> tuple[int, str]:
    """Run the pipeline's ``steps`` as a driver on the head; kill ``node`` once an ``actor`` runs on it and a file
    matching ``<root>/<progress>`` exists. Returns (exit status, the driver's output)."""
    log_path = ws.path / f"{steps.strip('[]').replace(',', '-')}.log"
    env = {**head.client_env(), "RAY_ADDRESS": f"127.0.0.1:{head.gcs_port}", "PYTHONUNBUFFERED": "1"}
    # Ray Data hands out files as soon as one encode actor is up; on a loaded machine the head's actor could encode
    # them all before the worker node's started. Waiting for the whole pool makes sure the node has work to lose.
    env["RAY_DATA_DEFAULT_WAIT_FOR_MIN_ACTORS_S"] = "300"
    with open(log_path, "w") as out:
        proc = subprocess.Popen(
            ws.command(*SETTINGS, f"steps={steps}"), cwd=ws.path, env=env, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        placed = False  # once the actor is on the node it stays there until the step ends (or the node does)
        while proc.poll() is None and time.monotonic() < deadline:
            # The state query takes a second or more under load; the progress check is a cheap glob, so once the
            # actor is placed the kill follows the first progress file within one poll, while the node still works.
            placed = placed or actors_on(head, node.node_id, actor)
            if placed and glob.glob(str(ws.root / progress), recursive=True):
                node.kill()
                break
            time.sleep(0.05)
        else:
            output = log_path.read_text(errors="replace")[-8000:]
            pytest.fail(f"the pipeline ended (rc {proc.poll()}) before a {actor} ran on the worker node:\n{output}")
        rc = proc.wait(timeout=max(deadline - time.monotonic(), 1))
    finally:
        if proc.poll() is None:
            kill(proc)
    return rc, log_path.read_text(errors="replace")


def assert_node_lost(head: LocalCluster, node: WorkerNode, within_s: float = 120.0) -> None:
    """The GCS declares the killed node DEAD once its health checks fail for a while, which can be after a short step
    has already finished on the head: wait for it."""
    deadline = time.monotonic() + within_s
    while True:
        states = {n["node_id"]: n["state"] for n in nodes(head)}
        if states.get(node.node_id) == "DEAD" or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    assert states.get(node.node_id) == "DEAD", f"the killed node should be DEAD in the GCS: {states}"


def assert_verified(ws: Workspace, *steps: str) -> dict:
    """``python -m pipeline.verify --json <root>``: exit 0, nothing in progress, every row of ``steps`` once."""
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.verify", "--json", str(ws.root)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
    report = json.loads(proc.stdout)
    assert not report["errors"] and not report["in_progress"], report
    for step in steps:
        counted = {k: v for k, v in report["rows"].items() if k.startswith(step + "/")}
        assert counted, f"pipeline.verify counted no {step} rows: {report['rows']}"
        for key, rows in counted.items():
            assert rows["found"] == rows["expected"] > 0, (key, rows)
            assert rows["duplicates"] == rows["missing"] == rows["extra"] == 0, (key, rows)
    return report


@pytest.mark.timeout(RUN_TIMEOUT_S + 300)
def test_node_loss_train(head: LocalCluster, node: WorkerNode, workspace: Workspace):
    """The worker node dies after the step-5 checkpoint; the head alone trains steps 6-10 from it."""
    checkpoint = f"train_vqvae/*.partial/**/checkpoint_*/{TRAIN_STATE_FILE}"
    rc, output = run_and_lose_node(workspace, head, node, "[shard,train_vqvae]", "RayTrainWorker", checkpoint)
    assert rc == 0, output[-10000:]
    assert_node_lost(head, node)
    assert "train_vqvae: resumed from step 5" in output, output[-10000:]
    # One MLflow run for the step; the restart marked at step 5; every loss point logged once, the last at step 10.
    assert workspace.metric_steps("train_vqvae", "train/resumed_from") == [[5]]
    assert workspace.metric_steps("train_vqvae", "train/loss") == [[5, 10]]
    assert len(workspace.finished("train_vqvae")) == 1 and not workspace.partial("train_vqvae")
    assert_verified(workspace, "shard")


@pytest.mark.timeout(RUN_TIMEOUT_S + 300)
def test_node_loss_encode(head: LocalCluster, node: WorkerNode, workspace: Workspace):
    """The worker node dies while one of its encode actors works through the image files; the head does the rest."""
    rc, output = run_and_lose_node(
        workspace, head, node, "[shard,train_vqvae,encode]", "MapWorker(MapBatches(FileEncoder))",
        "encode/*.partial/*/*.parquet",
    )  # fmt: skip
    assert rc == 0, output[-10000:]
    assert_node_lost(head, node)
    assert "will be retried" in output, f"Ray retried the lost actor's file:\n{output[-10000:]}"
    (codes,) = workspace.finished("encode")
    assert not workspace.partial("encode")
    report = assert_verified(workspace, "shard", "encode")
    for split in ("train", "val"):
        fp = os.path.basename(codes)
        shard_fp = os.path.basename(workspace.finished("shard")[0])
        assert report["rows"][f"encode/{fp}/{split}"]["found"] == report["rows"][f"shard/{shard_fp}/{split}"]["found"]
