"""The artifacts root as a place to write: checked before anything runs, and a full disk reported as one.

* :func:`write_problem` tries what every step will do (create the root, create and remove a file in it) and says why
  it cannot, so an unwritable ``artifacts.root`` stops the pipeline before Ray starts, with the setting's name,
  instead of a traceback from the first step that writes. Roots on an object store are not probed (a write there
  costs a request and proves little about the bucket's other prefixes).
* :func:`storage_failure` recognises, in an exception raised by a step (often a Ray error wrapping a worker's
  traceback, so the original ``OSError`` is only text by then), a disk that filled up, a quota, or a file system that
  turned read-only. The orchestrator turns it into :class:`OutputWriteError`: which step, where, and that nothing of
  it was published. Steps write under their ``.partial`` work directory and publish by renaming, so the finished
  steps stay valid and the rerun after space is freed resumes (training from its last checkpoint that loads, encode
  and sample from their finished files).
"""

from __future__ import annotations

import errno
import os
import re
import tempfile

from steps.io.storage import is_local

# errno -> what it means for the user; only errors a write can raise (a read's EACCES is not a full disk)
WRITE_ERRORS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EROFS: "the file system is read-only",
}
_TEXT = re.compile(r"\[Errno (\d+)\]|errno (\d+)|(No space left on device|Disk quota exceeded|Read-only file system)")
_BY_TEXT = {
    "No space left on device": errno.ENOSPC,
    "Disk quota exceeded": errno.EDQUOT,
    "Read-only file system": errno.EROFS,
}


class OutputWriteError(RuntimeError):
    """A step could not write its output (full disk, quota, read-only file system); nothing of it was published."""


def write_problem(root: str) -> str | None:
    """Why nothing can be written under the local folder ``root`` (creating it if needed), or None if it can."""
    if not is_local(root):
        return None
    path = root.removeprefix("file://")
    try:
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        return f"{type(e).__name__}: {e.strerror or e}" + (f": {e.filename}" if e.filename else "")
    return None


def storage_failure(exc: BaseException) -> str | None:
    """What :data:`WRITE_ERRORS` failure ``exc`` (or an exception it was raised from) is, in words, or None."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in WRITE_ERRORS:
            return WRITE_ERRORS[current.errno]
        for match in _TEXT.finditer(str(current)):  # a worker's OSError reaches the driver as text
            number, other, words = match.groups()
            code = int(number or other) if (number or other) else _BY_TEXT[words]
            if code in WRITE_ERRORS:
                return WRITE_ERRORS[code]
        current = current.__cause__ or current.__context__
    return None


def write_error(step: str, work: str, root: str, why: str) -> OutputWriteError:
    """The error a step that could not write ends with: the step, the place, the cause, and what to do."""
    return OutputWriteError(
        f"{step}: {why} while writing under {work} (artifacts.root={root}). Nothing of {step} was published and the "
        "finished steps are intact; free space (or fix the file system) and rerun the same command: finished steps "
        "are reused and the interrupted one resumes from what it had finished."
    )
