"""The catalog: every step's output handle follows one protocol (steps/artifacts/base.py), the run records give each
output its lineage, and codes have one format and one limit wherever they are stored."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.graph import GRAPH, STEPS, writer_of
from pipeline.verify import verify
from steps.artifacts import records
from steps.artifacts.autoencoder import Autoencoder
from steps.artifacts.base import Upstream
from steps.artifacts.code_format import CodeDatasetMismatch, CodeMeta, codes_to_arrow, schema_code_meta
from steps.artifacts.codes import CodeDataset, CodeWriter
from steps.artifacts.evaluation import Evaluation
from steps.artifacts.images import ImageShards
from steps.artifacts.priors import Priors
from steps.artifacts.samples import Samples
from steps.io.pixels import encode_png
from steps.nn.checkpoint import CheckpointError
from steps.nn.pixelcnn import PixelCNNConfig
from steps.nn.quantize import MAX_CODEBOOK, EMAQuantizerConfig

BLANK = encode_png(np.zeros((32, 32), np.uint8))
META = CodeMeta(("top",), {"top": (4, 4)}, {"top": 16}, vqvae="0" * 16, image_size=32)


def publish(output: str | Path, step: str, **inputs: str) -> str:
    records.write(str(output), {"step": step, "fingerprint": Path(output).name, "inputs": inputs, "artifacts": {}})
    return str(output)


# ------------------------------------------------------------------------------------------------ lineage
def test_lineage_follows_the_records_and_marks_what_is_gone(tmp_path):
    shard = publish(tmp_path / "shard" / "s", "shard")
    vq = publish(tmp_path / "train_vqvae" / "v", "train_vqvae", shard=shard)
    codes = publish(tmp_path / "encode" / "e", "encode", shard=shard, train_vqvae=vq)
    priors = publish(tmp_path / "train_prior" / "p", "train_prior", encode=codes)
    found = records.lineage(priors)
    assert list(found) == ["encode", "shard", "train_vqvae"]  # nearest first, each once
    assert all(a.finished for a in found.values()) and found["train_vqvae"].uri == vq
    (Path(codes) / records.SUCCESS).unlink()  # encode's output is gone: what lies beyond it is unknown
    found = records.lineage(priors)
    assert list(found) == ["encode"] and not found["encode"].finished and found["encode"].uri == codes
    assert records.lineage(str(tmp_path / "nothing")) == {} and records.read(str(tmp_path / "nothing")) is None


def test_upstream_opens_on_first_use_and_skips_what_is_gone(tmp_path, artifacts):
    splits = {"train": (["a"], [None], [BLANK]), "val": ([], [], [])}
    shards = artifacts.shards(tmp_path / "shards", splits, size=32, channels=1)
    upstream = Upstream({ImageShards: shards, Autoencoder: None})
    assert upstream.get(Autoencoder) is None and upstream.get(Priors) is None
    opened = upstream.get(ImageShards)
    assert isinstance(opened, ImageShards) and upstream.get(ImageShards) is opened


# ------------------------------------------------------------------------------------------------ protocol
def test_the_graph_asks_handles_not_names():
    assert [s.name for s in GRAPH if s.output.is_dataset] == ["shard", "encode"]
    assert writer_of(Autoencoder) is STEPS["train_vqvae"] and writer_of(Priors) is STEPS["train_prior"]
    metrics = {"fd_effnet": 3.0, "nll_bits_top": 5.0, "usage_bottom": 0.5, "seconds": 9.0, "n_samples": 8.0}
    assert Evaluation.headline(metrics) == {"fd_effnet": 3.0, "nll_bits_top": 5.0, "usage_bottom": 0.5}
    assert all(s.output.headline(metrics) == {} for s in GRAPH if s.output is not Evaluation)


def write_codes(out: Path, rows_per_part: int, codes: np.ndarray, meta: CodeMeta = META) -> CodeDataset:
    writer = CodeWriter(str(out), meta)
    writer.clear()
    ids = [f"i{k:02d}" for k in range(len(codes))]
    order = np.random.default_rng(rows_per_part).permutation(len(codes))  # files cut and ordered differently
    for part, start in enumerate(range(0, len(codes), rows_per_part)):
        take = order[start : start + rows_per_part]
        table = codes_to_arrow([ids[k] for k in take], None, {"top": codes[take]}, meta)
        writer.write_part(table, "train", f"part-{part:05d}")
    writer.write_empty("val")
    writer.finish({"train": len(codes), "val": 0})
    return CodeDataset.open(str(out))


def test_content_digests_see_what_was_computed_not_how_it_was_stored(tmp_path, artifacts):
    codes = np.random.default_rng(0).integers(0, 16, (12, 4, 4))
    one = write_codes(tmp_path / "one", 12, codes)
    three = write_codes(tmp_path / "three", 4, codes)
    assert one.content_digest() == three.content_digest()
    changed = codes.copy()
    changed[5, 2, 1] = (changed[5, 2, 1] + 1) % 16
    assert write_codes(tmp_path / "changed", 4, changed).content_digest() != one.content_digest()

    model = artifacts.small_vqvae2()
    a = Autoencoder.open(artifacts.autoencoder(tmp_path / "a", model))
    b = Autoencoder.open(artifacts.autoencoder(tmp_path / "b", model, step=7))  # other bytes, same weights
    assert a.digest != b.digest and a.content_digest() == b.content_digest()
    with torch.no_grad():
        next(model.parameters()).add_(1e-6)
    assert Autoencoder.open(artifacts.autoencoder(tmp_path / "c", model)).content_digest() != a.content_digest()


def test_priors_digest_and_check_against_their_autoencoder(tmp_path, artifacts):
    autoencoder = Autoencoder.open(artifacts.autoencoder(tmp_path / "vq", artifacts.small_vqvae2()))
    top = PixelCNNConfig(num_codes=32, shape=(4, 4), channels=8, layers=1)
    bottom = PixelCNNConfig(num_codes=32, shape=(8, 8), channels=8, layers=1, cond_num_codes=32, cond_shape=(4, 4))
    priors = Priors.open(artifacts.priors(tmp_path / "p", autoencoder.digest, top=top, bottom=bottom))
    assert priors.check_against(autoencoder) == 0
    assert priors.verify(Upstream({Autoencoder: autoencoder.uri})) == {}
    again = Priors.open(artifacts.priors(tmp_path / "p2", autoencoder.digest, top=top, bottom=bottom))
    other = Priors.open(artifacts.priors(tmp_path / "p3", autoencoder.digest, seed=1, top=top, bottom=bottom))
    assert priors.content_digest() == again.content_digest() != other.content_digest()


def test_sampled_codes_are_the_code_format_and_verify_against_their_autoencoder(tmp_path, artifacts):
    autoencoder = Autoencoder.open(artifacts.autoencoder(tmp_path / "vq", artifacts.small_vqvae2()))
    codes = {"top": torch.zeros(3, 4, 4, dtype=torch.long), "bottom": torch.ones(3, 8, 8, dtype=torch.long)}
    samples = Samples.open(artifacts.samples(tmp_path / "s", np.zeros((3, 1, 32, 32), np.uint8), codes))
    (part,) = samples.code_files()
    meta = schema_code_meta(pq.read_schema(part))
    assert meta.levels == ("top", "bottom") and pq.read_schema(part).names == ["id", "label", "top", "bottom", "seed"]
    counts = samples.verify(Upstream())
    assert counts["codes"].exact and counts["codes"].found == 3
    # artifacts.samples names a digest of zeros as the VQ-VAE: against a real autoencoder they do not belong
    with pytest.raises(CodeDatasetMismatch, match="made by VQ-VAE 0{16}, but the model given is"):
        samples.verify(Upstream({Autoencoder: autoencoder.uri}))


def test_verify_runs_each_handle_through_the_graph(tmp_path, artifacts):
    root = tmp_path / "root"
    splits = {"train": (["a", "b"], [None, None], [BLANK, BLANK]), "val": ([], [], [])}
    shard = artifacts.shards(root / "shard" / "s1", splits, size=32, channels=1)
    publish(shard, "shard")
    zeros = np.zeros((2, 4, 4), np.int64)
    codes = {"train": (["a", "b"], None, {"top": zeros}), "val": ([], None, {"top": zeros[:0]})}
    encoded = artifacts.codes(root / "encode" / "e1", META, codes)
    publish(encoded, "encode", shard=shard)
    report = verify(str(root))
    assert report.ok, report.errors
    assert sorted(report.rows) == ["encode/e1/train", "encode/e1/val", "shard/s1/train", "shard/s1/val"]
    (Path(shard) / records.SUCCESS).unlink()  # the shards are gone: codes are counted against their own record
    (root / "shard" / "s1").rename(root / "shard" / "s1.partial")
    report = verify(str(root))
    assert report.ok and any("its input shard" in w and "is gone" in w for w in report.warnings)
    record = json.loads((Path(encoded) / records.SUCCESS).read_text())
    assert record["inputs"] == {"shard": shard}


# ------------------------------------------------------------------------------------------------ one limit
def test_one_codebook_limit_from_the_quantizer_to_the_stored_codes():
    """Codes are int16 on disk: a codebook of 32768 codes (0 .. 32767) fits, one more does not, and the quantizer's
    config and the code metadata agree on it."""
    assert MAX_CODEBOOK == 1 << 15
    EMAQuantizerConfig(codebook_size=MAX_CODEBOOK)
    with pytest.raises(ValueError, match="codebook_size must be in"):
        EMAQuantizerConfig(codebook_size=MAX_CODEBOOK + 1)
    meta = CodeMeta(("top",), {"top": (1, 2)}, {"top": MAX_CODEBOOK}, vqvae="v", image_size=8)
    table = codes_to_arrow(["x"], None, {"top": np.array([[[0, MAX_CODEBOOK - 1]]])}, meta)
    assert table.column("top").to_pylist() == [[0, MAX_CODEBOOK - 1]]
    with pytest.raises(ValueError, match="must be in"):
        CodeMeta(("top",), {"top": (1, 2)}, {"top": MAX_CODEBOOK + 1}, vqvae="v", image_size=8)


def test_a_tuned_decoder_belongs_to_its_models_codes_and_priors(tmp_path, artifacts):
    """tune_decoder's output: the same codes digest as its upstream, so the base's priors check against it; its file
    digest is its own (samples of another decoder are other samples); verify holds it to the base's encoder."""
    from steps.artifacts.autoencoder import TunedAutoencoder
    from steps.nn.checkpoint import to_bytes
    from steps.tune_decoder import autoencoder_payload

    model = artifacts.small_vqvae2()
    base = Autoencoder.open(artifacts.autoencoder(tmp_path / "vq", model))

    def tuned(out: Path, change: str) -> TunedAutoencoder:
        state = {f"autoencoder.{k}": v.clone() for k, v in model.state_dict().items()}
        state[f"autoencoder.{change}"] += 0.5
        payload = autoencoder_payload({"format": 2, "model": state, "step": 3, "metrics": {}}, base)
        (out / "model.pt").parent.mkdir(parents=True)
        (out / "model.pt").write_bytes(to_bytes(payload))
        return TunedAutoencoder.open(str(out))

    good = tuned(tmp_path / "t", "dec.net.0.weight")
    assert good.codes_digest == base.codes_digest == base.digest != good.digest
    assert good.decoder_of == base.model_uri and good.kind == base.kind and good.config == base.config
    assert good.verify(Upstream({Autoencoder: base.uri})) == {} and good.verify(Upstream()) == {}
    top = PixelCNNConfig(num_codes=32, shape=(4, 4), channels=8, layers=1)
    bottom = PixelCNNConfig(num_codes=32, shape=(8, 8), channels=8, layers=1, cond_num_codes=32, cond_shape=(4, 4))
    priors = Priors.open(artifacts.priors(tmp_path / "p", base.codes_digest, top=top, bottom=bottom))
    assert priors.check_against(good) == 0
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(good.load().encode(x).codes, model.encode(x).codes, strict=True))

    bad = tuned(tmp_path / "t2", "enc_bottom.net.0.weight")
    with pytest.raises(CheckpointError, match=r"its encoder or codebooks differ from .*enc_bottom.net.0.weight"):
        bad.verify(Upstream({Autoencoder: base.uri}))
    plain = TunedAutoencoder.open(artifacts.autoencoder(tmp_path / "plain", model))
    with pytest.raises(CheckpointError, match="does not record the autoencoder its decoder was tuned from"):
        plain.verify(Upstream({Autoencoder: base.uri}))
