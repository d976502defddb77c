"""The trained models as MLflow models that predict: one generator per pipeline run, and an encoder.

Both are logged "from code" (``pipeline/serving/mlflow_generator.py``, ``pipeline/serving/mlflow_encoder.py``: no
pickled Python objects) with the models they need copied from the pipeline's outputs (a generator bundle,
:mod:`steps.artifacts.bundle`), and load them with ``torch.load(weights_only=True)`` through
:class:`pipeline.serving.generator.Generator`. Each class says what :mod:`pipeline.serving.registration` needs to log
it (:class:`ServedModel`: its role, entry file, the models it carries, signature, input example); :data:`SERVED`
lists them.

* **generator** (``<experiment>-generator``): rows ``{"label": int (optional for unconditional priors), "seed": int,
  "image": image file bytes (optional)}`` and params ``temperature``, ``top_k``, ``top_p``, ``guidance_scale``,
  ``keep_rows`` -> rows ``{"png": base64 PNG, "label", "seed", <level>: codes}``.
  Row ``{"label": l, "seed": s}`` is ``Generator.generate(1, labels=[l], seed=s)``: the same image every time.
  Completion: with ``keep_rows`` = k > 0 every row carries an ``image`` (a PNG, JPEG... of the model's size), and row
  ``{"label": l, "seed": s, "image": f}`` is ``Generator.complete(<f's pixels>[None], keep_rows=k, labels=[l],
  seed=s)``: the image's first k rows kept (at every level, the code rows inside them), the rest drawn. With
  ``keep_rows`` = 0 (the default) an image is ignored. The files are checked as the encoder's are.
* **encoder** (``<experiment>-encoder``): rows ``{"png": image bytes}`` -> rows of codes per level (flat, raster).
  The files are untrusted: each is checked by its header (format, the model's size, at most
  ``pipeline.serving.generator.MAX_IMAGE_BYTES``) before any pixel is decoded, a request holds at most ``MAX_ROWS``
  rows and ``MAX_REQUEST_BYTES`` of files, and it is decoded one batch at a time, so a request's memory is bounded.

Over HTTP (``mlflow models serve``) a binary column (``image``, ``png``) is sent base64-encoded in the JSON and MLflow
decodes it before ``predict`` (``base64 -w0 face.png`` gives it):

    curl -X POST http://127.0.0.1:5000/invocations -H 'Content-Type: application/json' \
      -d '{"dataframe_records": [{"seed": 0, "label": 3, "image": "<base64 PNG>"}], "params": {"keep_rows": 16}}'

A Python caller may pass the file's bytes or the same base64 text. Leave the ``image`` key out of every row to draw
new images: in the JSON form a row without it next to rows with it is refused by MLflow before ``predict``.

A bad request (a label the priors do not know, a missing seed, a temperature <= 0, keep_rows without an image, a file
that is not an image...) raises an MlflowException with INVALID_PARAMETER_VALUE, which ``mlflow models serve`` answers
with HTTP 400 and the message.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models.signature import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types.schema import Array, ColSpec, DataType, ParamSchema, ParamSpec, Schema

from steps.artifacts import bundle
from steps.artifacts.autoencoder import Autoencoder
from steps.artifacts.priors import Priors
from steps.generation.generator import check_keep_rows, sample_seed
from steps.io.pixels import encode_png
from steps.nn.draw import SamplingControls

MAX_ROWS = 4096  # per request


def _bad(message: str) -> MlflowException:
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def _int(value: Any, name: str, row: int) -> int | None:
    """An int cell (JSON and pandas hand over ints, floats and NaN for a missing value), or None if missing."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, bool) or not float(value).is_integer():
        raise _bad(f"row {row}: {name} must be an integer, got {value!r}")
    return int(value)


