"""The shard step's ``run()`` on local Ray: every source, the shard contract, bad files, deterministic splits."""

from __future__ import annotations

import gzip
import io
import json
import struct

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from steps.images import IMAGE_META_KEY, image_schema
from steps.shard import ShardConfig, read_manifest, run, shard_files


def encoded(img: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def read_split(out, split: str) -> pa.Table:
    files = shard_files(str(out), split)
    tables = [pq.read_table(f) for f in files]
    return pa.concat_tables(tables) if tables else image_schema(32, 1).empty_table()


def read_all(out) -> dict[str, dict]:
    rows = {}
    for split in ("train", "val"):
        for row in read_split(out, split).to_pylist():
            rows[row["id"]] = {**row, "split": split}
    return rows


def assert_image(data: bytes, size: int, channels: int) -> None:
    with Image.open(io.BytesIO(data)) as img:
        assert img.format == "PNG"
        assert img.size == (size, size)
        assert img.mode == ("L" if channels == 1 else "RGB")


# ------------------------------------------------------------------------------------------------ digits
@pytest.fixture(scope="module")
def digits_out(ray_local, tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    (out / "train").mkdir()
    (out / "train" / "part-00099.parquet").write_bytes(b"leftover of a crashed attempt")
    (out / "_SUCCESS").write_text("{}")
    (out / "notes.txt").write_text("not ours: kept")
    result = run(ShardConfig(limit=200, rows_per_shard=64), {}, str(out))
    return out, result


def test_digits_shards_follow_the_contract(digits_out):
    out, result = digits_out
    assert result.metrics["rows_train"] + result.metrics["rows_val"] == 200
    assert 5 <= result.metrics["rows_val"] <= 40  # val_fraction 0.1 of 200, by hash
    assert result.metrics["files_skipped"] == 0
    assert result.artifacts == {"train": f"{out}/train", "val": f"{out}/val", "manifest": f"{out}/manifest.json"}
    assert result.info["num_classes"] == 10
    expected = image_schema(32, 1, extra={"source": "digits"})
    for split in ("train", "val"):
        for f in shard_files(str(out), split):
            schema = pq.read_schema(f)
            assert schema.equals(expected, check_metadata=True)
            assert json.loads(schema.metadata[IMAGE_META_KEY]) == {"image_size": 32, "channels": 1, "source": "digits"}
    assert sorted(p.name for p in (out / "train").iterdir()) == [
        "part-00000.parquet",
        "part-00001.parquet",
        "part-00002.parquet",
    ]
    rows = read_all(out)
    assert sorted(rows) == [f"digits-{i:05d}" for i in range(200)]
    assert {r["label"] for r in rows.values()} == set(range(10))
    assert rows["digits-00000"]["label"] == 0 and rows["digits-00001"]["label"] == 1
    for row in list(rows.values())[:10]:
        assert_image(row["image"], 32, 1)
    assert not (out / "_SUCCESS").exists() and (out / "notes.txt").exists()
    manifest = read_manifest(str(out))
    assert manifest["rows"] == {"train": result.metrics["rows_train"], "val": result.metrics["rows_val"]}
    assert manifest["files"]["train"] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert (manifest["source"], manifest["image_size"], manifest["channels"]) == ("digits", 32, 1)
    assert (manifest["num_classes"], manifest["skipped_count"], manifest["skipped"]) == (10, 0, [])


def test_digits_split_is_deterministic_and_rgb_works(digits_out, tmp_path):
    out, _ = digits_out
    # Different channels and shard sizes: a different worker layout, the same ids in each split.
    again = run(ShardConfig(limit=200, channels=3, rows_per_shard=1000), {}, str(tmp_path))
    for split in ("train", "val"):
        assert read_split(out, split)["id"].to_pylist() == read_split(tmp_path, split)["id"].to_pylist()
    assert again.info["channels"] == 3
    schema = pq.read_schema(shard_files(str(tmp_path), "train")[0])
    assert schema.equals(image_schema(32, 3, extra={"source": "digits"}), check_metadata=True)
    assert_image(read_split(tmp_path, "val")["image"][0].as_py(), 32, 3)


def test_read_manifest_names_the_missing_step(tmp_path):
    with pytest.raises(FileNotFoundError, match="run the shard step"):
        read_manifest(str(tmp_path))


# ------------------------------------------------------------------------------------------------ image folder
@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "images"
    for d in ("cat", "dog", "élan"):
        (root / d).mkdir(parents=True)
    Image.new("RGBA", (40, 30), (255, 0, 0, 0)).save(root / "cat" / "rgba.png")
    Image.new("RGB", (24, 24), (0, 0, 255)).convert("P").save(root / "cat" / "palette.png")
    Image.fromarray(np.full((50, 70), 65535, np.uint16)).save(root / "cat" / "gray16.png")
    Image.new("CMYK", (64, 48), (0, 255, 255, 0)).save(root / "dog" / "cmyk.jpg")
    Image.new("L", (33, 77), 90).save(root / "dog" / "gray.JPG")
    Image.new("RGB", (300, 200), (0, 128, 0)).save(root / "élan" / "naïve 画像.webp")
    Image.new("RGB", (32, 32), (9, 9, 9)).save(root / "root.bmp")
    (root / "dog" / "empty.png").write_bytes(b"")
    jpeg = encoded(Image.effect_noise((64, 64), 40).convert("RGB"), "JPEG")
    (root / "cat" / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (root / "élan" / "notes.jpg").write_text("this is text, not a JPEG")
    (root / "README.txt").write_text("ignored: not an image extension")
    (root / "dog" / "loop").symlink_to(root, target_is_directory=True)
    return root


def test_image_folder_keeps_good_files_and_skips_bad(ray_local, folder, tmp_path):
    out = tmp_path / "out"
    result = run(ShardConfig(source="image_folder", path=str(folder), channels=3, val_fraction=0.3), {}, str(out))
    rows = read_all(out)
    labels = {k: v["label"] for k, v in rows.items()}
    assert labels == {
        "cat/gray16.png": 0,
        "cat/palette.png": 0,
        "cat/rgba.png": 0,
        "dog/cmyk.jpg": 1,
        "dog/gray.JPG": 1,
        "élan/naïve 画像.webp": 2,
        "root.bmp": None,
    }
    for row in rows.values():
        assert_image(row["image"], 32, 3)
    pixels = {k: np.asarray(Image.open(io.BytesIO(v["image"]))) for k, v in rows.items()}
    assert pixels["cat/rgba.png"].min() == 255  # transparent -> white
    assert pixels["cat/gray16.png"].min() == 255  # 16-bit full scale -> 255
    assert tuple(pixels["cat/palette.png"][16, 16]) == (0, 0, 255)
    assert tuple(pixels["élan/naïve 画像.webp"][16, 16])[1] > 100
    bad = {"dog/empty.png", "cat/truncated.jpg", "élan/notes.jpg"}
    assert result.metrics["files_skipped"] == 3
    skipped = read_manifest(str(out))["skipped"]
    assert {s["path"].removeprefix(str(folder) + "/") for s in skipped} == bad
    assert all(s["reason"] for s in skipped)
    manifest = read_manifest(str(out))
    assert manifest["classes"] == ["cat", "dog", "élan"] and manifest["num_classes"] == 3
    assert manifest["skipped_count"] == 3 and manifest["ignored_files"] == 1
    assert manifest["rows"]["train"] + manifest["rows"]["val"] == 7


def test_image_folder_fail_mode_raises_and_leaves_no_manifest(ray_local, folder, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"(empty\.png|truncated\.jpg|notes\.jpg).*on_bad_file=fail"):
        run(ShardConfig(source="image_folder", path=str(folder), on_bad_file="fail"), {}, str(out))
    assert not (out / "manifest.json").exists()


def test_empty_or_unreadable_folder_is_a_clear_error(ray_local, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="nothing to shard in"):
        run(ShardConfig(source="image_folder", path=str(tmp_path / "empty")), {}, str(tmp_path / "out"))
    (tmp_path / "empty" / "zero.png").write_bytes(b"")
    with pytest.raises(ValueError, match=r"nothing to shard in .*all 1 images were unreadable.*zero\.png"):
        run(ShardConfig(source="image_folder", path=str(tmp_path / "empty")), {}, str(tmp_path / "out"))
    assert not (tmp_path / "out" / "manifest.json").exists()


# ------------------------------------------------------------------------------------------------ parquet
def test_parquet_binary_and_hf_struct_columns(ray_local, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative paths: workers need not share the driver's working directory
    src = tmp_path / "src"
    src.mkdir()
    imgs = [encoded(Image.new("RGB", (20 + i, 30), (i * 20, 0, 0))) for i in range(6)]
    pq.write_table(pa.table({"image": imgs, "label": pa.array(range(6), pa.int64())}), src / "a.parquet")
    structs = [{"bytes": b, "path": f"x{i}.png"} for i, b in enumerate(imgs)]
    structs[2] = {"bytes": b"broken", "path": "x2.png"}
    pq.write_table(pa.table({"image": structs, "label": [7] * 6}), src / "b.parquet", row_group_size=4)
    result = run(ShardConfig(source="parquet", path="src", image_size=40), {}, "out")
    rows = read_all(tmp_path / "out")
    assert sorted(rows) == sorted([f"a-{i}" for i in range(6)] + [f"b-{i}" for i in range(6) if i != 2])
    assert rows["a-3"]["label"] == 3 and rows["b-5"]["label"] == 7
    assert_image(rows["b-4"]["image"], 40, 1)
    assert result.metrics["files_skipped"] == 1 and result.info["num_classes"] == 8
    assert result.info["skipped"][0]["path"].endswith("b.parquet#row=2")
    with pytest.raises(ValueError, match=r"a\.parquet.*no image column 'pixels'"):
        run(ShardConfig(source="parquet", path=str(src), image_column="pixels"), {}, str(tmp_path / "out2"))


# ------------------------------------------------------------------------------------------------ idx
def idx(magic: int, arr: np.ndarray) -> bytes:
    return struct.pack(">I", magic) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.astype(np.uint8).tobytes()


def test_idx_gzip_and_raw_files(ray_local, tmp_path):
    rng = np.random.default_rng(0)
    src = tmp_path / "mnist"
    src.mkdir()
    (src / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx(2051, rng.integers(0, 256, (12, 28, 28)))))
    (src / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx(2049, np.arange(12) % 10)))
    (src / "t10k-images-idx3-ubyte").write_bytes(idx(2051, rng.integers(0, 256, (5, 28, 28))))
    (src / "t10k-labels-idx1-ubyte").write_bytes(idx(2049, np.full(5, 9)))
    result = run(ShardConfig(source="idx", path=str(src), channels=3), {}, str(tmp_path / "out"))
    rows = read_all(tmp_path / "out")
    assert sorted(rows) == [f"t10k-{i:05d}" for i in range(5)] + [f"train-{i:05d}" for i in range(12)]
    assert rows["train-00011"]["label"] == 1 and rows["t10k-00004"]["label"] == 9
    assert_image(rows["train-00000"]["image"], 32, 3)
    assert result.info["num_classes"] == 10
    (src / "t10k-images-idx3-ubyte").write_bytes(idx(2049, np.zeros(3)))
    with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte.*magic number 2049"):
        run(ShardConfig(source="idx", path=str(src)), {}, str(tmp_path / "out"))
