"""A lock on an object store (S3, GCS, any S3 API) through ``pyarrow.fs`` alone: no conditional writes needed.

    <root>/<step>/<fingerprint>.lock/<holder>     one small JSON object per pipeline that wants the output

To take the lock, a pipeline writes its own object under the lock prefix, then lists the prefix. Alone there, it
holds the lock; if another live holder's object is there, it deletes its own, waits and tries again (with random
jitter, so two that collide do not collide forever). This is mutual exclusion on any store whose writes show up in
the next listing (S3 since 2020, GCS): if both A and B held it, A's listing came before B's write and B's listing
before A's write, yet each write comes before its own listing, which is a cycle.

The holder rewrites its object every ``ttl / 4`` seconds (a heartbeat). An object not rewritten for ``ttl`` seconds,
judged by the store's own clock (its modification times, so no two machines' clocks are compared), belongs to a dead
pipeline: the next one deletes it and takes over. A holder that stalls for longer than ``ttl`` loses the lock; its
heartbeat notices, and :meth:`Lease.check` (called before publishing) refuses to publish.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import random
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable

import pyarrow.fs as pafs

from steps.io import storage

TTL = 60.0  # seconds without a heartbeat after which a holder counts as dead
POLL = 5.0  # seconds between tries while another pipeline holds the lock


class LeaseLostError(RuntimeError):
    """The lease expired while held (the holder stalled for longer than its ttl) and another pipeline took it."""


class Lease:
    """Exclusive hold on ``uri`` (a prefix on an object store), with a heartbeat while held.

    Args:
        uri: the lock's prefix, e.g. ``s3://bucket/root/train_vqvae/<fp>.lock``.
        ttl: seconds without a heartbeat after which a holder is taken to be dead.
        poll: seconds between tries while another holder is alive (plus up to half as much again, at random).
        say: where progress lines go (who holds the lock, what is waited for).
    """

    def __init__(self, uri: str, ttl: float = TTL, poll: float = POLL, say: Callable[[str], None] = print) -> None:
        self.uri, self.ttl, self.poll, self.say = uri.rstrip("/"), ttl, poll, say
        host = re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname())[:60]
        self.holder = f"{host}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.fs, self.path = storage.filesystem(self.uri)
        self.key = f"{self.path}/{self.holder}"
        self.lost = False
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    # ------------------------------------------------------------------ acquire / release
    def acquire(self) -> None:
        """Block until this pipeline holds the lock."""
        waiting_for = None
        while True:
            self._write()
            others = self._others()
            if not others:
                break
            self.fs.delete_file(self.key)  # step back, so that the holder (or a waiter that collided) can go on
            holders = sorted(others)
            if holders != waiting_for:
                waiting_for = holders
                self.say(f"[pipeline] {self.uri}: held by {', '.join(holders)}; waiting (a holder silent for "
                         f"{self.ttl:.0f} s counts as dead)")  # fmt: skip
            time.sleep(self.poll * (1 + random.random() / 2))
        self.lost = False
        self._stop.clear()
        self._beat = threading.Thread(target=self._heartbeat, name=f"lease {self.uri}", daemon=True)
        self._beat.start()

    def release(self) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
            self._beat = None
        if not self.lost:
            with contextlib.suppress(FileNotFoundError):  # taken over after a stall the heartbeat had not seen yet
                self.fs.delete_file(self.key)

    def __enter__(self) -> Lease:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def check(self) -> None:
        """Raise :class:`LeaseLostError` unless this pipeline still holds the lock (call it before publishing)."""
        if self.lost or self._info(self.key).type != pafs.FileType.File:
            self.lost = True
            raise LeaseLostError(
                f"{self.uri}: this pipeline ({self.holder}) lost its lock: it stalled for longer than {self.ttl:.0f} "
                "s and another pipeline took over; not publishing (run the pipeline again to reuse that one's output)"
            )

    # ------------------------------------------------------------------ the objects
    def _write(self) -> None:
        body = {"holder": self.holder, "host": socket.gethostname(), "pid": os.getpid(), "ttl": self.ttl}
        with self.fs.open_output_stream(self.key) as f:
            f.write(json.dumps(body).encode())

    def _info(self, path: str) -> pafs.FileInfo:
        return self.fs.get_file_info(path)

    def _others(self) -> dict[str, float]:
        """The other live holders (name -> seconds since their last heartbeat); dead ones are deleted here."""
        found = self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))
        files = {i.base_name: i for i in found if i.type == pafs.FileType.File}
        mine = files.pop(self.holder, None)
        now = _seconds(mine.mtime) if mine is not None and mine.mtime is not None else time.time()
        live = {}
        for name, info in files.items():
            age = now - _seconds(info.mtime) if info.mtime is not None else 0.0
            if age <= self.ttl:
                live[name] = age
                continue
            self.say(f"[pipeline] {self.uri}: {name} sent no heartbeat for {age:.0f} s; taking over its lock")
            with contextlib.suppress(FileNotFoundError):  # another waiter deleted it first
                self.fs.delete_file(info.path)
        return live

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            try:
                if self._info(self.key).type != pafs.FileType.File:
                    self.lost = True
                    self.say(f"[pipeline] {self.uri}: lost the lock (silent for over {self.ttl:.0f} s, taken over)")
                    return
                self._write()
            except OSError as exc:  # a network blip: the next beat tries again, well within the ttl
                self.say(f"[pipeline] {self.uri}: heartbeat failed ({exc}); retrying")


def _seconds(mtime: dt.datetime | float) -> float:
    return mtime.timestamp() if isinstance(mtime, dt.datetime) else float(mtime)
