"""URI-addressed storage: every read and write of the steps goes through here.

URIs are local paths or anything ``pyarrow.fs`` opens (``s3://``, ``gs://``, ``hdfs://``), so a step runs the same
on a laptop and against a cluster's shared storage. Whole files are written so that readers see them complete or
not at all: on local disk through a hidden temporary file and a rename; object stores publish an object only when its
upload completes.
"""

from __future__ import annotations

import json
import os
import posixpath
import tempfile
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

# The record a finished output carries (written last by the orchestrator, pipeline/cache.py): an output folder
# without it is incomplete, whatever else it holds.


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) for a local path or a pyarrow-supported URI."""
    if "://" not in uri:
        return pafs.LocalFileSystem(), str(Path(uri).absolute())
    return pafs.FileSystem.from_uri(uri)


def is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def absolute(uri: str) -> str:
    """A local path made absolute (Ray workers may run in another working directory); other URIs unchanged."""
    return uri if "://" in uri else os.path.abspath(os.path.expanduser(uri))


def join(uri: str, *parts: str) -> str:
    if "://" in uri:
        scheme, rest = uri.split("://", 1)
        return f"{scheme}://{posixpath.join(rest, *parts)}"
    return os.path.join(uri, *parts)


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_dir(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.get_file_info(path).type == pafs.FileType.Directory


def makedirs(uri: str) -> None:
    fs, path = filesystem(uri)
    fs.create_dir(path, recursive=True)


def listdir(uri: str) -> list[pafs.FileInfo]:
    """The entries directly under ``uri``, sorted by name; [] if it is not a directory."""
    fs, path = filesystem(uri)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return []
    return sorted(fs.get_file_info(pafs.FileSelector(path)), key=lambda i: i.base_name)


def delete(uri: str) -> None:
    """Remove a file or a directory tree; nothing if absent."""
    fs, path = filesystem(uri)
    kind = fs.get_file_info(path).type
    if kind == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif kind == pafs.FileType.File:
        fs.delete_file(path)


def clear_dir(uri: str) -> None:
    """Make ``uri`` an empty directory."""
    fs, path = filesystem(uri)
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        fs.delete_dir_contents(path)
    fs.create_dir(path, recursive=True)


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"no such file: {uri}") from None


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole file; on local disk through a temporary file and a rename, so readers never see half of it."""
    fs, path = filesystem(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return
    with fs.open_output_stream(path) as f:
        f.write(data)


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri))


def read_record(uri: str, name: str, missing: str) -> Any:
    """The JSON record ``name`` of the output at ``uri`` (written last by its step).

    Raises:
        MissingInputError: no such record; the message is ``missing`` (say which step to run).
    """
    from steps.core.step import MissingInputError

    path = join(uri, name)
    if not exists(path):
        raise MissingInputError(missing)
    return read_json(path)


def write_json(uri: str, obj: Any) -> None:
    write_bytes(uri, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())


def write_parquet(table: pa.Table, uri: str, compression: str = "zstd") -> None:
    """Write one Parquet file whole or not at all (see :func:`write_bytes`)."""
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf, compression=compression)
    write_bytes(uri, buf.getvalue().to_pybytes())


def read_parquet(uri: str, columns: list[str] | None = None) -> pa.Table:
    fs, path = filesystem(uri)
    return pq.read_table(path, filesystem=fs, columns=columns)


def parquet_files(uri: str) -> list[str]:
    """Parquet files under ``uri`` (recursively, sorted), skipping hidden and ``_``-prefixed names; [] if absent."""
    fs, path = filesystem(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        return [uri]
    if info.type == pafs.FileType.NotFound:
        return []
    found = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    rels = sorted(
        f.path[len(path) :].lstrip("/")
        for f in found
        if f.type == pafs.FileType.File and f.base_name.endswith(".parquet") and f.base_name[0] not in "._"
    )
    return [join(uri, r) for r in rels]


def read_column(files: list[str], column: str) -> pa.ChunkedArray:
    """One column of Parquet ``files`` (of one filesystem), in file order; an empty string column for no files."""
    if not files:
        return pa.chunked_array([], pa.string())
    import pyarrow.dataset as pads

    fs, _ = filesystem(files[0])
    dataset = pads.dataset([filesystem(f)[1] for f in files], format="parquet", filesystem=fs)
    return dataset.to_table(columns=[column]).column(column)
