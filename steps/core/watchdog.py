"""No silent stall: a unit of a step's work (a shard file to write, an image file to encode, a sample shard to write)
that makes no progress for ``stall_timeout_s`` seconds fails, naming the unit and what it was doing.

A hung mount or a stuck network read blocks a thread in the kernel, where Python cannot interrupt it. So the unit runs
in a thread of its own while the task's thread watches its heartbeat: every step of the unit (an image, a batch, a file
written) beats, and a beat that does not come in time raises :class:`StalledError` in the task (Ray then fails or
retries it, and the step's error names the file). The stuck thread is left behind as a daemon; it ends if the call it
is stuck in ever returns. Per-item reads of the shard step have their own limit (``data.read_timeout_s``,
:mod:`steps.io.reading`); this one covers everything else a unit does.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
POLL_S = 1.0  # how often the watching thread looks at the heartbeat (at most)


class StalledError(TimeoutError):
    """A unit of work made no progress for the step's ``stall_timeout_s``; the message names it."""


class Heartbeat:
    """What a watched unit calls as it progresses, saying what it does next (``beat("writing part-00003")``)."""

    def __init__(self) -> None:
        self.at = time.monotonic()
        self.doing = "starting"

    def __call__(self, doing: str | None = None) -> None:
        self.at = time.monotonic()
        if doing is not None:
            self.doing = doing


def watched(work: Callable[[Heartbeat], T], what: str, stall_s: float) -> T:
    """``work(beat)``'s result, or :class:`StalledError` once ``stall_s`` seconds pass without a beat (0: no limit,
    ``work`` runs in this thread). ``what`` names the unit in the error (a file, a shard)."""
    beat = Heartbeat()
    if not stall_s or stall_s <= 0:
        return work(beat)
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["value"] = work(beat)
        except BaseException as exc:  # handed to the watching thread, which raises it
            outcome["error"] = exc

    thread = threading.Thread(target=run, name=f"watched: {what}"[:60], daemon=True)
    thread.start()
    while thread.is_alive():
        idle = time.monotonic() - beat.at
        if idle >= stall_s:
            raise StalledError(
                f"{what}: no progress for {idle:.0f} s while {beat.doing} (stall_timeout_s={stall_s:g}); given up"
            )
        thread.join(timeout=min(POLL_S, stall_s - idle))
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["value"]  # type: ignore[return-value]
