"""Untrusted input to the served models is bounded before any work: image files checked by their header (format, the
model's size, bytes) before their pixels are decoded, requests bounded in bytes and images, so a request's memory is
bounded whatever it claims. Crafted files: a huge canvas, a truncated PNG, a non-image, a format not served."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from pipeline.serving.generator import MAX_IMAGE_BYTES
from pipeline.serving.ray_serve import MAX_BODY_BYTES, BadRequest, read_body
from steps.io.pixels import ImageRejected, decode_served, encode_png

GOOD = encode_png(np.arange(32 * 32, dtype=np.uint8).reshape(32, 32))


def saved(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def huge_canvas() -> bytes:
    """A real 12,000 x 12,000 grey PNG: about 140 KB on disk, 144 MB once decoded."""
    return saved(Image.new("L", (12000, 12000), 128), "PNG", optimize=False, compress_level=9)


def test_a_good_file_decodes_as_the_pipeline_decodes_it():
    pixels = decode_served(GOOD, size=32, channels=1, max_bytes=1 << 20)
    assert pixels.shape == (1, 32, 32) and np.array_equal(pixels[0], np.arange(32 * 32).reshape(32, 32) % 256)
    rgb = decode_served(GOOD, size=32, channels=3, max_bytes=1 << 20)
    assert rgb.shape == (3, 32, 32)
    assert decode_served(GOOD, size=32, channels=0, max_bytes=1 << 20).size == 0  # the checks alone


def test_crafted_files_are_refused_by_their_header_naming_the_limit(huge_canvas, png_claiming):
    cases = [
        (huge_canvas, "12000x12000 pixels by its header, but the model takes 32x32 images"),
        (png_claiming(100_000, 100_000), "10000000000 pixels by its header, but the model takes 32x32 images"),
        (GOOD[: len(GOOD) // 2], r"a damaged or truncated PNG file"),
        (b"GIF89a but not really", r"not an image file \(PNG, JPEG, WEBP, BMP, GIF are read\)"),
        (b"", "not an image file"),
        (saved(Image.new("L", (32, 32)), "TIFF"), "a TIFF file; PNG, JPEG, WEBP, BMP, GIF are read"),
        (GOOD + b"\0" * 2048, f"{len(GOOD) + 2048} bytes, over the limit of 2048 bytes per image"),
        ("a string", "expected the bytes of an image file, got str"),
        (12 * 10**9, "expected the bytes of an image file, got int"),  # bytes(n) would allocate n bytes
    ]
    for data, message in cases:
        limit = 2048 if isinstance(data, bytes) and data.startswith(GOOD) and len(data) > len(GOOD) else 1 << 20
        with pytest.raises(ImageRejected, match=message):
            decode_served(data, size=32, channels=1, max_bytes=limit, what="image 7")


def test_a_huge_canvas_costs_no_memory_to_refuse(tmp_path, artifacts, huge_canvas):
    """Measured by the peak RSS of a fresh process around Generator.encode (the path of the MLflow encoder model):
    decoding the canvas would add about 144 MB; refusing it by its header adds next to nothing."""
    model = artifacts.autoencoder(tmp_path / "vq", artifacts.small_vqvae2())
    (tmp_path / "bomb.png").write_bytes(huge_canvas)
    (tmp_path / "good.png").write_bytes(GOOD)
    script = textwrap.dedent(f"""
        import json, resource
        from pipeline import Generator
        gen = Generator.load({str(model)!r}, device="cpu")
        good, bomb = (open({str(tmp_path)!r} + name, "rb").read() for name in ("/good.png", "/bomb.png"))
        gen.encode([good])  # everything imported and loaded before the measurement
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            gen.encode([good, bomb])
            outcome = "accepted"
        except ValueError as exc:
            outcome = str(exc)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps({{"outcome": outcome, "growth_kb": after - before}}))
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(p) for p in sys.path if p])}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["outcome"] == "image 1: 12000x12000 pixels by its header, but the model takes 32x32 images"
    assert result["growth_kb"] < 16 * 1024, result  # the decoded canvas alone would be 144 MB


class FakeRequest:
    """What read_body uses of a Starlette request: the headers and the body's chunks."""

    def __init__(self, chunks: list[bytes], declared: str | None = None) -> None:
        self.headers = {} if declared is None else {"content-length": declared}
        self.chunks = chunks
        self.read = 0

    async def stream(self):
        for chunk in self.chunks:
            self.read += 1
            yield chunk


def test_ray_serve_reads_a_request_body_up_to_its_limit():
    """A request carries at most one image: the limit is its base64 at MAX_IMAGE_BYTES plus 64 KiB for the rest."""
    largest = json.dumps(
        {"seed": 0, "label": 0, "keep_rows": 16, "image": base64.b64encode(b"x" * MAX_IMAGE_BYTES).decode()}
    )
    assert len(largest) <= MAX_BODY_BYTES == len(base64.b64encode(b"x" * MAX_IMAGE_BYTES)) + (64 << 10)
    assert asyncio.run(read_body(FakeRequest([b'{"seed":', b" 1}"]))) == b'{"seed": 1}'
    declared = FakeRequest([b"x" * 10], declared=str(MAX_BODY_BYTES + 1))
    with pytest.raises(BadRequest, match=f"request body of {MAX_BODY_BYTES + 1} bytes, over the limit of"):
        asyncio.run(read_body(declared))
    assert declared.read == 0, "refused by its Content-Length before anything is read"
    endless = FakeRequest([b"x" * 4096] * (2 * MAX_BODY_BYTES // 4096))  # no Content-Length: refused as it streams in
    with pytest.raises(BadRequest, match=f"request body over the limit of {MAX_BODY_BYTES} bytes"):
        asyncio.run(read_body(endless))
    assert endless.read == MAX_BODY_BYTES // 4096 + 1, "stopped reading at the limit"
