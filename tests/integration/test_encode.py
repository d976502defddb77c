"""The encode step on local Ray: one code row per image, equal to in-process model.encode, and clear input errors."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from steps import encode
from steps.codes import CodeMeta, batch_to_tensors, model_digest, read_code_meta
from steps.common import MissingInputError
from steps.encode import EncodeConfig, run
from steps.images import decode_batch, encode_png, image_schema
from steps.nn.checkpoint import CheckpointError, save_checkpoint
from steps.nn.classifier import ClassifierConfig, ImageClassifier
from steps.nn.prior import PixelCNNPrior, PriorConfig
from steps.nn.vae import VAE, VAEConfig
from steps.nn.vqvae import VQVAE, VQVAE2, VQVAE2Config, VQVAEConfig

TINY = dict(image_size=32, in_channels=1, channels=16, res_channels=8, res_blocks=1, codebook_size=32, embed_dim=8)


def write_shards(root, n: int = 100, size: int = 32, splits=(("train", 80, 2), ("val", 20, 1))) -> dict[str, pa.Table]:
    """Pattern images with labels (every 7th null), split into Parquet files of the image-shard contract."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    schema = image_schema(size, 1)
    tables, start = {}, 0
    for split, count, files in splits:
        ids = [f"img-{i:04d}" for i in range(start, start + count)]
        labels = [None if i % 7 == 0 else i % 10 for i in range(start, start + count)]
        images = []
        for i in range(start, start + count):
            f = 0.1 + 0.4 * rng.random()
            img = 127.5 * (1 + np.sin(f * xx + (i % 10) * yy * 0.3)) + rng.normal(0, 20, (size, size))
            images.append(encode_png(np.clip(img, 0, 255).astype(np.uint8)))
        table = pa.Table.from_pydict({"id": ids, "label": labels, "image": images}, schema=schema)
        os.makedirs(root / split, exist_ok=True)
        for j, part in enumerate(np.array_split(np.arange(count), files)):
            pq.write_table(table.take(part), root / split / f"part-{j}.parquet")
        tables[split], start = table, start + count
    return tables


def save_model(root, model) -> str:
    os.makedirs(root, exist_ok=True)
    torch.manual_seed(0)
    save_checkpoint(root / "model.pt", model)
    return str(root)


def expected_codes(model, table: pa.Table) -> dict[str, dict[str, np.ndarray]]:
    x = torch.from_numpy(decode_batch(table.column("image").to_pylist(), 1))
    with torch.inference_mode():
        codes = model.encode(x).codes
    return {i: {lv: c[k].numpy() for lv, c in zip(model.levels, codes, strict=True)} for k, i in enumerate(table["id"])}


def check_against_model(out, split, model, table, meta):
    got = pq.read_table(os.path.join(out, split))
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


def test_encode_vqvae2_matches_model_encode(ray_local, tmp_path):
    tables = write_shards(tmp_path / "shard")
    torch.manual_seed(0)
    model = VQVAE2(VQVAE2Config(**TINY)).eval()
    vq_dir = save_model(tmp_path / "train_vqvae", model)
    out = tmp_path / "encode"
    (out / "train").mkdir(parents=True)
    (out / "train" / "stale.parquet").write_bytes(b"left by a crashed attempt")

    cfg = EncodeConfig(batch_size=16, rows_per_file=30)
    result = run(cfg, {"shard": str(tmp_path / "shard"), "train_vqvae": vq_dir}, str(out))

    digest = model_digest((tmp_path / "train_vqvae" / "model.pt").read_bytes())
    assert result.metrics["rows_train"] == 80 and result.metrics["rows_val"] == 20
    assert result.metrics["images_per_s"] > 0
    assert result.info["vqvae"] == digest and result.info["shapes"] == {"top": [4, 4], "bottom": [8, 8]}
    assert result.artifacts == {
        "train": str(out / "train"),
        "val": str(out / "val"),
        "metadata": str(out / "codes.json"),
    }
    assert not (out / "train" / "stale.parquet").exists()

    meta = read_code_meta(str(out))
    assert meta == CodeMeta(
        levels=("top", "bottom"),
        shapes={"top": (4, 4), "bottom": (8, 8)},
        codebook_size={"top": 32, "bottom": 32},
        vqvae=digest,
        image_size=32,
        num_classes=10,
    )
    doc = json.loads((out / "codes.json").read_text())
    assert doc["rows"] == {"train": 80, "val": 20} and doc["top_shape"] == [4, 4] and doc["bottom_shape"] == [8, 8]
    for f in (out / "train").iterdir():  # every file carries the metadata, not only codes.json
        assert read_code_meta(str(f)) == meta
    assert len(list((out / "train").iterdir())) >= 2  # rows_per_file=30 < 80 rows
    schema = pq.read_schema(next((out / "val").iterdir()))
    assert schema.field("top").type.list_size == 16 and schema.field("bottom").type.list_size == 64
    for split, table in tables.items():
        check_against_model(out, split, model, table, meta)


