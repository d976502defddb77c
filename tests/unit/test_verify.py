"""pipeline.verify on artifact roots made by hand: each kind of damage is found and named, sound outputs pass."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.verify import main, verify
from steps.artifacts.code_format import CodeMeta
from steps.artifacts.codes import CodeDataset
from steps.io.pixels import encode_png

BLANK = encode_png(np.zeros((32, 32), np.uint8))
META = CodeMeta(("top",), {"top": (4, 4)}, {"top": 16}, vqvae="0" * 16, image_size=32)


def ids_file(path: Path, ids: list[str]) -> None:
    """Overwrite a Parquet file of a finished output with one holding these ids (damage)."""
    table = pq.read_table(path)
    pq.write_table(table.take([0] * len(ids)).set_column(0, "id", pa.array(ids, table.schema.field("id").type)), path)


def publish(root: Path, where: str, fp: str, **record) -> Path:
    out = root / where / fp
    out.mkdir(parents=True, exist_ok=True)
    (out / "_SUCCESS").write_text(json.dumps({"step": where, "fingerprint": fp, "artifacts": {}, **record}))
    return out


def make_root(tmp_path: Path, artifacts) -> Path:
    root = tmp_path / "artifacts"
    shard = root / "shard" / "s1"
    splits = {"train": (["a", "b", "c"], [None] * 3, [BLANK] * 3), "val": (["d"], [None], [BLANK])}
    artifacts.shards(shard, splits, size=32, channels=1)
    publish(root, "shard", "s1")
    zeros = np.zeros((3, 4, 4), np.int64)
    codes = {"train": (["a", "b", "c"], None, {"top": zeros}), "val": (["d"], None, {"top": zeros[:1]})}
    artifacts.codes(root / "encode" / "e1", META, codes)
    publish(root, "encode", "e1", inputs={"shard": str(shard)})
    return root


def test_a_sound_root_passes(tmp_path, capsys, artifacts):
    root = make_root(tmp_path, artifacts)
    (root / "sample" / "x1.partial").mkdir(parents=True)
    (root / "sample" / "x1.lock").write_text("")
    report = verify(str(root))
    assert report.ok and report.rows_lost == 0 and len(report.outputs) == 2
    assert report.in_progress == [str(root / "sample" / "x1.partial")]
    assert report.rows["encode/e1/train"].found == report.rows["encode/e1/train"].expected == 3
    assert main([str(root)]) == 0
    assert "ok" in capsys.readouterr().out


def test_lost_duplicated_and_foreign_rows_are_counted(tmp_path, artifacts):
    root = make_root(tmp_path, artifacts)
    codes = root / "encode" / "e1"
    (train_file,) = CodeDataset.open(str(codes)).files("train")
    ids_file(Path(train_file), ["a", "a", "z"])  # b and c lost, a twice, z foreign
    report = verify(str(root))
    rows = report.rows["encode/e1/train"]
    assert (rows.expected, rows.found, rows.missing, rows.duplicates, rows.extra) == (3, 3, 2, 1, 1)
    assert report.rows_lost == 2 and report.rows_duplicated == 1
    assert not report.ok and "encode/e1/train" in report.errors[0]


def test_unpublished_or_mislabelled_outputs_and_missing_artifacts_are_errors(tmp_path, capsys, artifacts):
    root = make_root(tmp_path, artifacts)
    (root / "sample" / "half").mkdir(parents=True)  # a directory that looks finished, without _SUCCESS
    publish(root, "evaluate", "v1", artifacts={"metrics": str(root / "evaluate" / "v1" / "metrics.json")})
    publish(root, "train_prior", "p1", step="train_vqvae")
    (root / "train_vqvae").mkdir()
    (root / "train_vqvae" / "t1.old-123").mkdir()
    report = verify(str(root))
    text = "\n".join(report.errors)
    assert f"{root}/sample/half: looks finished but has no _SUCCESS" in text
    assert "artifact 'metrics'" in text and "metrics.json) is missing" in text
    assert "train_prior/p1: its _SUCCESS is for train_vqvae/p1" in text
    assert "train_prior/p1/priors.json does not exist" in text
    assert any("t1.old-123: left over" in w for w in report.warnings)
    assert main([str(root)]) == 1
    assert "ERROR" in capsys.readouterr().out


def test_a_missing_root_is_an_error(tmp_path, capsys):
    assert main([str(tmp_path / "nowhere")]) == 2
    assert "no artifacts root" in capsys.readouterr().err
