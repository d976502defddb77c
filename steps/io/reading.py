"""Reading input entries without ever hanging: what a folder holds, one file's bytes, a time limit per item.

A folder handed to the shard step may hold anything a directory can: FIFOs (opening one for reading waits for a
writer forever), sockets, device files (``/dev/zero`` never ends), symbolic links that are broken, loop, or lead to
any of these, files too large to be images, and files on a mount that stopped answering. The rules:

* **Listing** (:func:`walk`) keeps regular files (directly or through a link) and names every other entry that looks
  like an input with the reason it is skipped ("a FIFO, not a regular file", "a broken symbolic link", ...). Folders
  that cannot be listed are named too. Links are followed, but each real folder is visited once.
* **Reading** (:func:`read_regular`) opens without blocking (``O_NONBLOCK``), checks again that what it opened is a
  regular file (an entry can change between listing and reading) and refuses one larger than the size limit before
  reading a byte of it.
* **A time limit per item** (:class:`Deadline`): the read and the decode of one item run on a helper thread; the
  caller waits at most ``timeout_s`` for it, then names the item and moves on. A thread stuck in the kernel cannot be
  killed from Python, so it is abandoned (a daemon thread: it never delays the process's exit) and a fresh one takes
  the next item.

No Ray here: the shard step's workers use these; every piece is unit-testable in plain Python.
"""

from __future__ import annotations

import errno
import os
import queue
import stat
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

_KINDS = (
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISDIR, "a folder"),
)


class ReadTimeout(TimeoutError):
    """Reading one item took longer than its limit; the item is skipped (or fails the step) by name."""


def kind_of(mode: int) -> str:
    """What a ``st_mode`` is, in words, for anything that is not a regular file."""
    return next((name for test, name in _KINDS if test(mode)), f"an entry of unknown type (mode {mode:o})")


def problem(path: str) -> str | None:
    """Why the entry at ``path`` cannot be read as a file (following links), or None for a regular file."""
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        if os.path.islink(path):
            return "a symbolic link loop" if e.errno == errno.ELOOP else "a broken symbolic link"
        return f"cannot be inspected: {type(e).__name__}: {e.strerror or e}"
    return None if stat.S_ISREG(mode) else f"{kind_of(mode)}, not a regular file"


def walk(root: str, wanted: Callable[[str], bool]) -> tuple[list[str], list[tuple[str, str]], int]:
    """``(files, skipped, ignored)`` under a local folder.

    ``files``: posix paths relative to ``root`` of the regular files whose name ``wanted`` accepts, sorted. ``skipped``:
    ``(path, reason)`` for each entry ``wanted`` accepts that is not a regular file, and for each folder that could
    not be listed. ``ignored``: how many other files there are (names ``wanted`` refuses). Hidden names are left out.
    """
    seen = {os.path.realpath(root)}
    files: list[str] = []
    skipped: list[tuple[str, str]] = []
    ignored = 0

    def unlistable(err: OSError) -> None:
        where = os.path.relpath(err.filename or root, root).replace(os.sep, "/")
        skipped.append((where, f"folder cannot be listed: {type(err).__name__}: {err.strerror or err}"))

    for dirpath, dirnames, filenames in os.walk(root, followlinks=True, onerror=unlistable):
        keep = []
        for d in sorted(dirnames):
            real = os.path.realpath(os.path.join(dirpath, d))
            if not d.startswith(".") and real not in seen:
                seen.add(real)
                keep.append(d)
        dirnames[:] = keep
        rel_dir = os.path.relpath(dirpath, root)
        for name in filenames:
            if name.startswith("."):
                continue
            rel = name if rel_dir == "." else f"{rel_dir}/{name}".replace(os.sep, "/")
            if not wanted(rel):
                ignored += 1
            elif (why := problem(os.path.join(dirpath, name))) is None:
                files.append(rel)
            else:
                skipped.append((rel, why))
    return sorted(files), sorted(skipped), ignored


def read_regular(path: str, max_bytes: int) -> bytes:
    """The bytes of the regular file at ``path``; never waits on a FIFO or a device, never reads past ``max_bytes``.

    Raises:
        ValueError: the entry is not a regular file, or is larger than ``max_bytes``.
        OSError: it cannot be opened or read.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ValueError(f"{kind_of(info.st_mode)}, not a regular file")
        if info.st_size > max_bytes:
            raise ValueError(f"{info.st_size} bytes, larger than the limit of {max_bytes} (data.max_file_mb)")
        os.set_blocking(fd, True)
        chunks, size = [], 0
        while size <= max_bytes:  # a file that grew (or a /proc-like one with no size) still stops past the limit
            chunk = os.read(fd, min(max(info.st_size, 1 << 16), max_bytes + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > max_bytes:
        raise ValueError(f"more than {max_bytes} bytes, larger than the limit (data.max_file_mb)")
    return data


class Deadline:
    """Runs calls on one helper thread and waits at most ``timeout_s`` for each (``timeout_s <= 0``: no limit).

    A call that overruns raises :class:`ReadTimeout` in the caller; its thread is abandoned and the next call gets a
    new one. Use as a context manager so the last thread is told to stop.
    """

    def __init__(self, timeout_s: float, setting: str = "data.read_timeout_s") -> None:
        self.timeout_s = timeout_s
        self.setting = setting
        self._jobs: queue.Queue | None = None
        self.abandoned = 0

    def __enter__(self) -> Deadline:
        return self

    def __exit__(self, *_: Any) -> None:
        self._stop()

    def _stop(self) -> None:
        if self._jobs is not None:
            self._jobs.put(None)  # the thread exits once it is free (now, or when a stuck call returns)
            self._jobs = None

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        if self.timeout_s <= 0:
            return fn(*args)
        if self._jobs is None:
            self._jobs = queue.Queue()
            threading.Thread(target=_serve, args=(self._jobs,), name="deadline-reader", daemon=True).start()
        box: queue.Queue = queue.Queue(maxsize=1)
        self._jobs.put((fn, args, box))
        try:
            ok, value = box.get(timeout=self.timeout_s)
        except queue.Empty:
            self._stop()
            self.abandoned += 1
            raise ReadTimeout(f"no answer within {self.setting}={self.timeout_s:g} s; skipped") from None
        if ok:
            return value
        raise value


def _serve(jobs: queue.Queue) -> None:
    while (job := jobs.get()) is not None:
        fn, args, box = job
        try:
            box.put((True, fn(*args)))
        except BaseException as e:  # handed to the caller, which raises it in its own frame
            box.put((False, e))
