"""The encode step on local Ray: one code row per image, equal to in-process model.encode, and clear input errors."""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import torch

from steps import encode
from steps.artifacts import records
from steps.artifacts.autoencoder import Autoencoder
from steps.artifacts.code_format import CodeMeta, batch_to_tensors, schema_code_meta
from steps.artifacts.codes import CodeDataset, read_code_meta
from steps.artifacts.images import ImageShards
from steps.artifacts.splits import SPLITS
from steps.core.step import MissingInputError
from steps.encode import run
from steps.io.pixels import decode_batch, encode_png
from steps.nn import registry
from steps.nn.checkpoint import CheckpointError, save_checkpoint
from steps.nn.classifier import ClassifierConfig, ImageClassifier
from steps.nn.pixelcnn import PixelCNNConfig, PixelCNNPrior


def write_shards(root, artifacts, size: int = 32, splits=(("train", 80, 2), ("val", 20, 1))) -> dict[str, pa.Table]:
    """Pattern images with labels (every 7th null), written as image shards of ``files`` parts per split."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    tables, start, content = {}, 0, {}
    for split, count, _ in splits:
        ids = [f"img-{i:04d}" for i in range(start, start + count)]
        labels = [None if i % 7 == 0 else i % 10 for i in range(start, start + count)]
        images = []
        for i in range(start, start + count):
            f = 0.1 + 0.4 * rng.random()
            img = 127.5 * (1 + np.sin(f * xx + (i % 10) * yy * 0.3)) + rng.normal(0, 20, (size, size))
            images.append(encode_png(np.clip(img, 0, 255).astype(np.uint8)))
        content[split] = (ids, labels, images)
        tables[split] = pa.table({"id": ids, "label": pa.array(labels, pa.int32()), "image": images})
        start += count
    rows_per_file = max(-(-count // parts) for _, count, parts in splits)
    artifacts.shards(root, content, size, 1, num_classes=10, rows_per_file=rows_per_file)
    return tables


def expected_codes(model, table: pa.Table) -> dict[str, dict[str, np.ndarray]]:
    x = torch.from_numpy(decode_batch(table.column("image").to_pylist(), 1))
    with torch.inference_mode():
        codes = model.encode(x).codes
    return {i: {lv: c[k].numpy() for lv, c in zip(model.levels, codes, strict=True)} for k, i in enumerate(table["id"])}


def check_against_model(out, split, model, table, meta):
    got = pq.read_table(CodeDataset.open(str(out)).split_uri(split))
    assert got.num_rows == table.num_rows
    assert len(set(got.column("id").to_pylist())) == got.num_rows
    assert sorted(got.column("id").to_pylist()) == sorted(table.column("id").to_pylist())
    want = {str(k): v for k, v in expected_codes(model, table).items()}
    labels = dict(zip(table.column("id").to_pylist(), table.column("label").to_pylist(), strict=True))
    tensors = batch_to_tensors(got, meta)
    for k, row_id in enumerate(got.column("id").to_pylist()):
        for lv in model.levels:
            np.testing.assert_array_equal(tensors[lv][k].numpy(), want[row_id][lv], err_msg=f"{row_id} {lv}")
        assert got.column("label")[k].as_py() == labels[row_id]


def model_of(tiny, *overrides: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return registry.build(tiny(*tiny.SMALL, *overrides).train_vqvae.model).eval()


def test_encode_vqvae2_matches_model_encode(ray_local, tmp_path, tiny, artifacts, read_four_ways):
    tables = write_shards(tmp_path / "shard", artifacts)
    model = model_of(tiny)
    vq_dir = artifacts.autoencoder(tmp_path / "train_vqvae", model)
    out = tmp_path / "encode"
    (out / "split=train").mkdir(parents=True)
    (out / "split=train" / "stale.parquet").write_bytes(b"left by a crashed attempt")

    cfg = tiny.encode(batch_size=16)
    result = run(cfg, {"shard": str(tmp_path / "shard"), "train_vqvae": vq_dir}, str(out))

    digest = Autoencoder.open(vq_dir).digest
    assert result.metrics["rows_train"] == 80 and result.metrics["rows_val"] == 20
    assert result.metrics["images_per_s"] > 0
    assert result.info["vqvae"] == digest and result.info["shapes"] == {"top": [4, 4], "bottom": [8, 8]}
    assert result.artifacts == {
        "train": str(out / "split=train"),
        "val": str(out / "split=val"),
        "metadata": str(out / "_codes.json"),
    }
    assert not (out / "split=train" / "stale.parquet").exists()

    codes = CodeDataset.open(str(out))
    meta = codes.meta
    assert meta == CodeMeta(
        levels=("top", "bottom"),
        shapes={"top": (4, 4), "bottom": (8, 8)},
        codebook_size={"top": 32, "bottom": 32},
        vqvae=digest,
        image_size=32,
        num_classes=10,
    )
    doc = json.loads((out / "_codes.json").read_text())
    assert doc["rows"] == {"train": 80, "val": 20} and doc["top_shape"] == [4, 4] and doc["bottom_shape"] == [8, 8]
    assert codes.check_files() == {"train": 80, "val": 20}  # every file carries the metadata, not only _codes.json
    for f in codes.files("train"):
        assert read_code_meta(f) == meta
    names = [Path(f).name for f in codes.files("train")]  # one code file per image-shard file, of the same name
    assert names == [Path(f).name for f in ImageShards.open(str(tmp_path / "shard")).files("train")] and len(names) == 2
    schema = pq.read_schema(codes.files("val")[0])
    assert schema.field("top").type.list_size == 16 and schema.field("bottom").type.list_size == 64
    for split, table in tables.items():
        check_against_model(out, split, model, table, meta)
    check_readers(out, codes, read_four_ways)


def test_encode_resumes_per_finished_file(ray_local, tmp_path, tiny, artifacts, caplog):
    """An attempt killed mid-step leaves some code files: the rerun keeps the complete ones, redoes the rest."""
    tables = write_shards(tmp_path / "shard", artifacts, splits=(("train", 60, 3), ("val", 20, 1)))
    model = model_of(tiny)
    inputs = {"shard": str(tmp_path / "shard"), "train_vqvae": artifacts.autoencoder(tmp_path / "train_vqvae", model)}
    out = tmp_path / "encode"
    run(tiny.encode(batch_size=16), inputs, str(out))
    clean = {split: pq.read_table(CodeDataset.open(str(out)).split_uri(split)).sort_by("id") for split in tables}
    kept, torn, lost = sorted((out / "split=train").glob("*.parquet"))
    # What a killed attempt leaves: no record, a torn file, a missing file, a temporary file, the old layout.
    (out / "_codes.json").unlink()
    torn.write_bytes(torn.read_bytes()[:100])
    lost.unlink()
    (out / "split=train" / ".tmp-abc").write_bytes(b"half")
    (out / "train").mkdir()
    val = next((out / "split=val").glob("*.parquet"))
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in (kept, val)}
    with caplog.at_level(logging.INFO, logger="steps.encode"):
        result = run(tiny.encode(batch_size=16), inputs, str(out))
    assert "resuming: 2 of 4 files already encoded, 2 to go" in caplog.text
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in (kept, val)} == before, "finished files untouched"
    assert result.metrics["rows_train"] == 60 and result.metrics["rows_val"] == 20
    assert sorted(p.name for p in out.iterdir()) == ["_codes.json", "split=train", "split=val"]
    assert sorted(p.name for p in (out / "split=train").iterdir()) == sorted(p.name for p in (kept, torn, lost))
    codes = CodeDataset.open(str(out))
    for split, table in tables.items():
        check_against_model(out, split, model, table, codes.meta)
        resumed = pq.read_table(codes.split_uri(split)).sort_by("id")
        assert resumed.select(clean[split].column_names).equals(clean[split]), f"{split}: the clean encode's codes"


def check_readers(out, codes: CodeDataset, read_four_ways) -> None:
    """pyarrow.dataset, pandas, duckdb and Ray Data open the output folder as one dataset: the split a column from
    the hive folders, _codes.json and the pipeline's _SUCCESS skipped; the code metadata survives."""
    (out / records.SUCCESS).write_text("{}")  # as the pipeline publishes a finished output
    assert sorted(p.name for p in out.glob("_*")) == ["_SUCCESS", "_codes.json"]
    rows = codes.check_files()
    for reader, seen in read_four_ways(str(out)).items():
        assert seen == {"columns": ["id", "label", "top", "bottom", "split"], "rows": rows}, reader
    dataset = pads.dataset(out, format="parquet", partitioning="hive")
    assert schema_code_meta(dataset.schema) == codes.meta
    for split in SPLITS:
        ids = dataset.to_table(columns=["id"], filter=pads.field("split") == split).column("id").to_pylist()
        assert sorted(ids) == sorted(codes.ids(split).to_pylist())
        assert all("split" not in pq.read_schema(f).names for f in codes.files(split))
    table = pq.read_table(out)  # pyarrow.parquet (and so pandas): the split as a dictionary (categorical) column
    assert pa.types.is_dictionary(table.schema.field("split").type)
    assert schema_code_meta(table.schema) == codes.meta
    assert batch_to_tensors(table, codes.meta)["bottom"].shape == (sum(rows.values()), 8, 8)


