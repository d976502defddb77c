"""Requests to the served generator (Ray Serve), checked before any work: the sampling controls are the one
SamplingControls value every server and the Python API share, so a request's controls are checked, named and
batched the same way everywhere."""

from __future__ import annotations

import pytest

from pipeline.serving.ray_serve import BadRequest, parse
from steps.nn.draw import SamplingControls


def test_a_request_carries_its_controls_as_one_value():
    request = parse({"seed": 3, "label": 1, "temperature": 0.5, "top_k": 4}, num_classes=3)
    assert request == {"seed": 3, "label": 1, "controls": SamplingControls(temperature=0.5, top_k=4)}
    # Requests that mean the same controls are drawn in one batch, however they were spelt.
    spelt = [parse({"seed": 0, "label": 0, **c}, 3)["controls"] for c in ({}, {"temperature": 1}, {"top_k": 0.0})]
    assert len(set(spelt)) == 1


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ([1, 2], "send a JSON object"),
        ({"seed": 0, "label": 0, "temprature": 0.9}, r"unknown field\(s\) \['temprature'\]; fields are seed, label"),
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
