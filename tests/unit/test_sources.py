"""The shard step's pure-Python parts: the source registry, config validation, split hash, image conversion, source
listing and loading."""

from __future__ import annotations

import gzip
import io
import os
import re
import struct

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from steps.io import pixels, sources
from steps.io.sources import common, idx, image_folder, parquet
from steps.nn.config import FieldError
from steps.shard import ShardConfig, _list, _shard_unit


def png_bytes(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def idx_bytes(magic: int, arr: np.ndarray) -> bytes:
    return struct.pack(">I", magic) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.astype(np.uint8).tobytes()


# ------------------------------------------------------------------------------------------------ registry
class Squares(sources.Source):
    """A toy source without a path: ``limit`` (default 3) flat grey images, ids ``sq-<n>``, labelled n % 2."""

    needs_path = False

    def list(self, cfg):
        items = [{"id": f"sq-{i}", "label": i % 2, "ref": 10 * i} for i in range(cfg.limit or 3)]
        return sources.Listing(items, classes=["even", "odd"])

    def load_one(self, ref, cfg, prefetched):
        if ref == 20:
            raise OSError("no third square")
        return np.full((cfg.image_size, cfg.image_size), ref, np.uint8)


@pytest.fixture
def squares(monkeypatch):
    """The toy source entered into the registry for one test: one table entry, as a real source is added."""
    monkeypatch.setitem(sources.SOURCES, "squares", f"{Squares.__module__}:Squares")


def test_every_registered_source_loads_by_name():
    assert {"digits", "image_folder", "parquet", "idx"} <= set(sources.names())
    for name in sources.names():
        source = sources.get(name)
        assert isinstance(source, sources.Source) and source.name == name
    assert not sources.get("digits").needs_path  # bundled; the others read the user's files
    assert all(sources.get(name).needs_path for name in ("image_folder", "parquet", "idx"))


def test_a_new_source_plugs_in_with_one_registry_entry(squares, tmp_path):
    assert sources.names()[-1] == "squares"
    cfg = ShardConfig(source="squares", limit=3)  # validation asks the registry: the name is known, no path needed
    listing = _list(cfg)
    assert [(i["id"], i["label"]) for i in listing.items] == [("sq-0", 0), ("sq-1", 1), ("sq-2", 0)]
    assert listing.classes == ["even", "odd"]
    # One work unit of the shard step, as a Ray worker runs it: the bad item is skipped, named by its id.
    result = _shard_unit("train", 0, listing.items, cfg, str(tmp_path))
    assert result == {
        "rows": 2,
        "file": "part-00000.parquet",
        "skipped": [{"path": "sq-2", "reason": "OSError: no third square"}],
        "failed": False,
    }
    table = pq.read_table(tmp_path / "split=train" / "part-00000.parquet")
    assert table.column("id").to_pylist() == ["sq-0", "sq-1"] and table.column("label").to_pylist() == [0, 1]
    assert pixels.decode_png(table.column("image")[1].as_py(), 1)[0, 0, 0] == 10
    with pytest.raises(FieldError, match=r"ShardConfig\.path must be unset for source=squares, got '/data'"):
        ShardConfig(source="squares", path="/data")


def test_whether_a_path_is_needed_is_the_sources_own():
    with pytest.raises(FieldError, match=r"path must be unset for source=digits \(the digits are bundled; did you"):
        ShardConfig(source="digits", path="/data")
    with pytest.raises(FieldError, match=r"ShardConfig\.path must be set for source=idx, got None"):
        ShardConfig(source="idx")
    ShardConfig(source="idx", path="/data")


def test_an_unknown_source_is_a_clear_error_naming_the_known_ones():
    known = re.escape(str(list(sources.names())))  # every registered source, however many there are
    with pytest.raises(sources.UnknownSourceError, match=rf"^unknown data source 'webdataset'; known: {known}"):
        sources.get("webdataset")
    with pytest.raises(FieldError, match=rf"source must be one of {', '.join(sources.names())}, got 'webdataset'"):
        ShardConfig(source="webdataset")


# ------------------------------------------------------------------------------------------------ split
def test_split_is_a_pure_function_of_id_and_salt():
    ids = [f"img-{i}" for i in range(4000)]
    splits = [sources.split_of(i, 0.1) for i in ids]
    assert splits == [sources.split_of(i, 0.1) for i in reversed(ids)][::-1]
    assert 0.08 < splits.count("val") / len(ids) < 0.12
    assert all(sources.split_of(i, 0.0) == "train" for i in ids[:100])
    salted = [sources.split_of(i, 0.1, salt="b") for i in ids]
    assert salted != splits


# ------------------------------------------------------------------------------------------------ images
def test_modes_convert_to_l_or_rgb():
    transparent = Image.new("RGBA", (10, 6), (255, 0, 0, 0))
    assert np.all(np.asarray(pixels.to_channels(transparent, 1)) == 255)  # composited on white
    opaque = Image.new("RGBA", (10, 6), (255, 0, 0, 255))
    assert np.asarray(pixels.to_channels(opaque, 3))[0, 0].tolist() == [255, 0, 0]
    deep = Image.fromarray(np.full((4, 4), 65535, np.uint16))
    assert deep.mode.startswith("I;16")
    assert np.all(np.asarray(pixels.to_channels(deep, 1)) == 255)
    half = Image.fromarray(np.full((4, 4), 32896, np.uint16))
    assert np.all(np.asarray(pixels.to_channels(half, 1)) == 128)
    pal = Image.new("RGB", (8, 8), (0, 0, 255)).convert("P")
    assert pixels.to_channels(pal, 3).mode == "RGB"
    assert pixels.to_channels(Image.new("CMYK", (4, 4), (0, 0, 0, 0)), 3).getpixel((0, 0)) == (255, 255, 255)
    assert pixels.to_channels(Image.new("1", (4, 4), 1), 1).getpixel((0, 0)) == 255


@pytest.mark.parametrize(
    ("img", "rgb"),
    [
        (Image.new("LA", (4, 4), (100, 255)), (100, 100, 100)),
        (Image.new("LA", (4, 4), (100, 0)), (255, 255, 255)),  # transparent -> white
        (Image.new("La", (4, 4), (0, 0)), (255, 255, 255)),
        (Image.new("1", (4, 4), 0), (0, 0, 0)),
        (Image.new("LAB", (4, 4), (128, 128, 128)), (119, 119, 119)),  # L*=50, a*=b*=0: mid grey
        (Image.new("HSV", (4, 4), (0, 255, 255)), (255, 0, 0)),
        (Image.fromarray(np.full((4, 4), 32896, np.int32)), (128, 128, 128)),  # "I" holding 16-bit values
        (Image.fromarray(np.full((4, 4), 200, np.int32)), (200, 200, 200)),  # "I" holding 8-bit values
        (Image.fromarray(np.full((4, 4), 0.5, np.float32)), (128, 128, 128)),  # "F" in [0, 1]
    ],
    ids=lambda v: v.mode if isinstance(v, Image.Image) else None,
)
def test_every_mode_converts_to_both_targets(img, rgb):
    got = pixels.to_channels(img, 3)
    assert got.mode == "RGB"
    assert np.abs(np.asarray(got, int)[0, 0] - rgb).max() <= 2
    grey = pixels.to_channels(img, 1)
    want = Image.new("RGB", (1, 1), rgb).convert("L").getpixel((0, 0))  # ITU-R 601 luma, as Pillow computes it
    assert grey.mode == "L" and abs(grey.getpixel((0, 0)) - want) <= 2


def test_palette_transparency_is_composited_on_white():
    pal = Image.new("P", (4, 2), 0)
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * (254 * 3))
    pal.paste(1, (2, 0, 4, 2))  # right half: palette entry 1, declared transparent below
    buf = io.BytesIO()
    pal.save(buf, format="PNG", transparency=1)
    with Image.open(buf) as img:
        out = np.asarray(pixels.to_channels(img, 3))
    assert out[0, 0].tolist() == [255, 0, 0] and out[0, 3].tolist() == [255, 255, 255]