def test_encode_one_level_vqvae_and_empty_split(ray_local, tmp_path, tiny, artifacts, read_four_ways):
    tables = write_shards(tmp_path / "shard", artifacts, splits=(("train", 40, 1),))  # no val files at all
    model = model_of(tiny, "model=vqvae", "model.downsample=4", seed=1)
    vq_dir = artifacts.autoencoder(tmp_path / "train_vqvae", model)
    out = tmp_path / "encode"
    result = run(tiny.encode(batch_size=64), {"shard": str(tmp_path / "shard"), "train_vqvae": vq_dir}, str(out))
    assert result.metrics["rows_train"] == 40 and result.metrics["rows_val"] == 0
    meta = read_code_meta(str(out))
    assert meta.levels == ("top",) and meta.shapes == {"top": (8, 8)}
    val = CodeDataset.open(str(out)).split_uri("val")
    assert pq.read_table(val).num_rows == 0
    assert pq.read_table(val).schema.names == ["id", "label", "top"]
    check_against_model(out, "train", model, tables["train"], meta)
    # The empty split's file gives every reader the schema; it adds no rows.
    (out / records.SUCCESS).write_text("{}")
    for reader, seen in read_four_ways(str(out)).items():
        assert seen == {"columns": ["id", "label", "top", "split"], "rows": {"train": 40}}, reader


