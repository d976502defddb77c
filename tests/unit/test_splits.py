"""The split layout of the Parquet datasets: hive split folders and ``_`` sidecars, and outputs of the layout before
(``<out>/<split>/``, ``manifest.json`` / ``codes.json``) still opened by the handles."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.verify import verify
from steps.artifacts.code_format import CodeMeta
from steps.artifacts.codes import CodeDataset, read_code_meta
from steps.artifacts.images import ImageShards
from steps.artifacts.splits import SPLITS, is_legacy, split_folder, split_folders
from steps.io.pixels import encode_png

BLANK = encode_png(np.zeros((32, 32), np.uint8))
META = CodeMeta(("top",), {"top": (4, 4)}, {"top": 16}, vqvae="0" * 16, image_size=32)
IMAGES = {"train": (["a", "b", "c"], [1, None, 2], [BLANK] * 3), "val": (["d"], [None], [BLANK])}
CODES = {
    "train": (["a", "b", "c"], [1, None, 2], {"top": np.zeros((3, 4, 4), np.int64)}),
    "val": (["d"], None, {"top": np.ones((1, 4, 4), np.int64)}),
}


def to_old_layout(out) -> None:
    """What the same output looked like before hive split folders: rename the folders and the sidecars."""
    for split in SPLITS:
        (out / split_folder(split)).rename(out / split)
    for sidecar in out.glob("_*.json"):
        sidecar.rename(out / sidecar.name[1:])


def test_split_folders():
    assert [split_folder(s) for s in SPLITS] == ["split=train", "split=val"]
    assert split_folder("val", legacy=True) == "val"
    assert split_folders() == ("split=train", "split=val", "train", "val")
    with pytest.raises(ValueError, match="split must be one of"):
        split_folder("test")


def test_shards_of_both_layouts_open_alike(tmp_path, artifacts):
    new, old = tmp_path / "new", tmp_path / "old"
    for out in (new, old):
        artifacts.shards(out, IMAGES, size=32, channels=1)
    to_old_layout(old)
    assert (new / "_manifest.json").exists() and (old / "manifest.json").exists() and (old / "train").is_dir()
    a, b = ImageShards.open(str(new)), ImageShards.open(str(old))
    assert (a.legacy, b.legacy) == (False, True)
    assert a.split_uri("train") == str(new / "split=train") and b.split_uri("train") == str(old / "train")
    for split in SPLITS:
        assert b.ids(split).to_pylist() == a.ids(split).to_pylist() == IMAGES[split][0]
        assert b.rows(split) == a.rows(split)
        np.testing.assert_array_equal(b.read_images(split), a.read_images(split))
    b.check_images(32, 1, consumer="a test")


def test_code_datasets_of_both_layouts_open_alike(tmp_path, artifacts):
    new, old = tmp_path / "new", tmp_path / "old"
    for out in (new, old):
        artifacts.codes(out, META, CODES)
    to_old_layout(old)
    a, b = CodeDataset.open(str(new)), CodeDataset.open(str(old))
    assert (a.legacy, b.legacy) == (False, True) and a.meta == b.meta == META
    assert b.check_files() == a.check_files() == {"train": 3, "val": 1}
    for split in SPLITS:
        assert [f.rsplit("/", 2)[-2] for f in b.files(split)] == [split]
        assert b.ids(split).to_pylist() == a.ids(split).to_pylist() == CODES[split][0]
    (old / "codes.json").unlink()  # an old dataset without its record: the metadata comes from a file's schema
    assert is_legacy(str(old), "_codes.json", "codes.json") and read_code_meta(str(old)) == META
    assert CodeDataset.open(str(old)).check_files() == {"train": 3, "val": 1}


def test_verify_passes_a_root_of_old_outputs(tmp_path, artifacts):
    import json

    root = tmp_path / "artifacts"
    shard, encode = root / "shard" / "s1", root / "encode" / "e1"
    artifacts.shards(shard, IMAGES, size=32, channels=1)
    artifacts.codes(encode, META, CODES)
    for out, step, inputs in ((shard, "shard", {}), (encode, "encode", {"shard": str(shard)})):
        to_old_layout(out)
        (out / "_SUCCESS").write_text(json.dumps({"step": step, "fingerprint": out.name, "inputs": inputs}))
    report = verify(str(root))
    assert report.ok, report.errors
    assert report.rows["encode/e1/train"].found == report.rows["encode/e1/train"].expected == 3
