"""Fingerprints and the artifact store: what makes a finished step skippable and a crashed one harmless.

    <root>/<step>/<fingerprint>/            a finished output; its _SUCCESS (JSON) is written before it appears
    <root>/<step>/<fingerprint>.partial/    work in progress (a crashed attempt resumes or restarts here)
    <root>/<step>/<fingerprint>.lock        held while a pipeline works on that output (on an object store a prefix
                                            of lease objects: pipeline/lease.py)
    <root>/_cache/evaluate/                 evaluate's features and classifier by content (steps/evaluation/cache.py);
                                            not an output: nothing checks it, and deleting it is always safe

fingerprint = sha256(step name, resolved step config, upstream fingerprints, project version). On local disk a step
writes into ``.partial`` and the directory is renamed into place with ``_SUCCESS`` inside, so a directory without
``.partial`` in its name is always complete. On object stores (no rename) the step writes in place and
``_SUCCESS`` goes last; readers only trust directories with a ``_SUCCESS``. Two pipelines on one root serialise on
the lock (``fcntl`` on local disk, a heartbeat lease on object stores): the second finds the first one's
``_SUCCESS`` and skips the step.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator, Mapping

from pipeline import __version__
from pipeline.lease import POLL, TTL, Lease
from steps.artifacts import records
from steps.io import storage
from steps.nn.config import ConfigBase


def fingerprint(step: str, config: ConfigBase, upstream: Mapping[str, str]) -> str:
    """Settings that cannot change a step's result (marked ``no_effect`` on their field: a retry budget, a pool
    size) are left out, so changing them neither invalidates finished work nor stops an interrupted step resuming."""
    payload = {
        "step": step,
        "config": config.result_dict(),
        "upstream": dict(sorted(upstream.items())),
        "version": __version__,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


class ArtifactStore:
    def __init__(self, root: str, lease_ttl: float = TTL, lease_poll: float = POLL) -> None:
        """``lease_ttl``, ``lease_poll``: of the lock on object stores (:class:`pipeline.lease.Lease`)."""
        self.root = root
        self.local = storage.is_local(root)
        self.lease_ttl, self.lease_poll = lease_ttl, lease_poll
        self._leases: dict[tuple[str, str], Lease] = {}  # held on an object store, checked again before publishing

    def final(self, step: str, fp: str) -> str:
        return storage.join(self.root, step, fp)

    def work_dir(self, step: str, fp: str) -> str:
        """Where the step writes while it runs."""
        return storage.join(self.root, step, fp + ".partial") if self.local else self.final(step, fp)

    def record(self, step: str, fp: str) -> dict | None:
        """The ``_SUCCESS`` record of a finished output, or None."""
        return records.read(self.final(step, fp))

    @contextlib.contextmanager
    def lock(self, step: str, fp: str) -> Iterator[None]:
        """Exclusive hold on one output: an ``fcntl`` lock on local disk, a :class:`~pipeline.lease.Lease` on an
        object store (a dead pipeline's lease expires after ``lease_ttl`` seconds)."""
        if not self.local:
            lease = Lease(storage.join(self.root, step, fp + ".lock"), self.lease_ttl, self.lease_poll, _say)
            with lease:
                self._leases[(step, fp)] = lease
                try:
                    yield
                finally:
                    del self._leases[(step, fp)]
            return
        path = storage.filesystem(storage.join(self.root, step, fp + ".lock"))[1]
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "a") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                print(f"[pipeline] {step} {fp}: another pipeline is working on it; waiting for its lock", flush=True)
                fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def clear_work_dir(self, step: str, fp: str) -> None:
        path = storage.filesystem(self.work_dir(step, fp))[1]
        if self.local and os.path.isdir(path):
            shutil.rmtree(path)

    def publish(self, step: str, fp: str, record: dict) -> str:
        """Write ``_SUCCESS`` and move the work into place; returns the final URI."""
        work, final = self.work_dir(step, fp), self.final(step, fp)
        if not self.local:
            if (step, fp) in self._leases:
                self._leases[(step, fp)].check()  # a lease lost in a stall: the pipeline that took it over publishes
            records.write(final, record)
            return final
        work_path, final_path = storage.filesystem(work)[1], storage.filesystem(final)[1]
        records.write(work, record)
        if os.path.exists(final_path):  # a forced rerun replaces the old output
            old = f"{final_path}.old-{int(time.time())}"
            os.replace(final_path, old)
            os.replace(work_path, final_path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(work_path, final_path)
        return final


def _say(line: str) -> None:
    print(line, flush=True)


def relocate(uri: str, work: str, final: str) -> str:
    """An artifact URI the step reported under its work dir, as it reads after publishing."""
    return final + uri[len(work) :] if uri.startswith(work) else uri
