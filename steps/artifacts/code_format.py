"""The one format of discrete codes, wherever they are stored: the code dataset (encode) and the sampled codes (sample).

A row is one image::

    id: string    label: int32 (nullable)    <level>: fixed_size_list<int16>[H*W] per level, top first    [extras]

each level a code map flattened row-major. Every file's schema metadata key ``vqvae2.codes`` holds the JSON of
:class:`CodeMeta` (which levels, shapes, codebook sizes, and *which* VQ-VAE made the codes), so a reader checks what it
got without reading a row. A kind of output may add columns of its own after the levels (the sampled codes add the
seed, and the rejection outcome): :func:`code_schema` takes them as ``extra`` fields.

:func:`codes_to_arrow` is the one builder of such tables, :func:`batch_to_tensors` the one reader of batches of them,
:func:`check_code_meta` the one comparison of metadata against what a reader expects. Codes are int16, so a codebook
holds at most :data:`steps.nn.quantize.MAX_CODEBOOK` codes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from steps.nn.quantize import MAX_CODEBOOK

CODES_META_KEY = b"vqvae2.codes"


class CodeDatasetMismatch(ValueError):
    """A code dataset that does not fit what the reader expects (another VQ-VAE, other levels or shapes)."""


@dataclass(frozen=True)
class CodeMeta:
    """What a code dataset holds. ``levels`` are top first; ``shapes`` are (H, W) code maps per level."""

    levels: tuple[str, ...]
    shapes: dict[str, tuple[int, int]]
    codebook_size: dict[str, int]
    vqvae: str
    image_size: int
    num_classes: int | None = None

    def __post_init__(self) -> None:
        levels = tuple(self.levels)
        if not levels or len(set(levels)) != len(levels) or not all(isinstance(n, str) and n for n in levels):
            raise ValueError(f"CodeMeta.levels must be distinct non-empty names, got {self.levels!r}")
        for name in ("shapes", "codebook_size"):
            if set(getattr(self, name)) != set(levels):
                raise ValueError(f"CodeMeta.{name} must have one entry per level {levels}, got {getattr(self, name)}")
        shapes = {n: tuple(int(v) for v in self.shapes[n]) for n in levels}
        for n, hw in shapes.items():
            if len(hw) != 2 or min(hw) < 1:
                raise ValueError(f"CodeMeta.shapes[{n!r}] must be (H, W) with H, W >= 1, got {self.shapes[n]}")
        sizes = {n: int(self.codebook_size[n]) for n in levels}
        for n, k in sizes.items():
            if not 1 <= k <= MAX_CODEBOOK:
                raise ValueError(f"CodeMeta.codebook_size[{n!r}] must be in [1, {MAX_CODEBOOK}] (int16 codes), got {k}")
        if not isinstance(self.vqvae, str) or not self.vqvae:
            raise ValueError(f"CodeMeta.vqvae must be the VQ-VAE digest, got {self.vqvae!r}")
        if int(self.image_size) < 1:
            raise ValueError(f"CodeMeta.image_size must be >= 1, got {self.image_size}")
        if self.num_classes is not None and int(self.num_classes) < 1:
            raise ValueError(f"CodeMeta.num_classes must be >= 1 or None, got {self.num_classes}")
        # Normalise what JSON and OmegaConf hand over (lists, numpy ints) so equal metadata compares equal.
        object.__setattr__(self, "levels", levels)
        object.__setattr__(self, "shapes", shapes)
        object.__setattr__(self, "codebook_size", sizes)
        object.__setattr__(self, "image_size", int(self.image_size))
        if self.num_classes is not None:
            object.__setattr__(self, "num_classes", int(self.num_classes))

    @classmethod
    def of(cls, autoencoder: Any, num_classes: int | None = None) -> CodeMeta:
        """The metadata of codes made by ``autoencoder`` (an :class:`~steps.artifacts.autoencoder.Autoencoder`)."""
        return cls(
            levels=autoencoder.levels,
            shapes=autoencoder.shapes,
            codebook_size=autoencoder.codebook_sizes,
            vqvae=autoencoder.codes_digest,
            image_size=autoencoder.image_size,
            num_classes=num_classes,
        )

    def numel(self, level: str) -> int:
        h, w = self.shapes[level]
        return h * w

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "levels": list(self.levels),
            "shapes": {n: list(s) for n, s in self.shapes.items()},
            "codebook_size": dict(self.codebook_size),
            "vqvae": self.vqvae,
            "image_size": self.image_size,
            "num_classes": self.num_classes,
        }
        d.update({f"{n}_shape": list(s) for n, s in self.shapes.items()})  # the flat keys DESIGN.md names
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, data: str | bytes | Mapping[str, Any]) -> CodeMeta:
        d = json.loads(data) if isinstance(data, (str, bytes)) else data
        try:
            return cls(
                levels=tuple(d["levels"]),
                shapes=d["shapes"],
                codebook_size=d["codebook_size"],
                vqvae=d["vqvae"],
                image_size=d["image_size"],
                num_classes=d.get("num_classes"),
            )
        except KeyError as exc:
            raise ValueError(f"code metadata has no {exc.args[0]!r} entry") from None


# ------------------------------------------------------------------------------------------------ schema
def _level_type(meta: CodeMeta, level: str) -> pa.DataType:
    # "element" is the name Parquet gives list children on read, so a written schema reads back equal.
    return pa.list_(pa.field("element", pa.int16(), nullable=False), meta.numel(level))


def code_schema(meta: CodeMeta, extra: Sequence[pa.Field] = ()) -> pa.Schema:
    """The Arrow schema of codes described by ``meta``, metadata included; ``extra`` fields follow the levels."""
    fields = [pa.field("id", pa.string(), nullable=False), pa.field("label", pa.int32())]
    fields += [pa.field(n, _level_type(meta, n), nullable=False) for n in meta.levels]
    return pa.schema([*fields, *extra], metadata={CODES_META_KEY: meta.to_json().encode()})


def schema_code_meta(schema: pa.Schema, where: str = "") -> CodeMeta:
    """The :class:`CodeMeta` of a Parquet/Arrow schema, or a ValueError naming ``where``."""
    raw = (schema.metadata or {}).get(CODES_META_KEY)
    if raw is None:
        raise ValueError(
            f"{where or 'schema'}: not a code dataset of this pipeline (schema metadata {CODES_META_KEY!r} missing); "
            "run the encode step to make one"
        )
    return CodeMeta.from_json(raw)


def check_code_meta(
    meta: CodeMeta,
    *,
    vqvae: str | None = None,
    levels: Sequence[str] | None = None,
    shapes: Mapping[str, Sequence[int]] | None = None,
    codebook_size: Mapping[str, int] | None = None,
    where: str = "",
) -> None:
    """Raise :class:`CodeDatasetMismatch` naming the first field that differs from what the caller expects.

    Only the arguments given are checked; ``shapes`` and ``codebook_size`` may name a subset of the levels.
    """
    what = f"code dataset {where}" if where else "code dataset"
    if vqvae is not None and vqvae != meta.vqvae:
        raise CodeDatasetMismatch(f"{what} was made by VQ-VAE {meta.vqvae}, but the model given is {vqvae}")
    if levels is not None and tuple(levels) != meta.levels:
        raise CodeDatasetMismatch(
            f"{what}: field 'levels' mismatch: expected {list(levels)}, found {list(meta.levels)}"
        )
    for field_name, expected in (("shapes", shapes), ("codebook_size", codebook_size)):
        found = getattr(meta, field_name)
        for level, want in (expected or {}).items():
            if level not in found:
                raise CodeDatasetMismatch(
                    f"{what}: field '{field_name}.{level}' mismatch: expected {_show(want)}, "
                    f"found no level {level!r} (levels {list(meta.levels)})"
                )
            if _show(want) != _show(found[level]):
                got = _show(found[level])
                raise CodeDatasetMismatch(
                    f"{what}: field '{field_name}.{level}' mismatch: expected {_show(want)}, found {got}"
                )


def _show(value: Any) -> Any:
    return [int(v) for v in value] if isinstance(value, (tuple, list)) else int(value)


# ------------------------------------------------------------------------------------------------ conversions
def codes_to_arrow(
    ids: Sequence[str] | pa.Array | pa.ChunkedArray,
    labels: Sequence[int | None] | np.ndarray | pa.Array | pa.ChunkedArray | None,
    codes: Mapping[str, np.ndarray | torch.Tensor],
    meta: CodeMeta,
    extra: Sequence[tuple[pa.Field, Sequence[Any]]] = (),
) -> pa.Table:
    """One batch of images' codes -> a table of the code schema (:func:`code_schema`).

    Args:
        ids: one id per image.
        labels: one label (or None) per image; None for a batch without labels.
        codes: per level an integer code map (B, H, W), values in [0, codebook_size).
        extra: columns after the levels, each (field, one value per image).

    Raises:
        ValueError: missing or extra levels, wrong shapes, or values out of range.
    """
    if set(codes) != set(meta.levels):
        raise ValueError(f"codes must have exactly the levels {list(meta.levels)}, got {sorted(codes)}")
    id_arr = ids.cast(pa.string()) if isinstance(ids, (pa.Array, pa.ChunkedArray)) else pa.array(ids, pa.string())
    b = len(id_arr)
    columns: list[Any] = [id_arr, _labels_array(labels, b)]
    for level in meta.levels:
        c = codes[level]
        arr = c.detach().cpu().numpy() if isinstance(c, torch.Tensor) else np.asarray(c)
        want = (b, *meta.shapes[level])
        if arr.shape != want:
            raise ValueError(f"{level} codes must have shape {want}, got {arr.shape}")
        if not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"{level} codes must be integers, got {arr.dtype}")
        k = meta.codebook_size[level]
        if b and (arr.min() < 0 or arr.max() >= k):
            raise ValueError(f"{level} codes must be in [0, {k}), got [{int(arr.min())}, {int(arr.max())}]")
        values = pa.array(arr.astype(np.int16, copy=False).reshape(-1))  # (B*H*W,)
        columns.append(pa.FixedSizeListArray.from_arrays(values, type=_level_type(meta, level)))
    columns += [pa.array(values, field.type) for field, values in extra]
    return pa.Table.from_arrays(columns, schema=code_schema(meta, [field for field, _ in extra]))


def _labels_array(labels: Any, n: int) -> pa.Array:
    if labels is None:
        return pa.nulls(n, pa.int32())
    if isinstance(labels, (pa.Array, pa.ChunkedArray)):
        arr = labels.cast(pa.int32())
    elif isinstance(labels, np.ndarray) and labels.dtype.kind == "f":
        arr = pa.array(labels, from_pandas=True).cast(pa.int32())  # NaN -> null
    else:
        arr = pa.array(labels, pa.int32())
    if len(arr) != n:
        raise ValueError(f"got {len(arr)} labels for {n} ids")
    return arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr


def batch_to_tensors(batch: Mapping[str, Any] | pa.Table, meta: CodeMeta) -> dict[str, torch.Tensor]:
    """A batch of code rows -> ``{level: long (B, H, W), "label": long (B,) with -1 for null}``.

    Accepts a pyarrow table or a dict of columns as Ray Data or pyarrow hand them over: code columns as 2-D arrays
    (B, H*W), object arrays of 1-D arrays, (B, H, W) arrays, or Arrow fixed-size lists.
    """
    if isinstance(batch, pa.Table):
        batch = {name: batch.column(name) for name in batch.column_names}
    out: dict[str, torch.Tensor] = {}
    for level in meta.levels:
        if level not in batch:
            raise ValueError(f"batch has no {level!r} column (columns: {sorted(batch)})")
        h, w = meta.shapes[level]
        flat = _code_matrix(batch[level], h * w, level)  # (B, H*W)
        out[level] = torch.from_numpy(flat.astype(np.int64)).view(-1, h, w)  # (B, H, W)
    if "label" in batch:
        out["label"] = torch.from_numpy(_label_vector(batch["label"]))
    return out


def _code_matrix(col: Any, n: int, level: str) -> np.ndarray:
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    if isinstance(col, pa.FixedSizeListArray):
        arr = col.flatten().to_numpy(zero_copy_only=False)
    else:
        arr = np.asarray(col)
        if arr.dtype == object:  # one array (or list) per row
            arr = np.stack([np.asarray(x) for x in arr]) if len(arr) else np.zeros((0, n), np.int64)
    if arr.size % n:
        raise ValueError(f"{level} column holds {arr.size} values, not a multiple of {n} per row")
    return arr.reshape(-1, n)


def _label_vector(col: Any) -> np.ndarray:
    if isinstance(col, (pa.Array, pa.ChunkedArray)):
        return col.cast(pa.int64()).fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
    if isinstance(col, np.ma.MaskedArray):
        return col.filled(-1).astype(np.int64)
    arr = np.asarray(col)
    if arr.dtype == object:
        return np.array([-1 if v is None or v != v else int(v) for v in arr], dtype=np.int64)
    if arr.dtype.kind == "f":
        return np.where(np.isnan(arr), -1, arr).astype(np.int64)
    return arr.astype(np.int64)
