"""The evaluate step on local Ray with tiny untrained models over real digit shards: every metric, and its errors."""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from steps import evaluate
from steps.artifacts.autoencoder import Autoencoder
from steps.artifacts.code_format import CodeDatasetMismatch, CodeMeta, batch_to_tensors
from steps.artifacts.codes import METADATA_FILE, CodeDataset
from steps.artifacts.images import ImageShards
from steps.artifacts.priors import Priors
from steps.artifacts.samples import Samples
from steps.core.step import MissingInputError
from steps.evaluate import run
from steps.io.pixels import to_float, to_uint8_chw
from steps.io.storage import write_json
from steps.nn import registry
from steps.nn.checkpoint import CheckpointError, save_checkpoint
from steps.nn.pixelcnn import PixelCNNConfig, PixelCNNPrior

QUICK = dict(max_val_images=48, max_samples=16, batch_size=32, num_kid_subsets=10, kid_subset_size=16)


@pytest.fixture(scope="module")
def cfg(tiny):
    return tiny.evaluate(**QUICK)


@pytest.fixture(scope="module")
def upstream(digit_shards, tmp_path_factory, artifacts) -> dict[str, str]:
    """Shards of real digits; an untrained VQ-VAE-2, its code dataset, priors (top class-conditional) and samples."""
    root = tmp_path_factory.mktemp("evaluate_upstream")
    model = artifacts.small_vqvae2()
    autoencoder = Autoencoder.open(artifacts.autoencoder(root / "vqvae", model))
    shards = ImageShards.open(digit_shards)
    splits = {}
    for split in ("train", "val"):
        images, ids, labels = [], [], []
        for table in shards.tables(split):
            ids += table.column("id").to_pylist()
            labels += table.column("label").to_pylist()
        x = to_float(shards.read_images(split))  # (N, 1, 32, 32)
        with torch.no_grad():
            splits[split] = (ids, labels, dict(zip(model.levels, model.encode(x).codes, strict=True)))
    artifacts.codes(root / "encode", CodeMeta.of(autoencoder, num_classes=10), splits)
    top = PixelCNNConfig(num_codes=32, shape=(4, 4), channels=16, layers=2, num_classes=10)
    bottom = PixelCNNConfig(num_codes=32, shape=(8, 8), channels=16, layers=2, cond_num_codes=32, cond_shape=(4, 4))
    priors = artifacts.priors(root / "prior", autoencoder.digest, top=top, bottom=bottom)

    g = torch.Generator().manual_seed(1)
    codes = {
        "top": torch.randint(0, 16, (16, 4, 4), generator=g),
        "bottom": torch.randint(0, 16, (16, 8, 8), generator=g),
    }
    with torch.no_grad():
        images = to_uint8_chw(model.decode_codes(codes["top"], codes["bottom"]))
    return {
        "shard": digit_shards,
        "train_vqvae": autoencoder.uri,
        "encode": str(root / "encode"),
        "train_prior": priors,
        "sample": artifacts.samples(root / "sample", images, codes, labels=[i % 10 for i in range(16)]),
        "sample_codes_only": artifacts.samples(root / "sample_codes_only", images, codes, pngs=False),
    }


def inputs(up: dict[str, str], *names: str) -> dict[str, str]:
    return {k: up[k] for k in names}


ALL = ("shard", "train_vqvae", "encode", "train_prior", "sample")


@pytest.fixture(scope="module")
def vq2_run(ray_local, upstream, tmp_path_factory, cfg):
    out = tmp_path_factory.mktemp("evaluate") / "out"
    return run(cfg, inputs(upstream, *ALL), str(out)), out


