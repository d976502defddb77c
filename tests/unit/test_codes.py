"""The code-dataset contract: schema/metadata round trips, pyarrow/pandas/duckdb readers, checks, conversions."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from steps.artifacts.checkpoints import digest as model_digest
from steps.artifacts.code_format import (
    CODES_META_KEY,
    CodeDatasetMismatch,
    CodeMeta,
    batch_to_tensors,
    check_code_meta,
    code_schema,
    codes_to_arrow,
)
from steps.artifacts.codes import read_code_meta


def meta2(**kw) -> CodeMeta:
    base = dict(
        levels=("top", "bottom"),
        shapes={"top": (4, 4), "bottom": (8, 8)},
        codebook_size={"top": 32, "bottom": 64},
        vqvae="abc123",
        image_size=32,
        num_classes=10,
    )
    return CodeMeta(**{**base, **kw})


def table(meta: CodeMeta, n: int = 5, seed: int = 0) -> tuple[pa.Table, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    codes = {lv: rng.integers(0, meta.codebook_size[lv], (n, *meta.shapes[lv])) for lv in meta.levels}
    labels = [i % 3 if i % 2 else None for i in range(n)]
    return codes_to_arrow([f"img-{i}" for i in range(n)], labels, codes, meta), codes


def test_meta_json_round_trip_and_normalisation():
    meta = meta2()
    d = json.loads(meta.to_json())
    assert d["top_shape"] == [4, 4] and d["bottom_shape"] == [8, 8]
    assert d["codebook_size"] == {"top": 32, "bottom": 64} and d["num_classes"] == 10
    assert CodeMeta.from_json(meta.to_json()) == meta
    assert CodeMeta.from_json(meta.to_json().encode()) == meta
    # lists (JSON, OmegaConf) and numpy ints normalise to the same value
    assert meta2(levels=["top", "bottom"], shapes={"top": [4, 4], "bottom": [np.int64(8), 8]}) == meta


@pytest.mark.parametrize(
    "kw, field",
    [
        ({"levels": ()}, "levels"),
        ({"shapes": {"top": (4, 4)}}, "shapes"),
        ({"codebook_size": {"top": 32, "bottom": 40000}}, "codebook_size"),
        ({"vqvae": ""}, "vqvae"),
        ({"num_classes": 0}, "num_classes"),
    ],
)
def test_meta_validation_names_field(kw, field):
    with pytest.raises(ValueError, match=f"CodeMeta.{field}"):
        meta2(**kw)


def test_schema_round_trips_through_parquet(tmp_path):
    meta = meta2()
    t, _ = table(meta)
    pq.write_table(t, tmp_path / "a.parquet")
    schema = pq.read_schema(tmp_path / "a.parquet")
    assert schema.equals(code_schema(meta), check_metadata=True)
    assert CodeMeta.from_json(schema.metadata[CODES_META_KEY]) == meta
    assert schema.field("top").type == pa.list_(pa.field("element", pa.int16(), nullable=False), 16)


def test_one_level_schema_has_only_top():
    meta = meta2(levels=("top",), shapes={"top": (8, 8)}, codebook_size={"top": 16})
    assert code_schema(meta).names == ["id", "label", "top"]


def test_readable_by_pyarrow_pandas_duckdb(tmp_path):
    duckdb = pytest.importorskip("duckdb")
    pd = pytest.importorskip("pandas")
    meta = meta2()
    t, codes = table(meta, n=7)
    path = tmp_path / "codes.parquet"
    pq.write_table(t, path)

    back = pq.read_table(path)
    assert back.num_rows == 7
    np.testing.assert_array_equal(
        back.column("bottom").combine_chunks().flatten().to_numpy().reshape(7, 8, 8), codes["bottom"]
    )

    df = pd.read_parquet(path)
    assert list(df.columns) == ["id", "label", "top", "bottom"]
    assert df["label"].isna().sum() == 4 and len(df["top"].iloc[0]) == 16
    np.testing.assert_array_equal(np.stack(df["top"].to_numpy()).reshape(7, 4, 4), codes["top"])

    n, top_len, bottom_len, first = duckdb.sql(
        f"select count(*), max(len(top)), max(len(bottom)), min(top[1]) from read_parquet('{path}')"
    ).fetchall()[0]
    assert (n, top_len, bottom_len, first) == (7, 16, 64, codes["top"][:, 0, 0].min())
    assert duckdb.sql(f"select count(*) from read_parquet('{path}') where label is null").fetchall() == [(4,)]


def test_codes_to_arrow_checks_values_shapes_and_levels():
    meta = meta2()
    ok = {"top": np.zeros((2, 4, 4), np.int64), "bottom": np.zeros((2, 8, 8), np.int64)}
    assert codes_to_arrow(["a", "b"], None, ok, meta).column("label").null_count == 2
    with pytest.raises(ValueError, match=r"top codes must be in \[0, 32\)"):
        codes_to_arrow(["a", "b"], None, {**ok, "top": np.full((2, 4, 4), 32)}, meta)
    with pytest.raises(ValueError, match=r"bottom codes must be in \[0, 64\)"):
        codes_to_arrow(["a", "b"], None, {**ok, "bottom": np.full((2, 8, 8), -1)}, meta)
    with pytest.raises(ValueError, match="shape"):
        codes_to_arrow(["a", "b"], None, {**ok, "top": np.zeros((2, 8, 8), np.int64)}, meta)
    with pytest.raises(ValueError, match="levels"):
        codes_to_arrow(["a", "b"], None, {"top": ok["top"]}, meta)
    with pytest.raises(ValueError, match="integers"):
        codes_to_arrow(["a", "b"], None, {**ok, "top": np.zeros((2, 4, 4), np.float32)}, meta)
    t = codes_to_arrow(["a", "b"], np.array([1.0, np.nan]), {k: torch.from_numpy(v) for k, v in ok.items()}, meta)
    assert t.column("label").to_pylist() == [1, None]
    assert t.column("top").type.value_type == pa.int16()


def test_check_code_meta_names_field_expected_and_found():
    meta = meta2()
    check_code_meta(meta, vqvae="abc123", levels=["top", "bottom"], shapes={"top": [4, 4]}, codebook_size={"top": 32})
    with pytest.raises(
        CodeDatasetMismatch, match="code dataset /x/codes was made by VQ-VAE abc123, but the model given"
    ):
        check_code_meta(meta, vqvae="def456", where="/x/codes")
    with pytest.raises(CodeDatasetMismatch, match=r"'levels'.*expected \['top'\], found \['top', 'bottom'\]"):
        check_code_meta(meta, levels=("top",))
    with pytest.raises(CodeDatasetMismatch, match=r"'shapes.bottom'.*expected \[16, 16\], found \[8, 8\]"):
        check_code_meta(meta, shapes={"bottom": (16, 16)})
    with pytest.raises(CodeDatasetMismatch, match=r"'codebook_size.top'.*expected 512, found 32"):
        check_code_meta(meta, codebook_size={"top": 512})
    with pytest.raises(CodeDatasetMismatch, match="no level 'middle'"):
        check_code_meta(meta, shapes={"middle": (2, 2)})
    assert issubclass(CodeDatasetMismatch, ValueError)


def test_batch_to_tensors_accepts_every_batch_layout():
    meta = meta2()
    t, codes = table(meta, n=6)
    expect_labels = torch.tensor([-1, 1, -1, 0, -1, 2])
    two_d = {
        "top": codes["top"].reshape(6, 16).astype(np.int16),
        "bottom": codes["bottom"].reshape(6, 64),
        "label": np.array([np.nan, 1, np.nan, 0, np.nan, 2]),
    }
    objects = {"label": np.array([None, 1, None, 0, None, 2], dtype=object)}
    for level in meta.levels:  # object arrays of 1-D arrays, as Ray Data hands over ragged-looking columns
        objects[level] = np.empty(6, dtype=object)
        objects[level][:] = list(codes[level].reshape(6, -1))
    assert objects["top"].dtype == object
    for batch in (t, two_d, objects, {n: t.column(n) for n in t.column_names}):
        out = batch_to_tensors(batch, meta)
        assert out["top"].shape == (6, 4, 4) and out["bottom"].shape == (6, 8, 8)
        assert out["top"].dtype == torch.long and out["label"].dtype == torch.long
        assert torch.equal(out["top"], torch.from_numpy(codes["top"]))
        assert torch.equal(out["bottom"], torch.from_numpy(codes["bottom"]))
        assert torch.equal(out["label"], expect_labels)
    assert "label" not in batch_to_tensors({"top": two_d["top"], "bottom": two_d["bottom"]}, meta)
    # a slice of an Arrow column keeps its offset
    sliced = batch_to_tensors(t.slice(2, 3), meta)
    assert torch.equal(sliced["bottom"], torch.from_numpy(codes["bottom"][2:5]))
    with pytest.raises(ValueError, match="no 'bottom' column"):
        batch_to_tensors({"top": two_d["top"]}, meta)


def test_read_code_meta_from_json_then_parquet_then_clear_errors(tmp_path):
    meta = meta2()
    t, _ = table(meta)
    (tmp_path / "ds" / "split=train").mkdir(parents=True)
    pq.write_table(t, tmp_path / "ds" / "split=train" / "part-0.parquet")
    assert read_code_meta(str(tmp_path / "ds")) == meta  # from the schema: no _codes.json yet
    other = meta2(vqvae="fromjson")
    (tmp_path / "ds" / "_codes.json").write_text(json.dumps({**other.to_dict(), "rows": {"train": 5, "val": 0}}))
    assert read_code_meta(str(tmp_path / "ds")) == other

    with pytest.raises(FileNotFoundError, match=r"no code dataset at .*nowhere.*run the encode step"):
        read_code_meta(str(tmp_path / "nowhere"))
    (tmp_path / "images" / "train").mkdir(parents=True)
    pq.write_table(pa.table({"id": ["a"]}), tmp_path / "images" / "train" / "x.parquet")
    with pytest.raises(ValueError, match=r"images.*not a code dataset.*encode step"):
        read_code_meta(str(tmp_path / "images"))


def test_model_digest():
    assert model_digest(b"weights") == hashlib.sha256(b"weights").hexdigest()[:16]
    assert len(model_digest(b"")) == 16 and model_digest(b"a") != model_digest(b"b")
