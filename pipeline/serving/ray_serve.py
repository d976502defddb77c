"""Serve the generator over HTTP with Ray Serve, batching concurrent requests into one sampler batch.

    pip install -e '.[serve]'
    serve run pipeline.serving.ray_serve:app model=models:/vqvae2-generator@current   # or a train_prior output folder
    curl -X POST http://127.0.0.1:8000/ -d '{"label": 3, "seed": 0, "temperature": 0.9}'
    img=$(base64 -w0 face.png)   # complete an image of the model's size: keep its top 16 rows, draw the rest
    curl -X POST http://127.0.0.1:8000/ -d '{"label": 3, "seed": 0, "keep_rows": 16, "image": "'$img'"}'

Options after the import path (``key=value``): ``model`` (required), ``max_batch_size`` (16),
``batch_wait_timeout_s`` (0.02), ``device`` (default: CUDA if available), ``num_replicas`` (1).

A request is one image: ``{"seed": int, "label": int (class-conditional priors only), "temperature", "top_k", "top_p",
"guidance_scale", "image": base64 image file (PNG, JPEG...: the model's size), "keep_rows": int (0)}``; the answer
``{"png": base64 PNG, "label", "seed"}`` is the same image as ``Generator.generate(1, labels=[label], seed=seed, ...)``
and the MLflow model's row (pipeline/serving/mlflow_models.py). With ``keep_rows`` = k > 0 it completes ``image``: the
answer is ``Generator.complete(<image's pixels>[None], keep_rows=k, labels=[label], seed=seed, ...)`` (its first k rows
kept, the rest drawn), the MLflow model's row with that image and param; with ``keep_rows`` = 0 an image is ignored.
Concurrent requests wait up to ``batch_wait_timeout_s`` to be drawn together (``@serve.batch``): the cached sampler's
cost per position barely grows with the batch, so a batch of 16 costs little more than one image. Requests with
different sampling controls or ``keep_rows`` are drawn in separate batches (a completion batch encodes its images
together); the ``X-Batch-Size`` response header says how many images the request's batch drew. A bad request (a bad
field, an image that is not an image file of the model's size) gets HTTP 400 with the reason, and fails no other
request of its batch; the server stays up. A request holds at most one image, and its body is refused past
:data:`MAX_BODY_BYTES` (the base64 of one image at ``pipeline.serving.generator.MAX_IMAGE_BYTES``, plus 64 KiB) before
it is parsed, so one request's memory is bounded.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

from pipeline.serving.generator import MAX_IMAGE_BYTES, Generator, file_of_base64, png_base64
from steps.generation.generator import check_keep_rows, sample_seed
from steps.io.pixels import decode_served
from steps.nn.draw import SamplingControls

# One request: a JSON object of a seed, a label and the controls needs a few hundred bytes, and one image file at
# most MAX_IMAGE_BYTES, base64-encoded (4 characters per 3 bytes).
MAX_BODY_BYTES = 4 * -(-MAX_IMAGE_BYTES // 3) + (64 << 10)
FIELDS = ("seed", "label", *SamplingControls.names(), "image", "keep_rows")


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


def parse(body: Any, num_classes: int, image_size: int | None = None) -> dict[str, Any]:
    """A request's fields, checked: ``seed``, ``label`` (None for unconditional priors), ``controls``, ``keep_rows``
    and ``image`` (the file's bytes; None unless ``keep_rows`` > 0).

    With the model's ``image_size`` known, ``keep_rows`` is checked against it and the image by its header (format,
    size, bytes); its pixels are decoded later, when its batch encodes it.
    """
    if not isinstance(body, Mapping):
        raise BadRequest('send a JSON object such as {"seed": 0, "label": 3}')
    unknown = sorted(set(body) - set(FIELDS))
    if unknown:
        raise BadRequest(f"unknown field(s) {unknown}; fields are {', '.join(FIELDS)}")
    seed, label = body.get("seed"), body.get("label")
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63:
        raise BadRequest(f"seed must be an integer >= 0, got {seed!r}")
    if num_classes:
        if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < num_classes:
            raise BadRequest(f"label must be an integer in [0, {num_classes}) (the priors' classes), got {label!r}")
    elif label is not None:
        raise BadRequest("label given, but the priors are not class-conditional")
    names = SamplingControls.names()
    try:
        controls = SamplingControls.parse({k: body[k] for k in names if k in body})
    except ValueError as exc:
        raise BadRequest(str(exc)) from None
    try:
        keep_rows = check_keep_rows(body.get("keep_rows", 0), image_size)
    except ValueError as exc:
        raise BadRequest(str(exc)) from None
    image = body.get("image")
    if image is not None:
        if not isinstance(image, str):
            raise BadRequest(f"image must be a base64-encoded image file (PNG, JPEG...), got {type(image).__name__}")
        try:
            image = file_of_base64(image)
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
    if keep_rows and image is None:
        raise BadRequest(f"keep_rows={keep_rows} needs an image to complete (a base64-encoded image file)")
    if keep_rows and image_size:
        try:
            decode_served(image, image_size, channels=0, max_bytes=MAX_IMAGE_BYTES, what="image")  # header only
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
    return {
        "seed": seed,
        "label": label,
        "controls": controls,
        "keep_rows": keep_rows,
        "image": image if keep_rows else None,
    }


def draw_requests(generator: Generator, requests: Sequence[dict[str, Any]]) -> list[tuple[dict[str, Any], int]]:
    """The answers to parsed requests, one sampler batch per (sampling controls, keep_rows); each answer comes with
    the size of the batch that drew it (0 for a refusal, ``{"error": reason}``: a request whose image does not
    encode, or a group whose controls these priors cannot draw with)."""
    answers: list[dict[str, Any]] = [{}] * len(requests)
    sizes = [0] * len(requests)
    groups: dict[tuple[SamplingControls, int], list[int]] = {}
    for i, r in enumerate(requests):
        groups.setdefault((r["controls"], r["keep_rows"]), []).append(i)
    for (controls, keep_rows), members in groups.items():
        given = None
        if keep_rows:
            given, refused = _encode(generator, [requests[i]["image"] for i in members])
            for i, reason in zip(members, refused, strict=True):
                if reason:
                    answers[i] = {"error": reason}
            members = [i for i, reason in zip(members, refused, strict=True) if reason is None]
            if not members:
                continue
        seeds = [sample_seed(requests[i]["seed"], 0) for i in members]
        labels = [requests[i]["label"] for i in members] if generator.num_classes else None
        try:
            images, _ = generator.draw(seeds, labels, controls, given, keep_rows)
        except ValueError as exc:  # the group's controls (guidance without a guidable prior...): 400 for each
            for i in members:
                answers[i] = {"error": str(exc)}
            continue
        for i, png in zip(members, png_base64(images), strict=True):
            answers[i] = {"png": png, "label": requests[i]["label"], "seed": requests[i]["seed"]}
            sizes[i] = len(members)
    return list(zip(answers, sizes, strict=True))


def _encode(generator: Generator, files: list[bytes]) -> tuple[dict[str, torch.Tensor] | None, list[str | None]]:
    """Codes per level of the files that encode, in order, and each file's reason for refusal (None: encoded). One
    ``encode`` call for them all; only if it refuses one are they encoded one by one, so that a bad image (a damaged
    file passes the header checks) fails its own request only."""
    try:
        return generator.encode(files), [None] * len(files)
    except ValueError:
        pass
    codes, refused = [], []
    for f in files:
        try:
            codes.append(generator.encode([f]))
            refused.append(None)
        except ValueError as exc:
            refused.append(str(exc).replace("image 0: ", "image: ", 1))
    return ({lv: torch.cat([c[lv] for c in codes]) for lv in codes[0]} if codes else None), refused


@serve.deployment
class GeneratorServer:
    """One replica: a :class:`pipeline.serving.generator.Generator` and the batching queue in front of it."""

    def __init__(self, model: str, max_batch_size: int, batch_wait_timeout_s: float, device: str | None) -> None:
        self.generator = Generator.load(model, device=device)
        self.draw_batch.set_max_batch_size(max_batch_size)
        self.draw_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.02)
    async def draw_batch(self, requests: list[dict[str, Any]]) -> list[tuple[dict[str, Any], int]]:
        """The answers of concurrent requests (:func:`draw_requests`), drawn off the event loop so that requests
        arriving meanwhile queue up for the next batch."""
        return await asyncio.to_thread(draw_requests, self.generator, requests)

    async def __call__(self, request: Request) -> JSONResponse:
        try:
            body = json.loads(await read_body(request) or b"null")
            gen = self.generator
            answer, size = await self.draw_batch(parse(body, gen.num_classes, gen.image_shape[-1]))
        except (BadRequest, json.JSONDecodeError) as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        if "error" in answer:
            return JSONResponse(answer, status_code=400)
        return JSONResponse(answer, headers={"X-Batch-Size": str(size)})


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