def test_every_metric_is_reported_and_written(vq2_run):
    result, out = vq2_run
    m = result.metrics
    expected = {"recon_mse", "psnr", "ssim", "bits_per_dim", "fd_effnet", "kid_effnet", "kid_effnet_std"}
    expected |= {"precision", "recall", "fd_effnet_real", "kid_effnet_real", "precision_real", "recall_real"}
    expected |= {"fd_effnet_recon", "kid_effnet_recon"}
    expected |= {f"{k}_{lv}" for k in ("usage", "perplexity", "nll_bits") for lv in ("top", "bottom")}
    expected |= {"density", "coverage", "density_real", "coverage_real", "density_recon", "coverage_recon"}
    # The second feature space, the classifier's, with the same figures; and how well that classifier knows the classes
    clf = ("fd_clf", "kid_clf", "precision_clf", "recall_clf", "density_clf", "coverage_clf")
    expected |= {f"{k}{suffix}" for k in clf for suffix in ("", "_real", "_recon")}
    expected |= {"classifier_accuracy", "sample_class_accuracy"}
    assert expected <= set(m), expected - set(m)
    assert m["fd_clf"] > m["fd_clf_real"] > 0 and m["classifier_accuracy"] > 0.5  # 60 steps on digits already learn
    assert all(math.isfinite(v) for v in m.values())
    assert m["recon_mse"] > 0 and m["psnr"] == pytest.approx(10 * math.log10(4 / m["recon_mse"]))
    assert -1 <= m["ssim"] <= 1
    for lv in ("top", "bottom"):
        assert 0 < m[f"usage_{lv}"] <= 1 and 1 <= m[f"perplexity_{lv}"] <= 16
    for k in ("precision", "recall", "precision_real", "recall_real"):
        assert 0 <= m[k] <= 1
    # Decoded random codes of an untrained model are far from digits; two halves of the digits are close.
    assert m["fd_effnet"] > 2 * m["fd_effnet_real"] > 0
    # The floor's spread over other splits of the real images: how far apart two runs must be to differ.
    assert 0 < m["fd_effnet_real_min"] <= m["fd_effnet_real_max"] and m["fd_effnet_real_std"] > 0
    assert m["fd_effnet_real_max"] - m["fd_effnet_real_min"] >= m["fd_effnet_real_std"]
    assert m["fd_effnet"] - m["fd_effnet_real"] > 3 * m["fd_effnet_real_std"]
    assert {"precision_real_std", "recall_real_std"} <= set(m)
    assert m["kid_effnet"] > m["kid_effnet_real"]

    report = json.loads((out / "metrics.json").read_text())
    assert report["metrics"] == pytest.approx(m)
    counts = report["counts"]
    assert counts["real_split"] == "val" and counts["code_split"] == "val"
    assert counts["real_a"] + counts["real_b"] <= counts["real_images"] <= 48
    assert counts["samples"] == counts["real_b"] == min(16, counts["real_images"] - counts["real_images"] // 2)
    assert "EfficientNet-Lite0" in report["feature_space"] and report["config"]["knn_k"] == 3
    assert "classifier" in report["classifier_space"] and counts["classifier_train_images"] > 0
    grid = Image.open(io.BytesIO((out / "real_vs_samples.png").read_bytes()))
    assert grid.mode == "L" and grid.size[1] == 2 * 34 + 2  # one row of real digits, one of samples
    assert result.artifacts == {"metrics": str(out / "metrics.json"), "grid": str(out / "real_vs_samples.png")}


def test_code_metrics_match_a_direct_computation(vq2_run, upstream):
    """Usage over the val codes and the priors' bits per code, recomputed here from the files."""
    result, _ = vq2_run
    codes = CodeDataset.open(upstream["encode"])
    t = batch_to_tensors(pa.concat_tables(codes.tables("val")), codes.meta)
    priors = Priors.open(upstream["train_prior"])
    top, bottom = priors.load("top"), priors.load("bottom")
    with torch.no_grad():
        want_top = top.nll_bits(t["top"], t["label"].clamp_min(0)).item()
        want_bottom = bottom.nll_bits(t["bottom"], None, t["top"]).item()
    m = result.metrics
    assert m["nll_bits_top"] == pytest.approx(want_top, rel=1e-4)
    assert m["nll_bits_bottom"] == pytest.approx(want_bottom, rel=1e-4)
    assert m["bits_per_dim"] == pytest.approx((want_top * 16 + want_bottom * 64) / (32 * 32), rel=1e-4)
    assert m["usage_top"] == pytest.approx(len(torch.unique(t["top"])) / 32)


def test_vae_gets_reconstruction_and_sample_metrics_only(ray_local, upstream, tmp_path, tiny, artifacts):
    torch.manual_seed(0)
    vae = registry.build(tiny("data.channels=1", "model=vae", "model.latent_channels=4").train_vqvae.model).eval()
    artifacts.autoencoder(tmp_path / "vae", vae)
    images = to_uint8_chw(vae.sample(8, generator=torch.Generator().manual_seed(0)))
    samples = artifacts.samples(tmp_path / "samples", images, None)
    cfg = tiny.evaluate(max_val_images=16, batch_size=16, num_kid_subsets=5, recon_fd=False, classifier_steps=0)
    ins = {"shard": upstream["shard"], "train_vqvae": str(tmp_path / "vae"), "sample": samples}
    result = run(cfg, ins, str(tmp_path / "out"))
    m = result.metrics
    assert {"recon_mse", "psnr", "ssim", "fd_effnet", "kid_effnet", "precision", "fd_effnet_real"} <= set(m)
    assert not [k for k in m if "clf" in k or "class" in k]  # classifier_steps=0; samples without labels
    assert not [k for k in m if k.startswith(("usage", "perplexity", "nll_bits", "bits_per_dim", "fd_effnet_recon"))]


def test_samples_without_pngs_are_decoded_from_their_codes(upstream, tiny):
    autoencoder = Autoencoder.open(upstream["train_vqvae"])
    model, cfg = autoencoder.load(), tiny.evaluate(max_samples=10, batch_size=4)
    from_pngs = evaluate.sample_images(Samples.open(upstream["sample"]), autoencoder, model, cfg)
    from_codes = evaluate.sample_images(Samples.open(upstream["sample_codes_only"]), autoencoder, model, cfg)
    assert from_pngs.shape == (10, 1, 32, 32) and from_pngs.dtype == np.uint8
    np.testing.assert_array_equal(from_codes, from_pngs)


def test_a_rerun_takes_its_features_and_classifier_from_the_cache_and_scores_the_same(upstream, tmp_path, cfg,
                                                                                     artifacts, vq2_run):  # fmt: skip
    """The second evaluation of the same inputs computes no feature; new samples of the same models compute only
    theirs; every metric equals an evaluation without the cache."""
    ins = inputs(upstream, *ALL)
    plain = vq2_run[0]  # the same inputs and settings, without a cache (through Ray, as the pipeline runs it)
    cached = dataclasses.replace(cfg, feature_cache=str(tmp_path / "cache"))
    first = evaluate.evaluate(cached, ins, str(tmp_path / "first"))
    second = evaluate.evaluate(cached, ins, str(tmp_path / "second"))
    assert first["metrics"] == second["metrics"]  # exactly: features are stored as the network computed them
    assert first["metrics"] == pytest.approx(plain.metrics, rel=1e-6)  # a Ray task rounds differently in the last bits
    sets = 2 * 4  # two feature spaces x (real A, real B, samples, reconstructions)
    assert (first["counts"]["cache_hits"], first["counts"]["cache_misses"]) == (0, sets + 1)  # + the classifier
    assert (second["counts"]["cache_hits"], second["counts"]["cache_misses"]) == (sets + 1, 0)
    assert second["counts"]["feature_images_computed"] == 0 and "feature_images_per_s" not in second["counts"]
    counts = plain.info["counts"]  # without a cache every image of every set goes through both networks
    assert counts["cache_hits"] == 0
    assert counts["feature_images_computed"] == 2 * (counts["real_a"] + 3 * counts["samples"])

    # Other samples of the same models (a new sample run): only their features are computed.
    autoencoder = Autoencoder.open(upstream["train_vqvae"])
    images = evaluate.sample_images(Samples.open(upstream["sample"]), autoencoder, autoencoder.load(), cfg)
    other = artifacts.samples(tmp_path / "other", 255 - images, None)
    third = evaluate.evaluate(cached, {**ins, "sample": other}, str(tmp_path / "third"))
    assert (third["counts"]["cache_hits"], third["counts"]["cache_misses"]) == (sets + 1 - 2, 2)
    assert third["counts"]["feature_images_computed"] == 2 * len(images)
    assert third["metrics"]["fd_effnet_real"] == first["metrics"]["fd_effnet_real"]
    assert third["metrics"]["fd_effnet"] != first["metrics"]["fd_effnet"]


def foreign_codes(up: dict[str, str], folder: Path, **changes) -> str:
    """A code dataset like the upstream one whose metadata (what evaluate checks: its record) has ``changes``."""
    meta = CodeDataset.open(up["encode"]).meta
    folder.mkdir(parents=True)
    write_json(str(folder / METADATA_FILE), CodeMeta.from_json({**meta.to_dict(), **changes}).to_dict())
    return str(folder)


def swapped_prior(up: dict[str, str], folder: Path, name: str, model: torch.nn.Module, **extra) -> str:
    """A copy of the upstream priors (or autoencoder) folder with ``name``.pt replaced by ``model`` saved with
    ``extra`` (a tampered output: written by hand on purpose)."""
    folder.mkdir(parents=True)
    for level in ("top", "bottom"):
        (folder / f"{level}.pt").write_bytes((Path(up["train_prior"]) / f"{level}.pt").read_bytes())
    save_checkpoint(folder / f"{name}.pt", model, **extra)
    return str(folder)


def digest_of(up: dict[str, str]) -> str:
    return Autoencoder.open(up["train_vqvae"]).digest


FOREIGN = {
    "digest": (
        lambda up, d: {"encode": foreign_codes(up, d, vqvae="feedfacefeedface")},
        CodeDatasetMismatch,
        r"code dataset {encode}: field 'vqvae' mismatch: made by VQ-VAE feedfacefeedface, but {model} is",
    ),
    "shapes": (
        lambda up, d: {"encode": foreign_codes(up, d, shapes={"top": [8, 8], "bottom": [16, 16]}, image_size=64)},
        CodeDatasetMismatch,
        r"code dataset {encode}: field 'shapes\.top' mismatch: expected \[4, 4\], found \[8, 8\] "
        r"\(expected by {model}\); rerun the encode step",
    ),
    "codebook": (
        lambda up, d: {"encode": foreign_codes(up, d, codebook_size={"top": 512, "bottom": 512})},
        CodeDatasetMismatch,
        r"code dataset {encode}: field 'codebook_size\.top' mismatch: expected 32, found 512",
    ),
    "levels": (
        lambda up, d: {
            "encode": foreign_codes(up, d, levels=["top"], shapes={"top": [4, 4]}, codebook_size={"top": 16})
        },
        CodeDatasetMismatch,
        r"code dataset {encode}: field 'levels' mismatch: expected \['top', 'bottom'\], found \['top'\]",
    ),
    "prior_digest": (
        lambda up, d: {
            "train_prior": swapped_prior(
                up,
                d,
                "bottom",
                PixelCNNPrior(PixelCNNConfig(num_codes=16, shape=(8, 8), channels=8, layers=1)),
                level="bottom",
                vqvae="feedfacefeedface",
            )
        },
        CheckpointError,
        r"{train_prior}/bottom\.pt: the bottom prior was trained on codes of VQ-VAE feedfacefeedface, but {model}",
    ),
    "prior_shape": (
        lambda up, d: {
            "train_prior": swapped_prior(
                up,
                d,
                "top",
                PixelCNNPrior(PixelCNNConfig(num_codes=16, shape=(8, 8), channels=8, layers=1)),
                level="top",
                vqvae=digest_of(up),
            )
        },
        CheckpointError,
        r"{train_prior}/top\.pt models 16 codes on a \[8, 8\] map, but {model} has 32 codes on a "
        r"\[4, 4\] map at level 'top'",
    ),
    "prior_kind": (
        lambda up, d: {"train_prior": swapped_prior(up, d, "top", registry.build(registry.get("vae").config()))},
        CheckpointError,
        r"{train_prior}/top\.pt holds a 'vae' model, but a prior \(train_prior's <level>\.pt",
    ),
    "model_kind": (
        lambda up, d: {"train_vqvae": swapped_prior(up, d, "model", PixelCNNPrior(PixelCNNConfig(num_codes=16)))},
        CheckpointError,
        r"{model} holds a 'pixelcnn' model, but an autoencoder \(train_vqvae's model\.pt: kind vqvae2 or vqvae",
    ),
    "prior_missing": (
        lambda up, d: {"train_prior": (d.mkdir(parents=True), str(d))[1]},
        MissingInputError,
        r"{train_prior}/top\.pt does not exist: a prior .* is needed here; no top prior was trained; rerun train_prior",
    ),
    "priors_absent": (
        lambda up, d: {"train_prior": str(d)},
        MissingInputError,
        r"no priors at {train_prior}: run the train_prior step first",
    ),
}


@pytest.mark.parametrize("case", sorted(FOREIGN))
def test_codes_and_priors_of_another_vqvae_are_refused_before_any_work(upstream, tmp_path, monkeypatch, case, cfg):
    """In-process, so the work functions can be replaced by tripwires: the checks run before any of them."""
    make, error, pattern = FOREIGN[case]
    ins = {**inputs(upstream, *ALL), **make(upstream, tmp_path / "foreign")}

    def work(*args, **kwargs):
        raise AssertionError("evaluate started work before checking its inputs")

    for name in ("real_images", "reconstruction", "code_metrics", "sample_images", "features"):
        monkeypatch.setattr(evaluate, name, work)
    names = {k: re.escape(v) for k, v in ins.items()} | {"model": re.escape(f"{ins['train_vqvae']}/model.pt")}
    with pytest.raises(error, match=pattern.format(**names)):
        evaluate.evaluate(cfg, ins, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_foreign_code_dataset_fails_the_step_and_writes_nothing(ray_local, upstream, tmp_path, cfg):
    """Through run() and its Ray task: the error names the code dataset and the field; the output stays empty."""
    foreign = foreign_codes(upstream, tmp_path / "other_encode", codebook_size={"top": 512, "bottom": 512})
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(CodeDatasetMismatch, match=rf"code dataset {re.escape(foreign)}: field 'codebook_size\.top'"):
        run(cfg, {**inputs(upstream, *ALL), "encode": foreign}, str(out))
    assert list(out.iterdir()) == []


def test_missing_inputs_and_extras_fail_clearly(ray_local, upstream, tmp_path, cfg):
    with pytest.raises(MissingInputError, match="run the sample step first"):
        run(cfg, inputs(upstream, "shard", "train_vqvae"), str(tmp_path / "out"))
    with pytest.raises(FileNotFoundError, match="the sample output"):
        run(cfg, {**inputs(upstream, *ALL), "sample": str(tmp_path / "nowhere")}, str(tmp_path / "out"))
    if evaluate.importlib.util.find_spec("torch_fidelity") is None:
        from dataclasses import replace

        with pytest.raises(ImportError, match=r"vqvae2-pipeline\[fid\]"):
            run(replace(cfg, inception_fid=True), inputs(upstream, *ALL), str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out" / "metrics.json")


def test_inception_fid_hands_torch_fidelity_uint8_rgb(monkeypatch):
    """The optional Inception FID path, against a stand-in for torch-fidelity (the real one downloads weights)."""
    import sys
    import types

    seen = {}

    def calculate_metrics(**kwargs):
        seen.update(kwargs)
        return {"frechet_inception_distance": 12.5}

    monkeypatch.setitem(sys.modules, "torch_fidelity", types.SimpleNamespace(calculate_metrics=calculate_metrics))
    grey = np.random.default_rng(0).integers(0, 256, (5, 1, 32, 32), dtype=np.uint8)
    assert evaluate.inception_fid(grey, grey[:3], use_gpu=False) == 12.5
    assert seen["fid"] is True and seen["cuda"] is False and len(seen["input2"]) == 3
    item = seen["input1"][0]
    assert item.dtype == torch.uint8 and item.shape == (3, 32, 32)
    assert torch.equal(item[0], torch.from_numpy(grey[0, 0])) and torch.equal(item[2], item[0])
