"""No silent stall: a unit of a step's work that makes no progress for stall_timeout_s fails, naming the unit and
what it was doing (a hung mount blocks a thread in the kernel: the unit's thread is left behind, the task goes on)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from steps.core.watchdog import StalledError, watched


@pytest.fixture
def stuck(monkeypatch):
    """``stuck(obj, name)``: the method or function becomes one that blocks (a read or write on a hung mount) until
    the test ends."""
    release = threading.Event()

    def make(obj, name: str) -> None:
        def blocked(*args, **kwargs):
            release.wait(60)
            raise OSError("released by the test")

        monkeypatch.setattr(obj, name, blocked)

    yield make
    release.set()


def test_watched_work_returns_raises_and_may_run_long_while_it_beats():
    assert watched(lambda beat: 42, "unit", 1.0) == 42
    with pytest.raises(ValueError, match="inner"):
        watched(lambda beat: (_ for _ in ()).throw(ValueError("inner")), "unit", 1.0)

    def long_but_alive(beat):
        for i in range(8):
            beat(f"step {i}")
            time.sleep(0.1)
        return "done"

    assert watched(long_but_alive, "unit", 0.5) == "done"  # 0.8 s in all, never 0.5 s without a beat
    assert watched(lambda beat: "no limit", "unit", 0) == "no limit"


def test_a_unit_without_progress_fails_naming_it_and_what_it_was_doing():
    release = threading.Event()

    def hangs(beat):
        beat("writing part-00003.parquet")
        release.wait(30)

    try:
        with pytest.raises(StalledError, match=r"shard unit train/3: no progress for \d+ s while writing part-00003"):
            watched(hangs, "shard unit train/3", 0.5)
    finally:
        release.set()


def test_the_shard_step_names_the_unit_whose_write_hangs(tmp_path, tiny, stuck):
    from steps import shard
    from steps.artifacts.images import ShardWriter

    stuck(ShardWriter, "write_part")
    cfg = tiny.shard(limit=20, stall_timeout_s=1.0)
    items = shard._list(cfg).items[:5]
    with pytest.raises(StalledError, match=r"shard unit train/0 \(5 images, the first digits-00000\) .* while writing"):
        shard._shard_unit("train", 0, items, cfg, str(tmp_path / "out"))


def test_the_encode_step_names_the_file_it_is_stuck_on(tmp_path, artifacts, stuck):
    from steps import encode
    from steps.artifacts.autoencoder import Autoencoder
    from steps.artifacts.code_format import CodeMeta
    from steps.artifacts.codes import CodeWriter

    autoencoder = Autoencoder.open(artifacts.autoencoder(tmp_path / "vq", artifacts.small_vqvae2()))
    writer = CodeWriter(str(tmp_path / "codes"), CodeMeta.of(autoencoder))
    encoder = encode.FileEncoder(autoencoder, writer, batch_size=8, use_gpu=False, threads=1, stall_s=1.0)
    stuck(encode.storage, "read_parquet")  # the image file sits on a mount that stopped answering
    batch = {"split": np.array(["train"]), "src": np.array(["/mnt/hung/part-00007.parquet"]), "name": ["part-00007"]}
    with pytest.raises(StalledError, match=r"encoding /mnt/hung/part-00007.parquet .* while reading the image file"):
        encoder(batch)
