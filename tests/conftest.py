"""Shared fixtures. One local Ray for the whole session: Ray starts in seconds, not milliseconds."""

from __future__ import annotations

import io
import os
import struct
import zlib

import pytest


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray instance shared by every test that asks for it (integration and e2e)."""
    import ray

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    if not ray.is_initialized():
        # More logical CPUs than cores: Ray Data actors and Ray Train workers mostly wait on each other in tests.
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def digit_shards(ray_local, tmp_path_factory) -> str:
    """240 bundled digits at 32x32, 1 channel, sharded by the real shard step (about 20 % val)."""
    from steps.shard import ShardConfig, run

    out = tmp_path_factory.mktemp("shards")
    run(ShardConfig(limit=240, val_fraction=0.2, rows_per_shard=100), {}, str(out))
    return str(out)


def _png_claiming(width: int, height: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (4, 4)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    ihdr = bytearray(data[12:29])  # chunk type + 13 bytes of IHDR data
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return bytes(data)


@pytest.fixture(scope="session")
def png_claiming():
    """``png_claiming(width, height)``: a 4x4 PNG whose IHDR claims that size, CRC fixed so Pillow trusts the
    header: a decompression bomb in a few bytes."""
    return _png_claiming
