"""Console progress of long steps: one line at least every :data:`PROGRESS_EVERY_S` seconds, and one at the end.

A line says how far the step is, how fast it goes and how long it has left::

    train_vqvae  step 1200/3000 (40%)  loss 0.0213  val mse 0.0041  412 img/s  eta 3m12s
    encode  rows 8192/60000 (13%)  850 rows/s  eta 56s
    shard  rows 1797/1797 (100%)  640 rows/s  done in 2.8s

:func:`line` formats (pure); :class:`Progress` keeps the counts and the clock and says when a line is due; :func:`watch`
logs lines from a background thread while a step waits in a blocking call (a Ray Data execution).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator

PROGRESS_EVERY_S = 30.0


def duration(seconds: float) -> str:
    """``42s``, ``3m12s``, ``2h05m``; tenths below ten seconds (``2.8s``)."""
    if seconds < 9.95:
        return f"{max(seconds, 0.0):.1f}s"
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def line(
    name: str,
    done: int,
    total: int,
    *,
    unit: str = "step",
    loss: float | None = None,
    val: tuple[str, float] | None = None,
    rate: float | None = None,
    rate_unit: str = "img/s",
    eta: float | None = None,
    elapsed: float | None = None,
) -> str:
    """One progress line; ``done in <elapsed>`` replaces the eta once ``done`` reaches ``total``."""
    percent = int(100 * done / total) if total > 0 else 100
    parts = [name, f"{unit} {done}/{total} ({percent}%)"]
    if loss is not None:
        parts.append(f"loss {loss:.4g}")
    if val is not None:
        parts.append(f"{val[0]} {val[1]:.4g}")
    if rate is not None:
        parts.append(f"{rate:.0f} {rate_unit}" if rate >= 10 else f"{rate:.1f} {rate_unit}")
    if done >= total and elapsed is not None:
        parts.append(f"done in {duration(elapsed)}")
    elif eta is not None:
        parts.append(f"eta {duration(eta)}")
    return "  ".join(parts)


class Progress:
    """Work done out of ``total`` units since ``done`` (a resumed run starts part way), against a clock.

    Args:
        name: what the line starts with (``train_prior[top]``).
        total: units of the whole job (steps, rows).
        done: units already done when this attempt started.
        unit: the name of a unit in the line (``step``, ``rows``).
        items_per_unit: items one unit processes, for the rate (images per optimiser step).
        rate_unit: the rate's unit (``img/s``).
        every: seconds between lines (:meth:`update` returns one when due).
        clock: seconds, monotonic (tests pass a fake).
    """

    def __init__(
        self,
        name: str,
        total: int,
        done: int = 0,
        *,
        unit: str = "step",
        items_per_unit: float = 1.0,
        rate_unit: str = "img/s",
        every: float = PROGRESS_EVERY_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name, self.total, self.unit, self.rate_unit = name, total, unit, rate_unit
        self.items_per_unit, self.every, self.clock = items_per_unit, every, clock
        self.start = self.done = done
        self.t0 = self.last = clock()
        self.val: tuple[str, float] | None = None  # (label, value): the latest validation figure
        self._loss_sum, self._loss_n = 0.0, 0

    def update(self, done: int, loss: float | None = None) -> str | None:
        """Record ``done`` units (and a loss to average into the next line); the line when one is due, else None."""
        self.done = done
        if loss is not None:
            self._loss_sum += loss
            self._loss_n += 1
        now = self.clock()
        if done < self.total and now - self.last < self.every:
            return None
        self.last = now
        text = self.line(done, now)
        self._loss_sum, self._loss_n = 0.0, 0
        return text

    def line(self, done: int | None = None, now: float | None = None) -> str:
        """The line for ``done`` units at ``now`` (default: the last recorded, the clock's now)."""
        done = self.done if done is None else done
        elapsed = (self.clock() if now is None else now) - self.t0
        worked = done - self.start
        rate = worked * self.items_per_unit / elapsed if worked > 0 and elapsed > 0 else None
        eta = (self.total - done) * elapsed / worked if worked > 0 else None
        loss = self._loss_sum / self._loss_n if self._loss_n else None
        return line(
            self.name, done, self.total, unit=self.unit, loss=loss, val=self.val, rate=rate,
            rate_unit=self.rate_unit, eta=eta, elapsed=elapsed,
        )  # fmt: skip


@contextlib.contextmanager
def watch(progress: Progress, poll: Callable[[], int], log: logging.Logger) -> Iterator[Progress]:
    """While the body runs, log ``progress``'s line every ``progress.every`` seconds, with ``poll()`` units done.

    Progress is a courtesy: a ``poll`` that fails skips that line and never fails the step.
    """
    stop = threading.Event()

    def report() -> None:
        while not stop.wait(progress.every):
            try:
                done = poll()
            except Exception:  # e.g. a listing racing a rename: try again next time
                continue
            if not stop.is_set() and done < progress.total:
                log.info("%s", progress.line(done))

    thread = threading.Thread(target=report, name=f"progress-{progress.name}", daemon=True)
    thread.start()
    try:
        yield progress
    finally:
        stop.set()
        thread.join()
