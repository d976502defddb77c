"""Disk and permissions, on real file systems: a read-only artifacts root, and one that fills up mid-step.

Both need a small tmpfs mounted by the test (root, or a user allowed to mount); elsewhere they are skipped with the
reason. The full-disk case: a 1 MiB root holds the shards but not train_vqvae's checkpoint. The step fails with a
message naming it and the place, nothing of it is published, the shards stay valid; after the mount grows (space
freed) the same command reuses the shards and finishes train_vqvae, and pipeline.verify passes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e


@pytest.fixture
def mount(tmp_path):
    mounted: list[Path] = []

    def make(name: str, *options: str) -> Path:
        point = tmp_path / name
        point.mkdir()
        command = ["mount", "-t", "tmpfs", "-o", ",".join(options), "tmpfs", str(point)]
        proc = subprocess.run(command, capture_output=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()}")
        mounted.append(point)
        return point

    yield make
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], check=False)


def pipeline(workdir: Path, root: Path, *overrides: str) -> subprocess.CompletedProcess:
    settings = ["debug=tiny", f"artifacts.root={root}", f"mlflow.tracking_uri=sqlite:///{workdir / 'mlflow.db'}"]
    cmd = [sys.executable, "-m", "pipeline", *settings, *overrides]
    return subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=900)


def test_a_read_only_root_stops_before_anything_runs(tmp_path, mount):
    root = mount("ro", "ro", "size=1m") / "artifacts"
    proc = pipeline(tmp_path, root, "steps=[shard]")
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"error: artifacts.root '{root}' is not writable: OSError: Read-only file system" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert "plan:" not in proc.stdout + proc.stderr  # stopped before planning, before Ray


def test_a_disk_that_fills_up_fails_the_step_by_name_and_the_rerun_finishes(tmp_path, mount):
    disk = mount("small", "size=1m")
    root = disk / "artifacts"
    proc = pipeline(tmp_path, root, "steps=[shard,train_vqvae]")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-5000:]
    assert "error: train_vqvae: no space left on the device while writing under " in proc.stderr, out[-5000:]
    assert f"(artifacts.root={root})" in proc.stderr and "Nothing of train_vqvae was published" in proc.stderr
    assert len(list((root / "shard").glob("*/_SUCCESS"))) == 1  # the finished step is intact
    assert not list((root / "train_vqvae").glob("*/_SUCCESS"))  # nothing half-written is published

    subprocess.run(["mount", "-o", "remount,size=64m", "tmpfs", str(disk)], check=True)  # space freed
    proc = pipeline(tmp_path, root, "steps=[shard,train_vqvae]")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    assert "shard=cached" in out and "train_vqvae=run" in out
    assert len(list((root / "train_vqvae").glob("*/_SUCCESS"))) == 1
    verify = subprocess.run(
        [sys.executable, "-m", "pipeline.verify", str(root), "--json"], capture_output=True, text=True, timeout=300
    )
    assert verify.returncode == 0, verify.stdout[-3000:] + verify.stderr[-3000:]
    report = json.loads(verify.stdout)
    assert report["ok"] and report["errors"] == [] and len(report["outputs"]) == 2, report
