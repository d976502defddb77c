"""Serve the generator over HTTP with Ray Serve, batching concurrent requests into one sampler batch.

    pip install -e '.[serve]'
    serve run pipeline.serving.ray_serve:app model=models:/vqvae2-generator@current   # or a train_prior output folder
    curl -X POST http://127.0.0.1:8000/ -d '{"label": 3, "seed": 0, "temperature": 0.9}'

Options after the import path (``key=value``): ``model`` (required), ``max_batch_size`` (16),
``batch_wait_timeout_s`` (0.02), ``device`` (default: CUDA if available), ``num_replicas`` (1).

A request is one image: ``{"seed": int, "label": int (class-conditional priors only), "temperature", "top_k", "top_p",
"guidance_scale"}``; the answer ``{"png": base64 PNG, "label", "seed"}`` is the same image as ``Generator.generate(1,
labels=[label], seed=seed, ...)`` and the MLflow model's row (pipeline/serving/mlflow_models.py). Concurrent requests
wait up to ``batch_wait_timeout_s`` to be drawn together (``@serve.batch``): the cached sampler's cost per position
barely grows with the batch, so a batch of 16 costs little more than one image. Requests with different sampling
controls are drawn in separate batches; the ``X-Batch-Size`` response header says how many images the request's batch
drew. A bad request gets HTTP 400 with the reason; the server stays up. A request is one image, and its body is
refused past :data:`MAX_BODY_BYTES` (64 KiB) before it is parsed, so one request's memory is bounded.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from typing import Any

from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

from steps.nn.draw import SamplingControls

MAX_BODY_BYTES = 64 << 10  # one request: a JSON object of a seed, a label and the controls needs a few hundred bytes


class BadRequest(ValueError):
    """A request the server refuses with HTTP 400."""


async def read_body(request: Any, limit: int = MAX_BODY_BYTES) -> bytes:
    """The request's body, refused (:class:`BadRequest`, naming the limit) once it grows past ``limit`` bytes: by its
    Content-Length before anything is read, else while it streams in, so a request never holds more."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise BadRequest(f"request body of {declared} bytes, over the limit of {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise BadRequest(f"request body over the limit of {limit} bytes")
    return bytes(body)


def parse(body: Any, num_classes: int) -> dict[str, Any]:
    """A request's fields, checked: ``seed``, ``label`` (None for unconditional priors) and ``controls``."""
    if not isinstance(body, Mapping):
        raise BadRequest('send a JSON object such as {"seed": 0, "label": 3}')
    names = SamplingControls.names()
    unknown = sorted(set(body) - {"seed", "label", *names})
    if unknown:
        raise BadRequest(f"unknown field(s) {unknown}; fields are seed, label, {', '.join(names)}")
    seed, label = body.get("seed"), body.get("label")
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63:
        raise BadRequest(f"seed must be an integer >= 0, got {seed!r}")
    if num_classes:
        if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < num_classes:
            raise BadRequest(f"label must be an integer in [0, {num_classes}) (the priors' classes), got {label!r}")
    elif label is not None:
        raise BadRequest("label given, but the priors are not class-conditional")
    try:
        controls = SamplingControls.parse({k: body[k] for k in names if k in body})
    except ValueError as exc:
        raise BadRequest(str(exc)) from None
    return {"seed": seed, "label": label, "controls": controls}


@serve.deployment
class GeneratorServer:
    """One replica: a :class:`pipeline.serving.generator.Generator` and the batching queue in front of it."""

    def __init__(self, model: str, max_batch_size: int, batch_wait_timeout_s: float, device: str | None) -> None:
        from pipeline.serving.generator import Generator

        self.generator = Generator.load(model, device=device)
        self.draw_batch.set_max_batch_size(max_batch_size)
        self.draw_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.02)
    async def draw_batch(self, requests: list[dict[str, Any]]) -> list[tuple[dict[str, Any] | None, int]]:
        """Draw the images of concurrent requests, one sampler batch per set of sampling controls.

        Each answer comes with the size of the sampler batch that drew it (the ``X-Batch-Size`` response header).
        """
        from pipeline.serving.generator import png_base64
        from steps.generation.generator import sample_seed

        answers: list[dict[str, Any] | None] = [None] * len(requests)
        sizes = [0] * len(requests)
        groups: dict[SamplingControls, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(r["controls"], []).append(i)
        for controls, members in groups.items():
            seeds = [sample_seed(requests[i]["seed"], 0) for i in members]
            labels = [requests[i]["label"] for i in members] if self.generator.num_classes else None
            # Off the event loop, so that requests arriving meanwhile queue up for the next batch.
            images, _ = await asyncio.to_thread(self.generator.draw, seeds, labels, controls)
            for i, png in zip(members, png_base64(images), strict=True):
                answers[i] = {"png": png, "label": requests[i]["label"], "seed": requests[i]["seed"]}
                sizes[i] = len(members)
        return list(zip(answers, sizes, strict=True))

    async def __call__(self, request: Request) -> JSONResponse:
        try:
            body = json.loads(await read_body(request) or b"null")
            answer, size = await self.draw_batch(parse(body, self.generator.num_classes))
            return JSONResponse(answer, headers={"X-Batch-Size": str(size)})
        except (BadRequest, json.JSONDecodeError) as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)


def server(
    model: str,
    max_batch_size: int = 16,
    batch_wait_timeout_s: float = 0.02,
    device: str | None = None,
    num_replicas: int = 1,
) -> serve.Application:
    """The generator behind one batching deployment.

    A replica admits twice ``max_batch_size`` requests at once (Serve's default admits 5, which would cap every
    batch at 5): one batch draws while the next fills.
    """
    if max_batch_size < 1 or batch_wait_timeout_s < 0 or num_replicas < 1:
        raise ValueError(
            "max_batch_size and num_replicas must be >= 1 and batch_wait_timeout_s >= 0, got "
            f"{max_batch_size}, {num_replicas}, {batch_wait_timeout_s}"
        )
    deployment = GeneratorServer.options(num_replicas=num_replicas, max_ongoing_requests=2 * max_batch_size)
    return deployment.bind(model, max_batch_size, batch_wait_timeout_s, device)


def app(args: dict[str, str]) -> serve.Application:
    """The application ``serve run pipeline.serving.ray_serve:app model=<uri> [key=value ...]`` builds (see the
    module docstring)."""
    if "model" not in args:
        raise ValueError(
            "serve run pipeline.serving.ray_serve:app needs model=<models:/... | runs:/... | a train_prior output>"
        )
    unknown = sorted(set(args) - {"model", "max_batch_size", "batch_wait_timeout_s", "device", "num_replicas"})
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for pipeline.serving.ray_serve:app (see its docstring)")
    return server(
        args["model"],
        max_batch_size=int(args.get("max_batch_size", 16)),
        batch_wait_timeout_s=float(args.get("batch_wait_timeout_s", 0.02)),
        device=args.get("device"),
        num_replicas=int(args.get("num_replicas", 1)),
    )
