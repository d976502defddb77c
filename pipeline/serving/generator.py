"""The trained generator as a Python object: load it from the pipeline's outputs or from MLflow, draw images.

    from pipeline import Generator

    gen = Generator.load("outputs/train_prior/<fingerprint>")         # finds its VQ-VAE through the run records
    gen = Generator.load("models:/vqvae2-generator@current")          # or runs:/<run id>/generator
    images = gen.generate(16, labels=[3] * 16, temperature=0.9, seed=0)  # uint8 (16, C, S, S)
    codes = gen.encode(images)                                        # {"top": (16, 4, 4), "bottom": (16, 8, 8)}
    again = gen.decode(codes)
    filled = gen.complete(images[:2], keep_rows=16, n=4, seed=0)       # (8, C, S, S): the top 16 rows kept

Image ``i`` of ``generate(n, seed=s)`` is the sample step's image ``i`` for ``sample.seed=s``: the same per-image seed
(:func:`steps.generation.generator.sample_seed`), the same label cycle, the same models and sampler. One MLflow
prediction row ``{"label": l, "seed": s}`` is ``generate(1, labels=[l], seed=s)``; with an image and the ``keep_rows``
param it is ``complete(image, keep_rows, labels=[l], seed=s)``."""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from pipeline.graph import decoding_steps, writer_of
from steps.artifacts import bundle, records
from steps.artifacts.autoencoder import Autoencoder, decoding
from steps.artifacts.compat import check_compatible
from steps.artifacts.priors import Priors
from steps.core.step import MissingInputError
from steps.generation.generator import ImageGenerator, check_keep_rows, sample_seed
from steps.io import storage
from steps.io.pixels import ImageRejected, decode_png, decode_served, encode_png, hwc, to_float, to_uint8_chw
from steps.nn.draw import DEFAULT, SamplingControls

MAX_IMAGES = 65536  # per call: more is a mistake (or a job for the sample step)
# Image files given to encode (untrusted: a served model's request): each checked by its header before decoding.
MAX_IMAGE_BYTES = 8 << 20  # one file
MAX_REQUEST_BYTES = 64 << 20  # all files of one call
MLFLOW_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/")