def test_encode_one_level_vqvae_and_empty_split(ray_local, tmp_path):
    tables = write_shards(tmp_path / "shard", splits=(("train", 40, 1),))  # no val files at all
    torch.manual_seed(1)
    model = VQVAE(VQVAEConfig(**TINY, downsample=4)).eval()
    vq_dir = save_model(tmp_path / "train_vqvae", model)
    out = tmp_path / "encode"
    result = run(EncodeConfig(batch_size=64), {"shard": str(tmp_path / "shard"), "train_vqvae": vq_dir}, str(out))
    assert result.metrics["rows_train"] == 40 and result.metrics["rows_val"] == 0
    meta = read_code_meta(str(out))
    assert meta.levels == ("top",) and meta.shapes == {"top": (8, 8)}
    assert pq.read_table(out / "val").num_rows == 0
    assert pq.read_table(out / "val").schema.names == ["id", "label", "top"]
    check_against_model(out, "train", model, tables["train"], meta)


def test_encode_input_errors(tmp_path):
    """All raised before any Ray work: no ray fixture needed."""
    write_shards(tmp_path / "shard", n=10, splits=(("train", 8, 1), ("val", 2, 1)))
    shard = str(tmp_path / "shard")
    out = str(tmp_path / "encode")

    with pytest.raises(MissingInputError, match=r"checkpoint \S*none/model\.pt, which does not exist; run train_vqvae"):
        run(EncodeConfig(), {"shard": shard, "train_vqvae": str(tmp_path / "none")}, out)
    with pytest.raises(MissingInputError, match="run the shard step first"):
        run(EncodeConfig(), {"train_vqvae": str(tmp_path / "none")}, out)

    vae = save_model(tmp_path / "vae", VAE(VAEConfig(in_channels=1, channels=16, res_channels=8, latent_channels=4)))
    with pytest.raises(ValueError, match="encode needs a VQ model; model=vae has no codes"):
        run(EncodeConfig(), {"shard": shard, "train_vqvae": vae}, out)

    big = save_model(tmp_path / "big", VQVAE2(VQVAE2Config(**{**TINY, "image_size": 64})))
    with pytest.raises(ValueError, match=r"image_size=32, but the VQ-VAE .*model\.pt expects image_size=64"):
        run(EncodeConfig(), {"shard": shard, "train_vqvae": big}, out)
    rgb = save_model(tmp_path / "rgb", VQVAE2(VQVAE2Config(**{**TINY, "in_channels": 3})))
    with pytest.raises(ValueError, match=r"channels=1, but the VQ-VAE .* expects channels=3"):
        run(EncodeConfig(), {"shard": shard, "train_vqvae": rgb}, out)
    assert not os.path.exists(out)  # nothing touched before the checks pass


@pytest.mark.parametrize(
    "make, message",
    [
        (
            lambda: PixelCNNPrior(PriorConfig(num_codes=32, shape=(4, 4), channels=8, layers=1)),
            r"holds a 'prior' checkpoint, but encode needs a VQ-VAE: .*kind 'vqvae2' or 'vqvae'",
        ),
        (
            lambda: ImageClassifier(ClassifierConfig(in_channels=1, channels=8, stages=2)),
            r"holds a 'classifier' checkpoint, but encode needs a VQ-VAE: .*kind 'vqvae2' or 'vqvae'",
        ),
        (None, r"is not a checkpoint encode can use: torch\.load\(weights_only=True\) cannot read it"),
    ],
    ids=["prior", "classifier", "not-a-checkpoint"],
)
def test_encode_refuses_a_checkpoint_of_the_wrong_kind_before_any_work(tmp_path, monkeypatch, make, message):
    """Where train_vqvae's model.pt is expected, another model's checkpoint: a clear error naming the file."""
    write_shards(tmp_path / "shard", n=10, splits=(("train", 8, 1),))
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
    monkeypatch.setattr(encode, "_check_shards", tripwire)
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(model_pt))}\b.*{message}"):
        run(EncodeConfig(), {"shard": str(tmp_path / "shard"), "train_vqvae": str(tmp_path / "train_vqvae")}, str(out))
    assert not out.exists()


@pytest.mark.parametrize(
    "kw, field",
    [({"batch_size": 0}, "batch_size"), ({"num_actors": 1.5}, "num_actors"), ({"cpus_per_actor": 0}, "cpus_per_actor")],
)
def test_encode_config_validation(kw, field):
    with pytest.raises(ValueError, match=f"encode.{field}"):
        EncodeConfig(**kw)
