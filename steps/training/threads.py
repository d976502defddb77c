"""CPU threads handed on between training runs that share a node: when one run's workers finish, the runs still
training beside them on the same node take up their threads.

train_prior trains its levels side by side, one Ray Train run per level, each worker with ``cpus_per_worker``
threads. The levels rarely take equally long (the bottom's code map is four times the top's), so without this the
cores the first level held idle while the other trains alone. A :class:`ThreadLedger` (a small Ray actor, no CPUs of
its own) keeps each worker's node, its own thread count and whether it has finished; every worker's
:class:`ThreadShare` asks it, without blocking a step, how many threads it may use now: its own plus an even share of
those its finished neighbours on the same node held.

The Ray scheduler still counts the finished run's CPUs as free, so another job placed on that node meanwhile
oversubscribes it until these runs end. And the count of threads changes the order of a few floating-point
reductions: a run that took up threads is not bitwise what a run without would be, and when it took them up depends
on timing. That is why it is a setting (``train_prior.share_threads``), not always on.
"""

from __future__ import annotations

import logging
import time
from typing import Any

log = logging.getLogger(__name__)
ASK_EVERY_S = 5.0  # how often a worker asks the ledger (never blocking: the answer is read at the next ask)


class Ledger:
    """Which training workers run on which node with how many threads of their own, and which have finished."""

    def __init__(self) -> None:
        self._workers: dict[str, tuple[str, int, bool]] = {}  # key -> (node, own threads, finished)

    def join(self, key: str, node: str, own: int) -> int:
        """Worker ``key`` trains on ``node`` with ``own`` threads (a restarted worker joins again, unfinished)."""
        self._workers[key] = (node, own, False)
        return self.threads(key)

    def leave(self, key: str) -> None:
        """Worker ``key`` has finished training: its threads go to its unfinished neighbours."""
        if key in self._workers:
            node, own, _ = self._workers[key]
            self._workers[key] = (node, own, True)

    def threads(self, key: str) -> int:
        """How many threads worker ``key`` may use now: its own, plus an even share of those its finished
        neighbours on its node held (the remainder to the first by key, so the shares add up)."""
        node, own, finished = self._workers[key]
        if finished:
            return own
        here = {k: w for k, w in self._workers.items() if w[0] == node}
        active = sorted(k for k, w in here.items() if not w[2])
        freed = sum(w[1] for w in here.values() if w[2])
        share, extra = divmod(freed, len(active))
        return own + share + (1 if active.index(key) < extra else 0)


class ThreadLedger:
    """The driver's side: one :class:`Ledger` actor for a set of training runs that may share nodes. Pass it to
    every run's :func:`steps.training.loop.fit`; :meth:`close` when they have all returned."""

    def __init__(self) -> None:
        import ray

        self.actor = ray.remote(num_cpus=0)(Ledger).remote()
        self.ask_every_s = ASK_EVERY_S

    def close(self) -> None:
        import ray

        ray.kill(self.actor)


class ThreadShare:
    """A worker's side: :meth:`poll` after every step sets ``torch``'s thread count to what the ledger last said,
    :meth:`leave` when training is over. A ledger that cannot be reached (its driver gone) only stops the sharing:
    the worker goes on with the threads it has."""

    def __init__(self, ledger: ThreadLedger, key: str, own: int) -> None:
        import ray

        self.key, self.own, self.threads = key, own, own
        self._actor: Any = ledger.actor
        self._every = ledger.ask_every_s
        self._asked = time.monotonic()
        self._pending: Any = None
        try:  # the answer (more threads, for a worker restarted after its neighbours finished) is read by poll()
            self._pending = self._actor.join.remote(key, ray.get_runtime_context().get_node_id(), own)
        except Exception as exc:  # the ledger is an optimisation: training goes on without it
            self._give_up(exc)

    def poll(self) -> None:
        """Take up the threads the ledger's last answer gives, and ask again every ``ask_every_s``."""
        import ray

        if self._actor is None:
            return
        try:
            if self._pending is not None and ray.wait([self._pending], timeout=0)[0]:
                self._set(ray.get(self._pending))
                self._pending = None
            if self._pending is None and time.monotonic() - self._asked >= self._every:
                self._pending, self._asked = self._actor.threads.remote(self.key), time.monotonic()
        except Exception as exc:
            self._give_up(exc)

    def leave(self) -> None:
        if self._actor is None:
            return
        try:
            self._actor.leave.remote(self.key)
        except Exception as exc:
            self._give_up(exc)

    def _set(self, threads: int) -> None:
        import torch

        if threads != self.threads:
            log.info("%s: %d CPU threads (was %d): its neighbours on this node finished or restarted", self.key,
                     threads, self.threads)  # fmt: skip
            self.threads = threads
            torch.set_num_threads(threads)

    def _give_up(self, exc: Exception) -> None:
        log.warning("%s: cannot reach the thread ledger (%s); going on with %d threads", self.key, exc, self.threads)
        self._actor = None