class Generator:
    """An autoencoder and its priors, checked to belong together and loaded on one device.

    Args:
        autoencoder: the train_vqvae output.
        priors: the train_prior output; None for an autoencoder without codes (the VAE).
        device: where the models run (default: CUDA if available, else the CPU).
        batch_size: images drawn, encoded or decoded per forward pass.
    """

    def __init__(
        self, autoencoder: Autoencoder, priors: Priors | None, device: str | torch.device | None = None,
        batch_size: int = 64,
    ) -> None:  # fmt: skip
        self.autoencoder, self.priors = autoencoder, priors
        self.num_classes = check_compatible(autoencoder, priors=priors)  # raises before anything is loaded
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        self.batch_size = batch_size
        self._images = ImageGenerator(autoencoder, priors, self.device)
        self.model = self._images.model
        self.can_generate = self._images.drawable

    # ----------------------------------------------------------------------------------------------- loading
    @classmethod
    def load(cls, source: str, device: str | torch.device | None = None, **kwargs: Any) -> Generator:
        """A generator from a train_prior output folder (or a train_vqvae one: the VAE draws on its own, a VQ-VAE
        only encodes and decodes), from a sample or evaluate output folder (the models that output was made with,
        tune_decoder's decoder included), or from an MLflow model
        URI (``models:/<name>@<alias>``, ``models:/<name>/<version>``, ``runs:/<run id>/generator``; the tracking
        URI comes from ``MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db``).

        A train_prior output decodes with train_vqvae's decoder: the priors do not depend on tune_decoder, which
        may have run any number of times on them. For a tuned decoder, load the sample output it made (or the
        registered model, or ``from_artifacts(<tune_decoder output>, <train_prior output>)``).

        Raises:
            MissingInputError: nothing usable at ``source``, or a train_prior output whose VQ-VAE is gone.
            CheckpointError, CodeDatasetMismatch: models that do not belong together.
        """
        if source.startswith(MLFLOW_SCHEMES):
            return cls.from_mlflow(source, device, **kwargs)
        folder = storage.absolute(source)
        if not storage.is_dir(folder):
            raise MissingInputError(f"no generator at {source}: expected a train_prior output or an MLflow model URI")
        if Autoencoder.found_at(folder):  # a train_vqvae output: a VAE draws on its own
            return cls(Autoencoder.open(folder), None, device, **kwargs)
        record = records.read(folder) or {}
        if record.get("step") in decoding_steps():  # what decoded those images: train_vqvae's or tune_decoder's
            inputs = record.get("inputs", {})
            priors = inputs.get(writer_of(Priors).name)
            return cls(decoding(inputs, "Generator.load"), Priors.open(priors) if priors else None, device, **kwargs)
        return cls(Autoencoder.open(autoencoder_of(folder)), Priors.open(folder), device, **kwargs)

    @classmethod
    def from_artifacts(
        cls, autoencoder: str, priors: str | None, device: str | torch.device | None = None, **kwargs: Any
    ) -> Generator:
        """A generator from an autoencoder folder and a priors folder (None for a VAE)."""
        return cls(Autoencoder.open(autoencoder), Priors.open(priors) if priors else None, device, **kwargs)

    @classmethod
    def from_mlflow(cls, uri: str, device: str | torch.device | None = None, **kwargs: Any) -> Generator:
        """A generator from a logged generator model (the models it carries: :mod:`steps.artifacts.bundle`)."""
        import mlflow

        if "MLFLOW_TRACKING_URI" not in os.environ:
            mlflow.set_tracking_uri(f"sqlite:///{os.path.abspath('mlflow.db')}")
        try:
            local = mlflow.artifacts.download_artifacts(artifact_uri=uri)
        except Exception as exc:  # MLflow raises several types for a model, version or run that does not exist
            raise MissingInputError(f"no MLflow model at {uri}: {exc}") from None
        return cls(*bundle.open_mlflow_model(local, where=uri), device, **kwargs)

    # ----------------------------------------------------------------------------------------------- drawing
    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, S, S) of the images it makes."""
        return self.autoencoder.image_shape

    def generate(
        self,
        n: int,
        labels: int | Sequence[int] | None = None,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int = 0,
        offset: int = 0,
        guidance_scale: float = 1.0,
    ) -> torch.Tensor:
        """``n`` new images, uint8 (n, C, S, S) on the CPU: image ``i`` is the sample step's image ``offset + i``.

        Args:
            labels: for class-conditional priors, one class for all images, one per image, or None to cycle through
                the classes (as the sample step does); must be None for unconditional priors.
            temperature, top_k, top_p, guidance_scale: the sampling controls (:class:`SamplingControls`; the sample
                step's settings of the same names); guidance needs priors trained with ``class_dropout``.
            seed: the ``sample.seed`` of the images.

        Raises:
            ValueError: a bad ``n``, ``seed``, control or label, naming it.
        """
        controls = SamplingControls(temperature=temperature, top_k=top_k, top_p=top_p, guidance_scale=guidance_scale)
        n, offset = _count("n", n, 1, MAX_IMAGES), _count("offset", offset, 0, None)
        seed = _count("seed", seed, 0, 2**32 - 1)
        seeds = [sample_seed(seed, i) for i in range(offset, offset + n)]
        return self.draw(seeds, self._labels(labels, n, offset), controls)[0]

    def complete(
        self,
        images: torch.Tensor | np.ndarray | Sequence[bytes],
        keep_rows: int,
        n: int = 1,
        labels: int | Sequence[int] | None = None,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int = 0,
        guidance_scale: float = 1.0,
    ) -> torch.Tensor:
        """``n`` completions of each image: its first ``keep_rows`` rows kept, the rest drawn from the priors.

        At every level the code rows wholly inside the kept rows keep the image's codes, in raster order, and the
        rest are sampled after them: a completion is a sample with those codes forced, exact because the priors are
        causal (:func:`steps.generation.generator.kept_rows`). ``keep_rows=0`` draws new images; ``keep_rows`` = the
        image side returns each image's reconstruction.

        Args:
            images: uint8 (N, C, S, S) or image files' bytes, as :meth:`encode` takes them.
            keep_rows: image rows to keep, in [0, S].
            n: completions per image.
            labels: for class-conditional priors, one class for all, one per image (its completions share it), or
                None to cycle through the classes over the N * n completions; None for unconditional priors.
            temperature, top_k, top_p, guidance_scale, seed: as in :meth:`generate`; completion ``j`` of image ``i``
                draws from the seed of the sample step's image ``i * n + j``.

        Returns:
            uint8 (N * n, C, S, S) on the CPU: image ``i``'s completions are rows ``i * n`` to ``i * n + n - 1``.

        Raises:
            ValueError: images of another size or channel count than the model, ``keep_rows`` outside the image, or a
                bad ``n``, control, seed or label, naming it.
        """
        controls = SamplingControls(temperature=temperature, top_k=top_k, top_p=top_p, guidance_scale=guidance_scale)
        n, seed = _count("n", n, 1, MAX_IMAGES), _count("seed", seed, 0, 2**32 - 1)
        keep_rows = check_keep_rows(keep_rows, self.image_shape[-1])
        self._images.check(controls)
        codes = self.encode(images)  # checks the images' shape (and each file) before any sampling
        count = len(next(iter(codes.values())))
        if count * n > MAX_IMAGES:
            raise ValueError(f"{count} images x n={n} completions is over the limit of {MAX_IMAGES} per call")
        if labels is not None and not isinstance(labels, (int, np.integer)):
            labels = list(labels)
            if len(labels) != count:
                raise ValueError(
                    f"labels must be one class for all images or one per image ({count}), got {len(labels)}"
                )
            labels = [v for v in labels for _ in range(n)]
        given = {lv: maps.repeat_interleave(n, dim=0) for lv, maps in codes.items()}
        seeds = [sample_seed(seed, i) for i in range(count * n)]
        return self.draw(seeds, self._labels(labels, count * n, 0), controls, given, keep_rows)[0]

    def draw(
        self,
        seeds: Sequence[int],
        labels: Sequence[int] | None = None,
        controls: SamplingControls = DEFAULT,
        given: Mapping[str, torch.Tensor] | None = None,
        keep_rows: int = 0,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Images (uint8 (n, C, S, S)) and codes per level ((n, H, W)) for generator ``seeds`` (one per image, as
        :func:`steps.generation.generator.sample_seed` makes them) and ``labels`` (one per image, or None); with
        ``given`` codes per level ((n, H, W), as :meth:`encode` returns them) and ``keep_rows``, completions of them
        (:meth:`complete`)."""
        self._images.check(controls)
        if labels is not None:
            self._check_labels(labels)
        images, codes = [], {lv: [] for lv in self.autoencoder.levels}
        for start in range(0, len(seeds), self.batch_size):
            part = slice(start, start + self.batch_size)
            known = {lv: torch.as_tensor(maps[part]) for lv, maps in given.items()} if given is not None else None
            x, c = self._images.draw(
                seeds[part], labels[part] if labels is not None else None, controls, known, keep_rows
            )
            images.append(torch.from_numpy(to_uint8_chw(x)))
            for lv, maps in c.items():
                codes[lv].append(maps.cpu())
        return torch.cat(images), {lv: torch.cat(maps) for lv, maps in codes.items()}

    def _labels(self, labels: int | Sequence[int] | None, n: int, offset: int) -> list[int] | None:
        if not self.num_classes:
            if labels is not None:
                raise ValueError("labels given, but the priors are not class-conditional")
            return None
        if labels is None:
            return [(offset + i) % self.num_classes for i in range(n)]
        if isinstance(labels, (int, np.integer)) and not isinstance(labels, bool):
            labels = [int(labels)] * n
        labels = [int(v) for v in labels]
        if len(labels) != n:
            raise ValueError(f"labels must be one class for all images or one per image ({n}), got {len(labels)}")
        return labels

    def _check_labels(self, labels: Sequence[int]) -> None:
        if not self.num_classes:
            raise ValueError("labels given, but the priors are not class-conditional")
        bad = sorted({v for v in labels if not 0 <= v < self.num_classes})
        if bad:
            raise ValueError(f"labels must be in [0, {self.num_classes}) (the priors' classes), got {bad}")

    # ----------------------------------------------------------------------------------------------- codes
    @torch.no_grad()
    def encode(self, images: torch.Tensor | np.ndarray | Sequence[bytes]) -> dict[str, torch.Tensor]:
        """Codes per level ((N, H, W) int64) of uint8 images (N, C, S, S), or of image files' bytes (PNG, JPEG...).

        Files are untrusted input: at most :data:`MAX_IMAGES` of them and :data:`MAX_REQUEST_BYTES` in all, each at
        most :data:`MAX_IMAGE_BYTES` and exactly the model's size by its header, checked before its pixels are
        decoded, and decoded one batch at a time (``steps.io.pixels.decode_served``).

        Raises:
            ValueError: images of another shape or dtype; ``ImageRejected`` (a ValueError) for a file over a limit,
                of another size, or not an image, naming which.
        """
        if not self.autoencoder.makes_codes:
            raise ValueError(f"{self.autoencoder.kind} models make no codes")
        batches = self._batches(images)
        codes = {lv: [] for lv in self.autoencoder.levels}
        for pixels in batches:
            x = to_float(pixels).to(self.device)  # (B, C, S, S)
            for lv, maps in zip(self.autoencoder.levels, self.model.encode(x).codes, strict=True):
                codes[lv].append(maps.cpu())
        return {lv: torch.cat(maps) for lv, maps in codes.items()}

    @torch.no_grad()
    def decode(self, codes: Mapping[str, torch.Tensor | np.ndarray]) -> torch.Tensor:
        """uint8 images (N, C, S, S) of code maps per level ((N, H, W), every level of the model)."""
        levels = self.autoencoder.levels
        if set(codes) != set(levels):
            raise ValueError(f"codes must have exactly the levels {list(levels)}, got {sorted(codes)}")
        maps = {lv: torch.as_tensor(np.asarray(codes[lv]), dtype=torch.long) for lv in levels}
        n = len(maps[levels[0]])
        out = []
        for start in range(0, n, self.batch_size):
            part = [maps[lv][start : start + self.batch_size].to(self.device) for lv in levels]
            out.append(torch.from_numpy(to_uint8_chw(self.model.decode_codes(*part))))
        return torch.cat(out) if out else torch.zeros(0, *self.image_shape, dtype=torch.uint8)

    def _batches(self, images: torch.Tensor | np.ndarray | Sequence[bytes]) -> Iterator[np.ndarray]:
        """uint8 (B, C, S, S) batches of the images given, checked against the model's image shape. Files: every
        limit of every file checked (by its header) before the first is decoded, then decoded batch by batch, so a
        call holds the files and one batch of pixels."""
        size = self.image_shape[-1]
        if isinstance(images, (list, tuple)) and images and isinstance(images[0], (bytes, bytearray, memoryview)):
            if len(images) > MAX_IMAGES:
                raise ImageRejected(f"{len(images)} images, over the limit of {MAX_IMAGES} per call")
            total = sum(len(f) if isinstance(f, (bytes, bytearray, memoryview)) else 0 for f in images)
            if total > MAX_REQUEST_BYTES:
                raise ImageRejected(f"{total} bytes of images, over the limit of {MAX_REQUEST_BYTES} bytes per call")
            for i, f in enumerate(images):
                decode_served(f, size, channels=0, max_bytes=MAX_IMAGE_BYTES, what=f"image {i}")  # headers only
            return self._decoded(images)
        pixels = images.cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
        if pixels.dtype != np.uint8 or tuple(pixels.shape[1:]) != self.image_shape:
            raise ValueError(f"images must be uint8 (N, {', '.join(map(str, self.image_shape))}), got "
                             f"{pixels.dtype} {tuple(pixels.shape)}")  # fmt: skip
        return (pixels[i : i + self.batch_size] for i in range(0, len(pixels), self.batch_size))

    def _decoded(self, files: Sequence[bytes]) -> Iterator[np.ndarray]:
        c, s, _ = self.image_shape
        for start in range(0, len(files), self.batch_size):
            part = files[start : start + self.batch_size]
            yield np.stack(
                [decode_served(f, s, c, MAX_IMAGE_BYTES, what=f"image {start + i}") for i, f in enumerate(part)]
            )


def png_base64(images: torch.Tensor) -> list[str]:
    """uint8 images (N, C, S, S) as base64-encoded PNGs (what the served models return)."""
    return [base64.b64encode(encode_png(p)).decode("ascii") for p in hwc(images.numpy())]


def file_of_base64(text: str) -> bytes:
    """A file's bytes from base64 text (line breaks allowed, as ``base64`` without ``-w0`` writes them).

    Raises:
        ValueError: text that is not base64, naming ``image``.
    """
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"image is not base64 ({exc})") from None


def pixels_of_base64(pngs: Sequence[str], channels: int) -> np.ndarray:
    """The inverse of :func:`png_base64`: uint8 (N, C, S, S)."""
    return np.stack([decode_png(base64.b64decode(p), channels) for p in pngs])


def _count(name: str, value: Any, low: int, high: int | None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low or (high and value > high):
        span = f"in [{low}, {high}]" if high else f">= {low}"
        raise ValueError(f"{name} must be an int {span}, got {value!r}")
    return int(value)


def autoencoder_of(output: str) -> str:
    """The autoencoder output ``output`` (a priors folder, say) was made from, through the outputs' run records."""
    for ancestor in records.lineage(output).values():
        if Autoencoder.found_at(ancestor.uri):  # an output made by hand may have no record of its own
            return ancestor.uri
    raise MissingInputError(
        f"cannot find the autoencoder of {output}: its run record does not lead to a train_vqvae output that still "
        "exists; use Generator.from_artifacts(<train_vqvae output>, <train_prior output>)"
    )
