"""The shard step's ``run()`` on local Ray: every source, the shard contract, bad files, deterministic splits."""

from __future__ import annotations

import gzip
import io
import json
import os
import re
import shutil
import socket
import struct

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from PIL import Image

from steps.artifacts import records
from steps.artifacts.images import IMAGE_META_KEY, SPLITS, ImageShards, image_meta, image_schema
from steps.core.step import MissingInputError
from steps.shard import run


def shard_files(out: str, split: str) -> list[str]:
    return ImageShards.open(out).files(split)


def read_manifest(out: str) -> dict:
    return ImageShards.open(out).manifest


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
def digits_out(ray_local, tmp_path_factory, tiny):
    out = tmp_path_factory.mktemp("digits")
    (out / "split=train").mkdir()
    (out / "split=train" / "part-00099.parquet").write_bytes(b"leftover of a crashed attempt")
    (out / "train").mkdir()  # the layout before hive split folders: cleared too
    (out / "train" / "part-00000.parquet").write_bytes(b"an older layout's shard")
    (out / "manifest.json").write_text("{}")
    (out / "_SUCCESS").write_text("{}")
    (out / "notes.txt").write_text("not ours: kept")
    result = run(tiny.shard(limit=200, rows_per_shard=64, val_fraction=0.1), {}, str(out))
    return out, result


