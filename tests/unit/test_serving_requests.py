"""Requests to the served generator (Ray Serve), checked before any work: the sampling controls are the one
SamplingControls value every server and the Python API share, so a request's controls are checked, named and
batched the same way everywhere; an image to complete is checked by its header before it is queued."""

from __future__ import annotations

import base64

import numpy as np
import pytest

from pipeline.serving.ray_serve import BadRequest, parse
from steps.io.pixels import encode_png
from steps.nn.draw import SamplingControls

PNG = encode_png(np.zeros((32, 32), np.uint8))
B64 = base64.b64encode(PNG).decode("ascii")


def test_a_request_carries_its_controls_as_one_value():
    request = parse({"seed": 3, "label": 1, "temperature": 0.5, "top_k": 4}, num_classes=3)
    controls = SamplingControls(temperature=0.5, top_k=4)
    assert request == {"seed": 3, "label": 1, "controls": controls, "keep_rows": 0, "image": None}
    # Requests that mean the same controls are drawn in one batch, however they were spelt.
    spelt = [parse({"seed": 0, "label": 0, **c}, 3)["controls"] for c in ({}, {"temperature": 1}, {"top_k": 0.0})]
    assert len(set(spelt)) == 1


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ([1, 2], "send a JSON object"),
        ({"seed": 0, "label": 0, "temprature": 0.9}, r"unknown field\(s\) \['temprature'\]; fields are seed, label"),
        ({"seed": 0, "label": 0, "keep": 4}, r"unknown field\(s\) \['keep'\]; .*, image, keep_rows$"),
        ({"seed": -1, "label": 0}, "seed must be an integer >= 0"),
        ({"seed": 0}, r"label must be an integer in \[0, 3\)"),
        ({"seed": 0, "label": 3}, r"label must be an integer in \[0, 3\)"),
        ({"seed": 0, "label": 0, "top_p": 1.5}, r"top_p must be in \(0, 1\] \(1: off\), got 1.5"),
        ({"seed": 0, "label": 0, "temperature": "hot"}, "temperature must be a number, got 'hot'"),
        ({"seed": 0, "label": 0, "top_k": 2.5}, "top_k must be an integer, got 2.5"),
    ],
)
def test_bad_requests_are_refused_naming_the_field(body, message):
    with pytest.raises(BadRequest, match=message):
        parse(body, num_classes=3)


def test_unconditional_priors_take_no_label():
    assert parse({"seed": 1}, num_classes=0)["label"] is None
    with pytest.raises(BadRequest, match="not class-conditional"):
        parse({"seed": 1, "label": 0}, num_classes=0)


def test_a_completion_request_carries_the_image_file():
    request = parse({"seed": 1, "label": 2, "image": B64, "keep_rows": 16}, num_classes=3, image_size=32)
    assert request["image"] == PNG and request["keep_rows"] == 16
    wrapped = "\n".join(B64[i : i + 76] for i in range(0, len(B64), 76))  # `base64` without -w0 wraps its lines
    assert parse({"seed": 1, "label": 2, "image": wrapped, "keep_rows": 32}, 3, image_size=32)["image"] == PNG
    assert parse({"seed": 1, "label": 2, "image": B64}, 3, image_size=32)["image"] is None, "keep_rows=0: ignored"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"keep_rows": 4}, "keep_rows=4 needs an image to complete"),
        ({"keep_rows": -1, "image": B64}, r"keep_rows must be an integer in \[0, 32\] \(image rows to keep\), got -1"),
        ({"keep_rows": 33, "image": B64}, r"keep_rows must be an integer in \[0, 32\] .*, got 33"),
        ({"keep_rows": 2.0, "image": B64}, "keep_rows must be an integer in .*, got 2.0"),
        ({"keep_rows": True, "image": B64}, "keep_rows must be an integer in .*, got True"),
        ({"keep_rows": 4, "image": "not base64!"}, r"image is not base64"),
        ({"keep_rows": 4, "image": B64[:-1]}, r"image is not base64"),
        ({"keep_rows": 4, "image": 12}, r"image must be a base64-encoded image file \(PNG, JPEG...\), got int"),
        ({"keep_rows": 0, "image": "%%"}, r"image is not base64"),
        ({"keep_rows": 4, "image": base64.b64encode(b"GIF89a no").decode()}, r"image: not an image file \(PNG"),
        ({"keep_rows": 4, "image": base64.b64encode(encode_png(np.zeros((16, 16), np.uint8))).decode()},
         "image: 16x16 pixels by its header, but the model takes 32x32 images"),
    ],
)  # fmt: skip
def test_bad_completion_requests_are_refused_naming_the_field(body, message):
    with pytest.raises(BadRequest, match=message):
        parse({"seed": 0, "label": 0, **body}, num_classes=3, image_size=32)


def test_without_the_model_keep_rows_is_bounded_below_only():
    """The image side and the file's header are checked where the model is known (the server passes image_size)."""
    assert parse({"seed": 0, "keep_rows": 4096, "image": B64}, num_classes=0)["keep_rows"] == 4096
    with pytest.raises(BadRequest, match=r"keep_rows must be an integer >= 0 \(image rows to keep\), got -2"):
        parse({"seed": 0, "keep_rows": -2, "image": B64}, num_classes=0)