def test_fit_square_scales_short_side_and_centre_crops():
    img = Image.new("L", (90, 30), 0)
    img.paste(255, (30, 0, 60, 30))  # a white centre square, black wings
    out = pixels.fit_square(img, 32)
    assert out.size == (32, 32)
    assert np.asarray(out).min() > 200  # only the centre survives the crop
    assert pixels.fit_square(Image.new("RGB", (17, 300)), 64).size == (64, 64)


def test_decode_image_errors_say_what_is_wrong():
    with pytest.raises(ValueError, match=r"empty file \(0 bytes\)"):
        pixels.decode_image(b"", 32, 1)
    with pytest.raises(Image.UnidentifiedImageError, match="not an image"):
        pixels.decode_image(b"not an image at all", 32, 1)
    noise = Image.effect_noise((64, 64), 50).convert("RGB")
    jpeg = png_bytes(noise, "JPEG")
    with pytest.raises(OSError, match=r"truncated JPEG file \(64x64 in the header\)"):
        pixels.decode_image(jpeg[: len(jpeg) // 2], 32, 3)
    png = png_bytes(noise)
    with pytest.raises(OSError, match=r"truncated PNG file"):
        pixels.decode_image(png[: len(png) // 2], 32, 3)


@pytest.mark.parametrize(
    ("width", "height", "claim"),
    [
        (20000, 20000, "400000000 pixels"),  # past Pillow's own error limit
        (10000, 10000, "100000000 pixels"),  # past Pillow's warning limit
        (9000, 8000, "9000x8000 = 72000000 pixels"),  # past ours only
    ],
)
def test_decompression_bomb_is_refused_before_decoding(width, height, claim, png_claiming):
    with pytest.raises(Image.DecompressionBombError, match=rf"decompression bomb: the header claims {claim}, over"):
        pixels.decode_image(png_claiming(width, height), 32, 1)


def test_exif_orientation_is_applied():
    img = Image.new("L", (60, 20), 0)
    img.paste(255, (20, 0, 40, 10))  # stored landscape: white on the top half of the centre square
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated 90 degrees clockwise: the white block lands on the right of the centre
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif, quality=95)
    out = pixels.decode_image(buf.getvalue(), 32, 1).astype(float)
    assert out[:, :8].mean() < 60 and out[:, -8:].mean() > 200
    assert abs(out[:8].mean() - out[-8:].mean()) < 30


# ------------------------------------------------------------------------------------------------ idx
def test_read_idx_raw_gzip_and_errors(tmp_path):
    images = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    (tmp_path / "raw").write_bytes(idx_bytes(2051, images))
    (tmp_path / "zipped").write_bytes(gzip.compress(idx_bytes(2051, images)))
    for name in ("raw", "zipped"):
        magic, shape, data = idx.read_idx(str(tmp_path / name))
        assert (magic, shape) == (2051, (2, 3, 4))
        np.testing.assert_array_equal(data, images)
    (tmp_path / "wrong").write_bytes(idx_bytes(2052, images))
    with pytest.raises(ValueError, match=r"wrong.*magic number 2052"):
        idx.read_idx(str(tmp_path / "wrong"))
    (tmp_path / "short").write_bytes(idx_bytes(2051, images)[:-5])
    with pytest.raises(ValueError, match=r"short.*truncated"):
        idx.read_idx(str(tmp_path / "short"))


def test_list_idx_single_file_finds_labels_by_name(tmp_path):
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(idx_bytes(2051, np.zeros((3, 28, 28))))
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(2049, np.array([7, 8, 9]))))
    listing = idx.list_idx(str(tmp_path / "t10k-images-idx3-ubyte"))
    assert [(i["id"], i["label"]) for i in listing.items] == [("t10k-00000", 7), ("t10k-00001", 8), ("t10k-00002", 9)]
    assert [i["id"] for i in idx.list_idx(str(tmp_path), limit=2).items] == ["t10k-00000", "t10k-00001"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="nothing to shard in"):
        idx.list_idx(str(tmp_path / "empty"))


# ------------------------------------------------------------------------------------------------ folders
def test_walk_survives_symlink_loops_and_lists_classes(tmp_path):
    for rel in ("b/x.png", "a/deep/y.PNG", "z.jpg", "a/notes.txt", ".hidden/h.png"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    os.symlink(tmp_path, tmp_path / "a" / "loop")
    assert common.walk_files(str(tmp_path)) == (["a/deep/y.PNG", "a/notes.txt", "b/x.png", "z.jpg"], [], 0)
    listing = image_folder.list_image_folder(str(tmp_path))
    assert listing.classes == ["a", "b"]
    assert [(i["id"], i["label"]) for i in listing.items] == [("a/deep/y.PNG", 0), ("b/x.png", 1), ("z.jpg", None)]
    assert listing.ignored_files == 1


def test_undecodable_file_names_become_printable_ids_and_paths(tmp_path):
    (tmp_path / "cls").mkdir()
    good = os.path.join(os.fsencode(tmp_path), b"cls", b"caf\xe9.png")  # Latin-1 bytes: not valid UTF-8
    with open(good, "wb") as f:
        f.write(png_bytes(Image.new("L", (8, 8), 7)))
    with open(os.path.join(os.fsencode(tmp_path), b"cls", b"\xff.jpg"), "wb") as f:
        f.write(b"text")
    listing = image_folder.list_image_folder(str(tmp_path))
    assert [i["id"] for i in listing.items] == ["cls/caf\\xe9.png", "cls/\\xff.jpg"]
    cfg = ShardConfig(source="image_folder", path=str(tmp_path))
    loaded = list(sources.get("image_folder").load(listing.items, cfg))
    assert loaded[0][1] is not None and loaded[0][1][0, 0] == 7
    assert loaded[1][1] is None and loaded[1][2].startswith("UnidentifiedImageError: not an image")
    assert loaded[1][3] == os.path.join(str(tmp_path), "cls", "\\xff.jpg")
    loaded[1][3].encode("utf-8")  # strict: no surrogate escapes left for the manifest


def test_empty_folder_is_a_clear_error(tmp_path):
    (tmp_path / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match="nothing to shard in"):
        image_folder.list_image_folder(str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"shard\.path"):
        image_folder.list_image_folder(str(tmp_path / "missing"))


# ------------------------------------------------------------------------------------------------ parquet
def test_parquet_listing_and_loading(tmp_path):
    good = png_bytes(Image.new("RGB", (40, 20), (10, 200, 30)))
    cells = [{"bytes": good, "path": None}, {"bytes": None, "path": "side.png"}, {"bytes": b"junk", "path": None}]
    (tmp_path / "side.png").write_bytes(good)
    table = pa.table({"image": cells, "label": ["dog", "cat", None], "key": ["k0", "k1", "k2"]})
    pq.write_table(table, tmp_path / "hf.parquet", row_group_size=2)
    listing = parquet.list_parquet(str(tmp_path / "hf.parquet"), "image", "label", "key", None)
    assert listing.classes == ["cat", "dog"]
    assert [(i["id"], i["label"]) for i in listing.items] == [("k0", 1), ("k1", 0), ("k2", None)]
    cfg = ShardConfig(source="parquet", path=str(tmp_path / "hf.parquet"), channels=3)
    loaded = list(sources.get("parquet").load(listing.items[::-1], cfg))
    assert [pixels is None for _, pixels, _, _ in loaded] == [True, False, False]
    assert loaded[0][3].endswith("hf.parquet#row=2")
    assert loaded[1][1].shape == (32, 32, 3) and loaded[1][1][16, 16].tolist() == [10, 200, 30]
    with pytest.raises(ValueError, match=r"hf\.parquet.*no image column 'img'"):
        parquet.list_parquet(str(tmp_path / "hf.parquet"), "img", None, None, None)
    limited = parquet.list_parquet(str(tmp_path), "image", "missing_label", None, 2)
    assert [(i["id"], i["label"]) for i in limited.items] == [("hf-0", None), ("hf-1", None)]
