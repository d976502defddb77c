"""Fault scenarios of input and output: a hostile input folder, a read-only root, a disk that fills up mid-step.

They complete :data:`drills.scenarios.SCENARIOS` for ``bench/faults.py`` and run the same way: ``python -m pipeline
debug=tiny`` as subprocesses on a :class:`~drills.workspace.Workspace` of their own.

* ``hostile_folder``: an image folder holding a FIFO, a socket, a link to ``/dev/zero``, a link loop, a broken link and
  a file over ``data.max_file_mb`` beside good images. Survived: the shard step finishes (no hang) with every good
  image and every hostile entry named in the manifest's skipped list.
* ``read_only_root``: ``artifacts.root`` on a read-only tmpfs. Survived: exit 2 before anything runs, the error
  naming ``artifacts.root``, no traceback.
* ``disk_full``: ``artifacts.root`` on a 1 MiB tmpfs: the shards fit, train_vqvae's checkpoint does not. Survived:
  exit 1 with the error naming train_vqvae, nothing of it published, the shards intact; after the mount grows the
  same command reuses the shards, finishes train_vqvae, and ``pipeline.verify`` passes.

The last two mount a tmpfs (root, or a user allowed to mount); where that is impossible they report ``skipped``. The
disk_full root stays mounted until :func:`release_mounts` (or the process's exit): its train_vqvae, trained again after
the disk filled up, is compared with a clean run's by ``bench/faults.py``, which then releases it before removing its
temporary folder.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from drills.workspace import Workspace
from pipeline.verify import verify
from steps.artifacts.images import ImageShards

HOSTILE = ("fifo.png", "socket.png", "zero.png", "loop.png", "gone.png", "huge.png")


def hostile_folder_at(root: Path, good: int = 12) -> list[str]:
    """Good PNGs and one entry of every hostile kind under ``root``; returns the hostile names."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(good):
        Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8)).save(root / f"good-{i:02d}.png")
    os.mkfifo(root / "fifo.png")
    with contextlib.closing(socket.socket(socket.AF_UNIX)) as sock:
        sock.bind(str(root / "socket.png"))
    (root / "zero.png").symlink_to("/dev/zero")
    (root / "loop.png").symlink_to(root / "loop.png")
    (root / "gone.png").symlink_to(root / "deleted.png")
    (root / "huge.png").write_bytes(b"\0" * (2 << 20))
    return list(HOSTILE)


def hostile_folder(ws: Workspace) -> dict[str, Any]:
    folder = ws.path / "hostile"
    names = hostile_folder_at(folder)
    overrides = ("data=image_folder", f"data.path={folder}", "data.image_size=32", "data.channels=1")
    rc, _ = ws.run(*overrides, "data.max_file_mb=1", "steps=[shard]", timeout=600)
    finished = ws.finished("shard")
    manifest = ImageShards.open(finished[0]).manifest if finished else {}
    named = sorted(os.path.basename(s["path"]) for s in manifest.get("skipped", []))
    rows = sum(manifest.get("rows", {}).values())
    facts = {"rc": rc, "rows": rows, "named": named}
    facts["survived"] = rc == 0 and rows == 12 and named == sorted(names)
    return facts


_KEPT: list[Path] = []  # tmpfs mounts kept after their scenario, released by release_mounts()


def _umount(point: Path) -> None:
    subprocess.run(["umount", "-l", str(point)], check=False)


def release_mounts() -> None:
    """Unmount every tmpfs a scenario kept mounted. Call it before removing the folders they sit in: a folder with a
    mount in it cannot be removed (EBUSY), which is how bench/faults.py once died after every scenario had passed."""
    while _KEPT:
        _umount(_KEPT.pop())


@contextlib.contextmanager
def tmpfs(point: Path, *options: str, keep: bool = False) -> Iterator[str | None]:
    """A tmpfs mounted at ``point`` for the block (None), or why it cannot be (a string). ``keep``: stays mounted
    until the process exits, so its outputs can still be verified and compared with a clean run's."""
    point.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(options), "tmpfs", str(point)], capture_output=True)
    if proc.returncode != 0:
        yield f"cannot mount a tmpfs: {proc.stderr.decode(errors='replace').strip()}"
        return
    if keep:
        if not _KEPT:
            atexit.register(release_mounts)  # whatever the caller forgets
        _KEPT.append(point)
    try:
        yield None
    finally:
        if not keep:
            _umount(point)


def read_only_root(ws: Workspace) -> dict[str, Any]:
    with tmpfs(ws.root, "ro", "size=1m") as cannot:
        if cannot:
            return {"skipped": cannot}
        rc, output = ws.run("steps=[shard]", timeout=300)
    facts = {"rc": rc, "named": f"artifacts.root '{ws.root}' is not writable" in output}
    facts["survived"] = rc == 2 and facts["named"] and "Traceback" not in output
    return facts


def disk_full(ws: Workspace) -> dict[str, Any]:
    steps = "steps=[shard,train_vqvae]"
    with tmpfs(ws.root, "size=1m", keep=True) as cannot:
        if cannot:
            return {"skipped": cannot}
        rc, output = ws.run(steps)
        facts: dict[str, Any] = {
            "rc": rc,
            "named": "error: train_vqvae: no space left on the device while writing under" in output,
            "published_when_full": {s: len(ws.finished(s)) for s in ("shard", "train_vqvae")},
        }
        subprocess.run(["mount", "-o", "remount,size=64m", "tmpfs", str(ws.root)], check=True)  # space freed
        facts["rerun_rc"], output = ws.run(steps)
        facts["shards_reused"] = "shard=cached" in output
        report = verify(str(ws.root))
        facts.update(verify_ok=report.ok, outputs_after=len(report.outputs))
    facts["survived"] = (
        rc == 1 and facts["named"] and facts["published_when_full"] == {"shard": 1, "train_vqvae": 0}
        and facts["rerun_rc"] == 0 and facts["shards_reused"] and facts["verify_ok"] and facts["outputs_after"] == 2
    )  # fmt: skip
    return facts


SCENARIOS = {"hostile_folder": hostile_folder, "read_only_root": read_only_root, "disk_full": disk_full}
