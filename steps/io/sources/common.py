"""File helpers the file-based sources share: walking a folder safely, reading a file with limits, naming paths.

Local paths go through :mod:`steps.io.reading` (symlink loops, FIFOs and devices are named, never opened; a file over
``data.max_file_mb`` is never read); other URIs through a pyarrow filesystem (:mod:`steps.io.storage`).
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Callable

import pyarrow.fs as pafs

from steps.io import reading
from steps.io.storage import filesystem, is_local, read_bytes

MAX_FILE_BYTES = 64 * 1024 * 1024  # data.max_file_mb's default


def walk_files(root: str, wanted: Callable[[str], bool] = lambda rel: True) -> tuple[list[str], list[dict], int]:
    """``(files, skipped, ignored)`` under ``root`` (see :func:`steps.io.reading.walk`); hidden names are left out.

    Local folders follow symlinks but visit each real directory once, so a link loop cannot hang the walk; entries
    that are not regular files (FIFOs, sockets, devices, broken links) are skipped with a reason, never opened.
    """
    if not is_local(root):
        fs, base = filesystem(root)
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=True))
        rels = [posixpath.relpath(i.path, base) for i in infos if i.type == pafs.FileType.File]
        rels = sorted(r for r in rels if not any(p.startswith(".") for p in r.split("/")))
        return [r for r in rels if wanted(r)], [], sum(1 for r in rels if not wanted(r))
    root = root.removeprefix("file://")
    files, skipped, ignored = reading.walk(root, wanted)
    return files, [{"path": printable(under(root, p)), "reason": why} for p, why in skipped], ignored


def printable(name: str) -> str:
    """A file name that may hold undecodable bytes (surrogate escapes) as a valid UTF-8 string."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def read_file(uri: str, max_bytes: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of a regular file of at most ``max_bytes`` (a plain path), or of any URI."""
    if "://" in uri:
        return read_bytes(uri)
    return reading.read_regular(uri, max_bytes)  # a plain path: file names need not be valid UTF-8


def path_kind(path: str) -> pafs.FileType:
    """What is at ``path`` (a file or a folder), or FileNotFoundError naming the setting."""
    fs, p = filesystem(path)
    kind = fs.get_file_info(p).type
    if kind == pafs.FileType.NotFound:
        raise FileNotFoundError(f"shard.path {path!r} does not exist")
    if kind not in (pafs.FileType.File, pafs.FileType.Directory):  # a FIFO or a device: opening it could hang
        raise ValueError(f"shard.path {path!r} is {reading.problem(p) or 'neither a file nor a folder'}")
    return kind


def under(root: str, rel: str) -> str:
    """``rel`` (a "/"-separated path from :func:`walk_files`) under ``root``."""
    return posixpath.join(root, rel) if "://" in root else os.path.join(root, *rel.split("/"))