def _image(value: Any, row: int) -> bytes:
    """A row's image file: its bytes (what ``mlflow models serve`` hands over, having decoded the JSON's base64) or
    base64 text (a Python caller may send either); checked as an image later, by ``Generator.encode``."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        from pipeline.serving.generator import file_of_base64  # deferred, as predict's png_base64

        try:
            return file_of_base64(value)
        except ValueError as exc:
            raise _bad(f"row {row}: {exc}") from None
    if value is None or (isinstance(value, float) and math.isnan(value)):
        raise _bad(f"row {row}: keep_rows > 0 needs an image in every row (the image file's bytes)")
    raise _bad(f"row {row}: image must be an image file's bytes (base64 in JSON), got {type(value).__name__}")


class ServedModel(mlflow.pyfunc.PythonModel):
    """Base of the MLflow models: what registration logs for each, and how each loads its bundle."""

    role: ClassVar[str]  # the registered name is ``<experiment>-<role>``; also the logged model's name
    entry: ClassVar[str]  # the file beside this module that MLflow runs to load the model ("models from code")
    carries_priors: ClassVar[bool]  # the bundle holds the priors too

    @classmethod
    def serves(cls, autoencoder: Autoencoder) -> bool:
        """Whether a run with this autoencoder has such a model."""
        return True

    @classmethod
    def signature(cls, autoencoder: Autoencoder) -> ModelSignature:
        raise NotImplementedError

    @classmethod
    def example(cls, autoencoder: Autoencoder, priors: Priors | None) -> pd.DataFrame:
        raise NotImplementedError

    def load_context(self, context) -> None:
        from pipeline.serving.generator import Generator

        autoencoder, priors = bundle.open_parts(context.artifacts, where=f"the {self.role} model")
        self.generator = Generator(autoencoder, priors if self.carries_priors else None, device="cpu")


class GeneratorModel(ServedModel):
    """Draws one image per input row (see the module docstring)."""

    role, entry, carries_priors = "generator", "mlflow_generator.py", True

    @classmethod
    def signature(cls, autoencoder: Autoencoder) -> ModelSignature:
        inputs = Schema(
            [
                ColSpec(DataType.long, "label", required=False),
                ColSpec(DataType.long, "seed"),
                ColSpec(DataType.binary, "image", required=False),  # the image to complete (with keep_rows > 0)
            ]
        )
        outputs = [ColSpec(DataType.string, "png"), ColSpec(DataType.long, "label", required=False)]
        outputs += [ColSpec(DataType.long, "seed")] + [ColSpec(Array(DataType.long), lv) for lv in autoencoder.levels]
        kinds = {int: DataType.long, float: DataType.double}
        controls = dataclasses.fields(SamplingControls)
        params = [ParamSpec(f.name, kinds[type(f.default)], f.default) for f in controls]
        params.append(ParamSpec("keep_rows", DataType.long, 0))  # image rows of the row's image to keep
        return ModelSignature(inputs=inputs, outputs=Schema(outputs), params=ParamSchema(params))

    @classmethod
    def example(cls, autoencoder: Autoencoder, priors: Priors | None) -> pd.DataFrame:
        conditional = priors is not None and any(priors.num_classes(lv) for lv in autoencoder.levels)
        return pd.DataFrame({"label": [0], "seed": [0]} if conditional else {"seed": [0]})

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        from pipeline.serving.generator import png_base64

        gen, params = self.generator, params or {}
        if not 1 <= len(model_input) <= MAX_ROWS:
            raise _bad(f"a request holds 1 to {MAX_ROWS} rows, got {len(model_input)}")
        if "seed" not in model_input:
            raise _bad("every row needs a seed (an integer >= 0)")
        rows = model_input.to_dict("records")
        seeds = [_int(r.get("seed"), "seed", i) for i, r in enumerate(rows)]
        if any(s is None or s < 0 for s in seeds):
            raise _bad("every row needs a seed (an integer >= 0)")
        labels = [_int(r.get("label"), "label", i) for i, r in enumerate(rows)]
        if gen.num_classes and None in labels:
            raise _bad(f"every row needs a label: the priors are conditioned on {gen.num_classes} classes")
        if not gen.num_classes and any(v is not None for v in labels):
            raise _bad("labels given, but the priors are not class-conditional")
        try:
            keep_rows = check_keep_rows(params.get("keep_rows", 0), gen.image_shape[-1])
        except ValueError as exc:
            raise _bad(str(exc)) from None
        files = [_image(r.get("image"), i) for i, r in enumerate(rows)] if keep_rows else None
        try:
            controls = SamplingControls.parse({k: v for k, v in params.items() if k in SamplingControls.names()})
            given = gen.encode(files) if files else None  # each file checked by its header before it is decoded
            images, codes = gen.draw(
                [sample_seed(s, 0) for s in seeds], labels if gen.num_classes else None, controls, given, keep_rows
            )
        except ValueError as exc:
            raise _bad(str(exc)) from None
        out = pd.DataFrame({"png": png_base64(images), "label": labels, "seed": seeds})
        for lv, maps in codes.items():
            out[lv] = [m.flatten().tolist() for m in maps]
        return out


class EncoderModel(ServedModel):
    """Codes of the images of the input rows (see the module docstring)."""

    role, entry, carries_priors = "encoder", "mlflow_encoder.py", False

    @classmethod
    def serves(cls, autoencoder: Autoencoder) -> bool:
        return autoencoder.makes_codes

    @classmethod
    def signature(cls, autoencoder: Autoencoder) -> ModelSignature:
        outputs = Schema([ColSpec(Array(DataType.long), lv) for lv in autoencoder.levels])
        return ModelSignature(inputs=Schema([ColSpec(DataType.binary, "png")]), outputs=outputs)

    @classmethod
    def example(cls, autoencoder: Autoencoder, priors: Priors | None) -> pd.DataFrame:
        c, s, _ = autoencoder.image_shape
        return pd.DataFrame({"png": [encode_png(np.zeros((s, s) if c == 1 else (s, s, c), np.uint8))]})

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        if "png" not in model_input or not 1 <= len(model_input) <= MAX_ROWS:
            raise _bad(f"send 1 to {MAX_ROWS} rows with a png column (the image file's bytes)")
        try:
            codes = self.generator.encode(list(model_input["png"]))  # each file checked before it is decoded
        except ValueError as exc:
            raise _bad(str(exc)) from None
        return pd.DataFrame({lv: [m.flatten().tolist() for m in maps] for lv, maps in codes.items()})


SERVED: tuple[type[ServedModel], ...] = (GeneratorModel, EncoderModel)  # what a pipeline run registers