def test_digits_shards_follow_the_contract(digits_out):
    out, result = digits_out
    assert result.metrics["rows_train"] + result.metrics["rows_val"] == 200
    assert 5 <= result.metrics["rows_val"] <= 40  # val_fraction 0.1 of 200, by hash
    assert result.metrics["files_skipped"] == 0
    assert result.artifacts == {
        "train": f"{out}/split=train",
        "val": f"{out}/split=val",
        "manifest": f"{out}/_manifest.json",
    }
    assert result.info["num_classes"] == 10
    expected = image_schema(32, 1, extra={"source": "digits"})
    for split in ("train", "val"):
        for f in shard_files(str(out), split):
            schema = pq.read_schema(f)
            assert schema.equals(expected, check_metadata=True)
            assert json.loads(schema.metadata[IMAGE_META_KEY]) == {"image_size": 32, "channels": 1, "source": "digits"}
    assert sorted(p.name for p in (out / "split=train").iterdir()) == [
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
    assert not (out / "train").exists() and not (out / "manifest.json").exists()
    manifest = read_manifest(str(out))
    assert manifest["rows"] == {"train": result.metrics["rows_train"], "val": result.metrics["rows_val"]}
    assert manifest["files"]["train"] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert (manifest["source"], manifest["image_size"], manifest["channels"]) == ("digits", 32, 1)
    assert (manifest["num_classes"], manifest["skipped_count"], manifest["skipped"]) == (10, 0, [])


def test_digits_split_is_deterministic_and_rgb_works(digits_out, tmp_path, tiny):
    out, _ = digits_out
    # Different channels and shard sizes: a different worker layout, the same ids in each split.
    again = run(tiny.shard(limit=200, channels=3, rows_per_shard=1000, val_fraction=0.1), {}, str(tmp_path))
    for split in ("train", "val"):
        assert read_split(out, split)["id"].to_pylist() == read_split(tmp_path, split)["id"].to_pylist()
    assert again.info["channels"] == 3
    schema = pq.read_schema(shard_files(str(tmp_path), "train")[0])
    assert schema.equals(image_schema(32, 3, extra={"source": "digits"}), check_metadata=True)
    assert_image(read_split(tmp_path, "val")["image"][0].as_py(), 32, 3)


def test_shards_open_as_one_dataset_in_every_reader(digit_shards, read_four_ways, tmp_path):
    """pyarrow.dataset, pandas, duckdb and Ray Data open the output folder as one dataset: the split a column from the
    hive folders, the manifest and the pipeline's _SUCCESS skipped, no file holding a split column of its own."""
    out = tmp_path / "shard"
    shutil.copytree(digit_shards, out)
    (out / records.SUCCESS).write_text("{}")  # as the pipeline publishes a finished output
    shards = ImageShards.open(str(out))
    rows = {s: shards.rows(s) for s in SPLITS}
    assert min(rows.values()) > 0 and sorted(p.name for p in out.glob("_*")) == ["_SUCCESS", "_manifest.json"]
    for reader, seen in read_four_ways(str(out)).items():
        assert seen == {"columns": ["id", "label", "image", "split"], "rows": rows}, reader

    dataset = pads.dataset(out, format="parquet", partitioning="hive")
    assert image_meta(dataset.schema) == {"image_size": 32, "channels": 1, "source": "digits"}
    for split in SPLITS:
        ids = dataset.to_table(columns=["id"], filter=pads.field("split") == split).column("id")
        assert ids.to_pylist() == shards.ids(split).to_pylist()
        assert all("split" not in pq.read_schema(f).names for f in shards.files(split))
    table = pq.read_table(out)  # pyarrow.parquet (and so pandas): the split as a dictionary (categorical) column
    assert pa.types.is_dictionary(table.schema.field("split").type) and IMAGE_META_KEY in table.schema.metadata
    assert shards.read_images("val").shape == (rows["val"], 1, 32, 32)


def test_opening_missing_shards_names_the_step_to_run(tmp_path):
    with pytest.raises(MissingInputError, match="run the shard step"):
        ImageShards.open(str(tmp_path))


# ------------------------------------------------------------------------------------------------ image folder
def halves(mode: str, left, right, size=(40, 40)) -> Image.Image:
    img = Image.new(mode, size, left)
    img.paste(right, (size[0] // 2, 0, *size))
    return img


# Every file the folder fixture writes that must be skipped, with what its reason must say.
BAD = {
    "dog/empty.png": r"empty file \(0 bytes\)",
    "cat/truncated.jpg": r"truncated JPEG file",
    "cat/truncated.png": r"truncated PNG file",
    "dog/bomb.png": r"decompression bomb: the header claims 400000000 pixels, over the limit of \d+; not decoded",
    "dog/gone.png": r"^a broken symbolic link$",
    "cat/loop.png": r"^a symbolic link loop$",
    "dog/pipe.png": r"^a FIFO \(named pipe\), not a regular file$",  # opening it to read would wait for a writer
    "cat/sock.png": r"^a socket, not a regular file$",
    "dog/zero.png": r"^a character device, not a regular file$",  # a link to /dev/zero: it never ends
    "dog/huge.png": r"^ValueError: 2097152 bytes, larger than the limit of 1048576 \(data\.max_file_mb\)$",
    "élan/notes.jpg": r"not an image",
    "élan/d\\xe9j\\xe0.gif": r"not an image",  # a Latin-1 file name: its bytes are not UTF-8
}


@pytest.fixture
def folder(tmp_path, png_claiming):
    """Unusual-but-valid images (kept, converted) and broken files (skipped) in class folders."""
    root = tmp_path / "images"
    for d in ("cat", "dog", "élan"):
        (root / d).mkdir(parents=True)
    Image.new("RGBA", (40, 30), (255, 0, 0, 0)).save(root / "cat" / "rgba.png")
    Image.new("RGB", (24, 24), (0, 0, 255)).convert("P").save(root / "cat" / "palette.png")
    palette = halves("P", 0, 1)
    palette.putpalette([255, 0, 0, 0, 0, 255])
    palette.save(root / "cat" / "palette_alpha.png", transparency=1)  # right half: transparent entry
    halves("LA", (0, 0), (100, 255)).save(root / "cat" / "la.png")  # left half transparent
    halves("1", 0, 1).save(root / "cat" / "bilevel.png")
    Image.fromarray(np.full((50, 70), 65535, np.uint16)).save(root / "cat" / "gray16.png")
    Image.fromarray(np.full((30, 30), 32896, np.int32)).save(root / "cat" / "int32.tif")  # mode "I"
    Image.fromarray(np.full((30, 30), 0.25, np.float32)).save(root / "cat" / "float.tiff")  # mode "F"
    Image.new("LAB", (32, 32), (128, 128, 128)).save(root / "cat" / "lab.tif")  # CIELab TIFF: mid grey
    Image.new("CMYK", (64, 48), (0, 255, 255, 0)).save(root / "dog" / "cmyk.jpg")
    Image.new("L", (33, 77), 90).save(root / "dog" / "gray.JPG")
    Image.new("RGB", (36, 36), (200, 100, 0)).save(root / "dog" / "ünïcødé 猫.png")  # non-ASCII name, ASCII folder
    Image.new("RGB", (300, 200), (0, 128, 0)).save(root / "élan" / "naïve 画像.webp")
    Image.new("RGB", (32, 32), (9, 9, 9)).save(root / "root.bmp")
    (root / "dog" / "empty.png").write_bytes(b"")
    noise = Image.effect_noise((64, 64), 40).convert("RGB")
    jpeg, png = encoded(noise, "JPEG"), encoded(noise)
    (root / "cat" / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (root / "cat" / "truncated.png").write_bytes(png[: len(png) // 2])  # cut in the middle of its pixel data
    (root / "dog" / "bomb.png").write_bytes(png_claiming(20000, 20000))
    (root / "dog" / "gone.png").symlink_to(root / "dog" / "deleted.png")  # dangling
    (root / "élan" / "notes.jpg").write_text("this is text, not a JPEG")
    with open(os.path.join(os.fsencode(root), "élan".encode(), b"d\xe9j\xe0.gif"), "wb") as f:
        f.write(b"GIF? no: plain text")
    (root / "README.txt").write_text("ignored: not an image extension")
    # Entries that are not regular files: listed by name with what they are, never opened.
    (root / "cat" / "loop.png").symlink_to(root / "cat" / "loop.png")
    os.mkfifo(root / "dog" / "pipe.png")
    os.mkfifo(root / "cat" / "pipe.txt")  # not an image name: ignored like README.txt
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(root / "cat" / "sock.png"))
    server.close()  # the socket file stays
    (root / "dog" / "zero.png").symlink_to("/dev/zero")
    (root / "dog" / "huge.png").write_bytes(b"\0" * (2 << 20))  # over data.max_file_mb=1: never read
    (root / "dog" / "loop").symlink_to(root, target_is_directory=True)
    return root


def files_under(out) -> list[str]:
    """Every file under ``out``, hidden ones included, as sorted posix paths relative to it."""
    return sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if not p.is_dir())


def test_image_folder_keeps_good_files_and_skips_bad(ray_local, folder, tmp_path, tiny):
    out = tmp_path / "out"
    (out / "split=train").mkdir(parents=True)
    (out / "split=train" / ".tmp-crashed.part").write_bytes(b"half a shard of an earlier attempt")
    cfg = tiny.shard(
        source="image_folder",
        path=str(folder),
        channels=3,
        val_fraction=0.3,
        rows_per_shard=6,
        limit=None,
        max_file_mb=1,
    )
    result = run(cfg, {}, str(out))
    rows = read_all(out)
    labels = {k: v["label"] for k, v in rows.items()}
    assert labels == {
        "cat/bilevel.png": 0,
        "cat/float.tiff": 0,
        "cat/gray16.png": 0,
        "cat/int32.tif": 0,
        "cat/la.png": 0,
        "cat/lab.tif": 0,
        "cat/palette.png": 0,
        "cat/palette_alpha.png": 0,
        "cat/rgba.png": 0,
        "dog/cmyk.jpg": 1,
        "dog/gray.JPG": 1,
        "dog/ünïcødé 猫.png": 1,
        "élan/naïve 画像.webp": 2,
        "root.bmp": None,
    }
    for row in rows.values():
        assert_image(row["image"], 32, 3)
    pixels = {k: np.asarray(Image.open(io.BytesIO(v["image"])), int) for k, v in rows.items()}

    def near(name: str, x: int, rgb) -> bool:
        return np.abs(pixels[name][16, x] - rgb).max() <= 3

    assert pixels["cat/rgba.png"].min() == 255  # transparent -> white
    assert pixels["cat/gray16.png"].min() == 255  # 16-bit full scale -> 255
    assert near("cat/palette.png", 16, (0, 0, 255))
    assert near("cat/palette_alpha.png", 4, (255, 0, 0)) and near("cat/palette_alpha.png", 28, (255, 255, 255))
    assert near("cat/la.png", 4, (255, 255, 255)) and near("cat/la.png", 28, (100, 100, 100))
    assert near("cat/bilevel.png", 4, (0, 0, 0)) and near("cat/bilevel.png", 28, (255, 255, 255))
    assert near("cat/int32.tif", 16, (128, 128, 128))  # "I" holding 16-bit values: 32896 / 65535
    assert near("cat/float.tiff", 16, (64, 64, 64))  # "F" in [0, 1]
    assert near("cat/lab.tif", 16, (119, 119, 119))  # L* = 50 through the colour-management transform
    assert near("dog/ünïcødé 猫.png", 16, (200, 100, 0))
    assert tuple(pixels["élan/naïve 画像.webp"][16, 16])[1] > 100

    # Every bad file is skipped, named by its path, with a reason that says what is wrong with it.
    manifest = read_manifest(str(out))
    skipped = {s["path"].removeprefix(str(folder) + "/"): s["reason"] for s in manifest["skipped"]}
    assert sorted(skipped) == sorted(BAD)
    for name, reason in BAD.items():
        assert re.search(reason, skipped[name]), (name, skipped[name])
    assert result.metrics["files_skipped"] == manifest["skipped_count"] == len(BAD)
    assert {s["path"] for s in result.info["skipped"]} == {s["path"] for s in manifest["skipped"]}
    (out / "_manifest.json").read_bytes().decode("utf-8")  # strict UTF-8: what MLflow stores as the artifact
    assert manifest["classes"] == ["cat", "dog", "élan"] and manifest["num_classes"] == 3
    assert manifest["ignored_files"] == 2
    assert manifest["rows"]["train"] + manifest["rows"]["val"] == len(rows) == 14
    # Only finished shards and the manifest: no temporary or half-written file, the crashed attempt's included.
    listed = [f"split={s}/{name}" for s in ("train", "val") for name in manifest["files"][s]]
    assert files_under(out) == sorted([*listed, "_manifest.json"])
    assert all(re.fullmatch(r"split=(train|val)/part-\d{5}\.parquet", f) for f in listed)


def test_image_folder_fail_mode_raises_and_leaves_nothing(ray_local, folder, tmp_path, tiny):
    out = tmp_path / "out"
    bad = "|".join(re.escape(f"{folder}/{name}") for name in BAD)
    with pytest.raises(ValueError, match=rf"^bad image ({bad}): .+ \(shard\.on_bad_file=fail\)$"):
        run(
            tiny.shard(
                source="image_folder",
                path=str(folder),
                on_bad_file="fail",
                max_file_mb=1,
                rows_per_shard=4,
                limit=None,
                val_fraction=0.1,
            ),
            {},
            str(out),
        )
    assert files_under(out) == []  # shards other work units finished are removed too; no manifest


def test_empty_or_unreadable_folder_is_a_clear_error(ray_local, tmp_path, tiny):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no image here")
    with pytest.raises(ValueError, match=rf"nothing to shard in {re.escape(str(empty))}: no image files"):
        run(
            tiny.shard(source="image_folder", path=str(empty), limit=None, val_fraction=0.1, rows_per_shard=1024),
            {},
            str(tmp_path / "out"),
        )
    assert not (tmp_path / "out").exists()  # refused before any work
    (empty / "zero.png").write_bytes(b"")
    zero = re.escape(str(empty / "zero.png"))
    with pytest.raises(ValueError, match=rf"nothing to shard in .*all 1 images were unreadable.*{zero}: .*empty file"):
        run(
            tiny.shard(source="image_folder", path=str(empty), limit=None, val_fraction=0.1, rows_per_shard=1024),
            {},
            str(tmp_path / "out"),
        )
    assert files_under(tmp_path / "out") == []


# ------------------------------------------------------------------------------------------------ parquet
def test_parquet_binary_and_hf_struct_columns(ray_local, tmp_path, monkeypatch, tiny):
    monkeypatch.chdir(tmp_path)  # relative paths: workers need not share the driver's working directory
    src = tmp_path / "src"
    src.mkdir()
    imgs = [encoded(Image.new("RGB", (20 + i, 30), (i * 20, 0, 0))) for i in range(6)]
    pq.write_table(pa.table({"image": imgs, "label": pa.array(range(6), pa.int64())}), src / "a.parquet")
    structs = [{"bytes": b, "path": f"x{i}.png"} for i, b in enumerate(imgs)]
    structs[2] = {"bytes": b"broken", "path": "x2.png"}
    pq.write_table(pa.table({"image": structs, "label": [7] * 6}), src / "b.parquet", row_group_size=4)
    result = run(
        tiny.shard(source="parquet", path="src", image_size=40, limit=None, val_fraction=0.1, rows_per_shard=1024),
        {},
        "out",
    )
    rows = read_all(tmp_path / "out")
    assert sorted(rows) == sorted([f"a-{i}" for i in range(6)] + [f"b-{i}" for i in range(6) if i != 2])
    assert rows["a-3"]["label"] == 3 and rows["b-5"]["label"] == 7
    assert_image(rows["b-4"]["image"], 40, 1)
    assert result.metrics["files_skipped"] == 1 and result.info["num_classes"] == 8
    assert result.info["skipped"][0]["path"].endswith("b.parquet#row=2")
    with pytest.raises(ValueError, match=rf"{re.escape(str(src / 'a.parquet'))}: no image column 'pixels'"):
        run(
            tiny.shard(
                source="parquet",
                path=str(src),
                image_column="pixels",
                limit=None,
                val_fraction=0.1,
                rows_per_shard=1024,
            ),
            {},
            str(tmp_path / "out2"),
        )
    assert not (tmp_path / "out2").exists()  # refused while listing, before any work


# ------------------------------------------------------------------------------------------------ idx
def idx(magic: int, arr: np.ndarray) -> bytes:
    return struct.pack(">I", magic) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.astype(np.uint8).tobytes()


def test_idx_gzip_and_raw_files(ray_local, tmp_path, tiny):
    rng = np.random.default_rng(0)
    src = tmp_path / "mnist"
    src.mkdir()
    (src / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx(2051, rng.integers(0, 256, (12, 28, 28)))))
    (src / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx(2049, np.arange(12) % 10)))
    (src / "t10k-images-idx3-ubyte").write_bytes(idx(2051, rng.integers(0, 256, (5, 28, 28))))
    (src / "t10k-labels-idx1-ubyte").write_bytes(idx(2049, np.full(5, 9)))
    result = run(
        tiny.shard(source="idx", path=str(src), channels=3, limit=None, val_fraction=0.1, rows_per_shard=1024),
        {},
        str(tmp_path / "out"),
    )
    rows = read_all(tmp_path / "out")
    assert sorted(rows) == [f"t10k-{i:05d}" for i in range(5)] + [f"train-{i:05d}" for i in range(12)]
    assert rows["train-00011"]["label"] == 1 and rows["t10k-00004"]["label"] == 9
    assert_image(rows["train-00000"]["image"], 32, 3)
    assert result.info["num_classes"] == 10
    (src / "t10k-images-idx3-ubyte").write_bytes(idx(2049, np.zeros(3)))
    images_file = re.escape(str(src / "t10k-images-idx3-ubyte"))
    with pytest.raises(ValueError, match=rf"{images_file}: magic number 2049 is not an idx images file"):
        run(
            tiny.shard(source="idx", path=str(src), limit=None, val_fraction=0.1, rows_per_shard=1024),
            {},
            str(tmp_path / "out2"),
        )
    (src / "t10k-images-idx3-ubyte").write_bytes(idx(1234, np.zeros((3, 4, 4))))
    with pytest.raises(ValueError, match=rf"{images_file}: not an idx file: magic number 1234"):
        run(
            tiny.shard(source="idx", path=str(src), limit=None, val_fraction=0.1, rows_per_shard=1024),
            {},
            str(tmp_path / "out2"),
        )
    assert not (tmp_path / "out2").exists()
