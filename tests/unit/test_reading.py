"""Reading input entries never hangs: special entries are named, not opened; one item's read has a time limit."""

from __future__ import annotations

import os
import threading
import time

import pytest

from steps.io import reading, sources
from steps.io.sources.parquet import list_parquet
from steps.shard import ShardConfig


def finishes(fn, *args, within: float = 20.0):
    """``fn(*args)``'s result, or a failure if it is still running after ``within`` seconds (a hang)."""
    out: dict = {}

    def target() -> None:
        try:
            out["value"] = fn(*args)
        except BaseException as e:  # re-raised in the test's own thread
            out["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(within)
    assert not thread.is_alive(), f"{getattr(fn, '__name__', fn)} hung"
    if "error" in out:
        raise out["error"]
    return out.get("value")


def test_walk_names_every_entry_that_is_not_a_regular_file(tmp_path):
    (tmp_path / "ok.png").write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "linked.png").symlink_to(tmp_path / "ok.png")  # a link to a regular file is read
    os.mkfifo(tmp_path / "fifo.png")
    (tmp_path / "dev.png").symlink_to("/dev/null")
    (tmp_path / "gone.png").symlink_to(tmp_path / "nowhere.png")
    (tmp_path / "self.png").symlink_to(tmp_path / "self.png")
    os.mkfifo(tmp_path / "fifo.txt")  # not wanted: only counted
    (tmp_path / "dir.png").mkdir()  # a folder with an image name is walked into, not read
    files, skipped, ignored = finishes(reading.walk, str(tmp_path), lambda rel: rel.endswith(".png"))
    assert files == ["ok.png", "sub/linked.png"]
    assert dict(skipped) == {
        "dev.png": "a character device, not a regular file",
        "fifo.png": "a FIFO (named pipe), not a regular file",
        "gone.png": "a broken symbolic link",
        "self.png": "a symbolic link loop",
    }
    assert ignored == 1


def test_read_regular_refuses_a_fifo_a_device_and_a_large_file_without_waiting(tmp_path):
    os.mkfifo(tmp_path / "pipe.png")  # a plain open() for reading blocks here until a writer appears
    with pytest.raises(ValueError, match=r"^a FIFO \(named pipe\), not a regular file$"):
        finishes(reading.read_regular, str(tmp_path / "pipe.png"), 1 << 20)
    with pytest.raises(ValueError, match=r"^a character device, not a regular file$"):
        finishes(reading.read_regular, "/dev/zero", 1 << 20)  # reading it would never end
    (tmp_path / "big.png").write_bytes(b"\0" * 2048)
    with pytest.raises(ValueError, match=r"^2048 bytes, larger than the limit of 1024 \(data\.max_file_mb\)$"):
        reading.read_regular(str(tmp_path / "big.png"), 1024)
    assert reading.read_regular(str(tmp_path / "big.png"), 2048) == b"\0" * 2048


def test_deadline_abandons_a_call_stuck_in_the_kernel_and_goes_on(tmp_path):
    """A blocking open() of a FIFO with no writer is a real stuck system call: the caller gets ReadTimeout after the
    limit, the next call runs on a fresh thread, and the stuck thread ends once the FIFO gets a writer."""
    fifo = str(tmp_path / "stuck")
    os.mkfifo(fifo)
    with reading.Deadline(0.5) as deadline:
        t0 = time.monotonic()
        with pytest.raises(reading.ReadTimeout, match=r"no answer within data\.read_timeout_s=0\.5 s; skipped"):
            deadline.call(lambda: open(fifo, "rb").close())
        assert time.monotonic() - t0 < 15  # it returned: a hang would never get here
        assert deadline.abandoned == 1
        assert deadline.call(sum, [1, 2, 3]) == 6  # a fresh thread
        with pytest.raises(ZeroDivisionError):  # an error in the call reaches the caller as itself
            deadline.call(lambda: 1 / 0)
    stuck = [t for t in threading.enumerate() if t.name == "deadline-reader"]
    writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # unblocks the abandoned open(); its thread then exits
    os.close(writer)
    for t in stuck:
        t.join(10)
    assert not any(t.is_alive() for t in stuck)


def test_load_skips_an_item_that_overruns_its_time_limit(tmp_path):
    """An image-folder item whose file became a FIFO after listing: the read is refused, then the next item is
    read; with no time limit (0) the behaviour is the same, since nothing blocks."""
    items = [{"id": "a", "label": None, "ref": str(tmp_path / "a.png")}]
    os.mkfifo(tmp_path / "a.png")
    source = sources.get("image_folder")
    for timeout in (0.0, 5.0):
        cfg = ShardConfig(source="image_folder", path=str(tmp_path), read_timeout_s=timeout)
        out = finishes(lambda c=cfg: list(source.load(items, c)))
        assert [(it["id"], px, reason) for it, px, reason, _ in out] == [
            ("a", None, "ValueError: a FIFO (named pipe), not a regular file")
        ]


def test_a_source_path_that_is_a_fifo_is_refused_by_name(tmp_path):
    os.mkfifo(tmp_path / "data.parquet")
    with pytest.raises(ValueError, match=r"shard\.path '.*data\.parquet' is a FIFO \(named pipe\), not a regular file"):
        finishes(list_parquet, str(tmp_path / "data.parquet"), "image", None, None, None)