def test_encode_input_errors(tmp_path, tiny, artifacts):
    """All raised before any Ray work: no ray fixture needed."""
    write_shards(tmp_path / "shard", artifacts, splits=(("train", 8, 1), ("val", 2, 1)))
    shard = str(tmp_path / "shard")
    out = str(tmp_path / "encode")
    cfg = tiny.encode()

    with pytest.raises(MissingInputError, match=r"\S*none/model\.pt does not exist: .* run train_vqvae first"):
        run(cfg, {"shard": shard, "train_vqvae": str(tmp_path / "none")}, out)
    with pytest.raises(MissingInputError, match="run the shard step first"):
        run(cfg, {"train_vqvae": str(tmp_path / "none")}, out)

    torch.manual_seed(0)
    vae = artifacts.autoencoder(
        tmp_path / "vae", registry.build(tiny("data.channels=1", "model=vae").train_vqvae.model)
    )
    with pytest.raises(ValueError, match="encode needs a VQ model; model=vae has no codes"):
        run(cfg, {"shard": shard, "train_vqvae": vae}, out)

    big = artifacts.autoencoder(tmp_path / "big", model_of(tiny, "data.image_size=64"))
    with pytest.raises(ValueError, match=r"image_size=32, but the VQ-VAE .*model\.pt expects image_size=64"):
        run(cfg, {"shard": shard, "train_vqvae": big}, out)
    rgb = artifacts.autoencoder(tmp_path / "rgb", registry.build(replace(model_of(tiny).config, in_channels=3)))
    with pytest.raises(ValueError, match=r"channels=1, but the VQ-VAE .* expects channels=3"):
        run(cfg, {"shard": shard, "train_vqvae": rgb}, out)
    assert not os.path.exists(out)  # nothing touched before the checks pass


@pytest.mark.parametrize(
    "make, message",
    [
        (
            lambda: PixelCNNPrior(PixelCNNConfig(num_codes=32, shape=(4, 4), channels=8, layers=1)),
            r"holds a 'pixelcnn' model, but an autoencoder \(train_vqvae's model\.pt: kind vqvae2 or vqvae or vae\)",
        ),
        (
            lambda: ImageClassifier(ClassifierConfig(in_channels=1, channels=8, stages=2)),
            r"holds a 'classifier' model, but an autoencoder \(train_vqvae's model\.pt",
        ),
        (None, r"is not a checkpoint of this project: torch\.load\(weights_only=True\) cannot read it"),
    ],
    ids=["prior", "classifier", "not-a-checkpoint"],
)
def test_encode_refuses_a_checkpoint_of_the_wrong_kind_before_any_work(tmp_path, monkeypatch, tiny, artifacts, make,
                                                                       message):  # fmt: skip
    """Where train_vqvae's model.pt is expected, another model's checkpoint: a clear error naming the file."""
    write_shards(tmp_path / "shard", artifacts, splits=(("train", 8, 1),))
    (tmp_path / "train_vqvae").mkdir()
    model_pt = tmp_path / "train_vqvae" / "model.pt"
    if make is None:
        model_pt.write_bytes(b"not a torch file")
    else:
        save_checkpoint(model_pt, make(), level="top", step=1)  # as train_prior / train_classifier save theirs
    out = tmp_path / "encode"

    def tripwire(*args, **kwargs):
        raise AssertionError("encode started Ray work before checking its checkpoint")

    monkeypatch.setattr(encode, "_encode", tripwire)
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(model_pt))}\b.*{message}"):
        run(tiny.encode(), {"shard": str(tmp_path / "shard"), "train_vqvae": str(tmp_path / "train_vqvae")}, str(out))
    assert not out.exists()
