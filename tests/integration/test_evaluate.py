"""The evaluate step on local Ray with tiny untrained models over real digit shards: every metric, and its errors."""

from __future__ import annotations

import io
import json
import math
import os
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from steps import evaluate
from steps.codes import CodeDatasetMismatch, CodeMeta, batch_to_tensors, codes_to_arrow, model_digest
from steps.common import MissingInputError, write_json
from steps.evaluate import EvaluateConfig, run
from steps.images import decode_batch, encode_png, to_uint8
from steps.nn.checkpoint import CheckpointError, save_checkpoint
from steps.nn.prior import PixelCNNPrior, PriorConfig
from steps.nn.vae import VAE, VAEConfig
from steps.nn.vqvae import VQVAE2, VQVAE2Config
from steps.shard import shard_files

SMALL = {"image_size": 32, "in_channels": 1, "channels": 16, "res_channels": 8, "res_blocks": 1}
QUICK = EvaluateConfig(max_val_images=48, max_samples=16, batch_size=32, num_kid_subsets=10, kid_subset_size=16)


def shard_images(shards: str, split: str) -> tuple[list[str], list[int], torch.Tensor]:
    table = pa.concat_tables([pq.read_table(f) for f in shard_files(shards, split)])
    x = torch.from_numpy(decode_batch(table.column("image").to_pylist(), 1))  # (N, 1, 32, 32)
    return table.column("id").to_pylist(), table.column("label").to_pylist(), x


def write_samples(folder: Path, images: torch.Tensor, codes: dict[str, torch.Tensor] | None, pngs: bool = True):
    folder.mkdir(parents=True)
    if pngs:
        (folder / "images").mkdir()
        for i, pixels in enumerate(to_uint8(images)):
            (folder / "images" / f"{i:06d}.png").write_bytes(encode_png(pixels))
    if codes:
        (folder / "codes").mkdir()
        columns = {}
        for lv, c in codes.items():  # (N, H, W) -> fixed-size lists of H*W int16, as the sample step writes them
            flat = pa.array(c.reshape(-1).numpy().astype(np.int16))
            columns[lv] = pa.FixedSizeListArray.from_arrays(flat, c[0].numel())
        pq.write_table(pa.table(columns), folder / "codes" / "part-00000.parquet")
    write_json(str(folder / "samples.json"), {"num_samples": len(images)})
    return str(folder)


@pytest.fixture(scope="module")
def upstream(digit_shards, tmp_path_factory) -> dict[str, str]:
    """Shards of real digits; an untrained VQ-VAE-2, its code dataset, priors (top class-conditional) and samples."""
    root = tmp_path_factory.mktemp("evaluate_upstream")
    torch.manual_seed(0)
    model = VQVAE2(VQVAE2Config(**SMALL, codebook_size=16, embed_dim=8)).eval()
    (root / "vqvae").mkdir()
    save_checkpoint(root / "vqvae" / "model.pt", model, step=1)
    digest = model_digest((root / "vqvae" / "model.pt").read_bytes())
    meta = CodeMeta.from_model(model, digest, num_classes=10)
    for split in ("train", "val"):
        ids, labels, x = shard_images(digit_shards, split)
        with torch.no_grad():
            codes = dict(zip(model.levels, model.encode(x).codes, strict=True))
        (root / "encode" / split).mkdir(parents=True)
        pq.write_table(codes_to_arrow(ids, labels, codes, meta), root / "encode" / split / "part-00000.parquet")
    write_json(str(root / "encode" / "codes.json"), meta.to_dict())

    (root / "prior").mkdir()
    configs = {
        "top": PriorConfig(num_codes=16, shape=(4, 4), channels=16, layers=2, num_classes=10),
        "bottom": PriorConfig(num_codes=16, shape=(8, 8), channels=16, layers=2, cond_num_codes=16, cond_shape=(4, 4)),
    }
    for lv, config in configs.items():
        save_checkpoint(root / "prior" / f"{lv}.pt", PixelCNNPrior(config), level=lv, vqvae=digest, step=1)

    g = torch.Generator().manual_seed(1)
    codes = {
        "top": torch.randint(0, 16, (16, 4, 4), generator=g),
        "bottom": torch.randint(0, 16, (16, 8, 8), generator=g),
    }
    with torch.no_grad():
        images = model.decode_codes(codes["top"], codes["bottom"])
    return {
        "shard": digit_shards,
        "train_vqvae": str(root / "vqvae"),
        "encode": str(root / "encode"),
        "train_prior": str(root / "prior"),
        "sample": write_samples(root / "sample", images, codes),
        "sample_codes_only": write_samples(root / "sample_codes_only", images, codes, pngs=False),
    }


def inputs(up: dict[str, str], *names: str) -> dict[str, str]:
    return {k: up[k] for k in names}


ALL = ("shard", "train_vqvae", "encode", "train_prior", "sample")


@pytest.fixture(scope="module")
def vq2_run(ray_local, upstream, tmp_path_factory):
    out = tmp_path_factory.mktemp("evaluate") / "out"
    return run(QUICK, inputs(upstream, *ALL), str(out)), out


def test_every_metric_is_reported_and_written(vq2_run):
    result, out = vq2_run
    m = result.metrics
    expected = {"recon_mse", "psnr", "ssim", "bits_per_dim", "fd_effnet", "kid_effnet", "kid_effnet_std"}
    expected |= {"precision", "recall", "fd_effnet_real", "kid_effnet_real", "precision_real", "recall_real"}
    expected |= {"fd_effnet_recon", "kid_effnet_recon"}
    expected |= {f"{k}_{lv}" for k in ("usage", "perplexity", "nll_bits") for lv in ("top", "bottom")}
    assert expected <= set(m), expected - set(m)
    assert all(math.isfinite(v) for v in m.values())
    assert m["recon_mse"] > 0 and m["psnr"] == pytest.approx(10 * math.log10(4 / m["recon_mse"]))
    assert -1 <= m["ssim"] <= 1
    for lv in ("top", "bottom"):
        assert 0 < m[f"usage_{lv}"] <= 1 and 1 <= m[f"perplexity_{lv}"] <= 16
    for k in ("precision", "recall", "precision_real", "recall_real"):
        assert 0 <= m[k] <= 1
    # Decoded random codes of an untrained model are far from digits; two halves of the digits are close.
    assert m["fd_effnet"] > 2 * m["fd_effnet_real"] > 0
    assert m["kid_effnet"] > m["kid_effnet_real"]

    report = json.loads((out / "metrics.json").read_text())
    assert report["metrics"] == pytest.approx(m)
    counts = report["counts"]
    assert counts["real_split"] == "val" and counts["code_split"] == "val"
    assert counts["real_a"] + counts["real_b"] <= counts["real_images"] <= 48
    assert counts["samples"] == counts["real_b"] == min(16, counts["real_images"] - counts["real_images"] // 2)
    assert "EfficientNet-Lite0" in report["feature_space"] and report["config"]["knn_k"] == 3
    grid = Image.open(io.BytesIO((out / "real_vs_samples.png").read_bytes()))
    assert grid.mode == "L" and grid.size[1] == 2 * 34 + 2  # one row of real digits, one of samples
    assert result.artifacts == {"metrics": str(out / "metrics.json"), "grid": str(out / "real_vs_samples.png")}


def test_code_metrics_match_a_direct_computation(vq2_run, upstream):
    """Usage over the val codes and the priors' bits per code, recomputed here from the files."""
    result, _ = vq2_run
    table = pq.read_table(Path(upstream["encode"]) / "val")
    meta = CodeMeta.from_json(json.loads((Path(upstream["encode"]) / "codes.json").read_text()))
    t = batch_to_tensors(table, meta)
    from steps.nn.checkpoint import load_model

    top, _ = load_model(Path(upstream["train_prior"]) / "top.pt")
    bottom, _ = load_model(Path(upstream["train_prior"]) / "bottom.pt")
    with torch.no_grad():
        want_top = top.nll_bits(t["top"], t["label"].clamp_min(0)).item()
        want_bottom = bottom.nll_bits(t["bottom"], None, t["top"]).item()
    m = result.metrics
    assert m["nll_bits_top"] == pytest.approx(want_top, rel=1e-4)
    assert m["nll_bits_bottom"] == pytest.approx(want_bottom, rel=1e-4)
    assert m["bits_per_dim"] == pytest.approx((want_top * 16 + want_bottom * 64) / (32 * 32), rel=1e-4)
    assert m["usage_top"] == pytest.approx(len(torch.unique(t["top"])) / 16)


def test_vae_gets_reconstruction_and_sample_metrics_only(ray_local, upstream, tmp_path):
    torch.manual_seed(0)
    vae = VAE(VAEConfig(**SMALL, latent_channels=4)).eval()
    (tmp_path / "vae").mkdir()
    save_checkpoint(tmp_path / "vae" / "model.pt", vae)
    samples = write_samples(tmp_path / "samples", vae.sample(8, generator=torch.Generator().manual_seed(0)), None)
    cfg = EvaluateConfig(max_val_images=16, batch_size=16, num_kid_subsets=5, recon_fd=False)
    ins = {"shard": upstream["shard"], "train_vqvae": str(tmp_path / "vae"), "sample": samples}
    result = run(cfg, ins, str(tmp_path / "out"))
    m = result.metrics
    assert {"recon_mse", "psnr", "ssim", "fd_effnet", "kid_effnet", "precision", "fd_effnet_real"} <= set(m)
    assert not [k for k in m if k.startswith(("usage", "perplexity", "nll_bits", "bits_per_dim", "fd_effnet_recon"))]


def test_samples_without_pngs_are_decoded_from_their_codes(upstream):
    from steps.nn.checkpoint import load_model

    model, _ = load_model(Path(upstream["train_vqvae"]) / "model.pt")
    from_pngs = evaluate.sample_images(upstream["sample"], model, 1, 10, 4)
    from_codes = evaluate.sample_images(upstream["sample_codes_only"], model, 1, 10, 4)
    assert from_pngs.shape == (10, 1, 32, 32) and from_pngs.dtype == np.uint8
    np.testing.assert_array_equal(from_codes, from_pngs)


def foreign_codes(up: dict[str, str], folder: Path, **changes) -> str:
    """A code dataset (its codes.json is what evaluate checks) like the upstream one, with ``changes``."""
    meta = json.loads((Path(up["encode"]) / "codes.json").read_text())
    folder.mkdir(parents=True)
    write_json(str(folder / "codes.json"), CodeMeta.from_json({**meta, **changes}).to_dict())
    return str(folder)


def swapped_prior(up: dict[str, str], folder: Path, name: str, model: torch.nn.Module, **extra) -> str:
    """A copy of the upstream priors with ``name``.pt replaced by ``model`` saved with ``extra``."""
    folder.mkdir(parents=True)
    for level in ("top", "bottom"):
        (folder / f"{level}.pt").write_bytes((Path(up["train_prior"]) / f"{level}.pt").read_bytes())
    save_checkpoint(folder / f"{name}.pt", model, **extra)
    return str(folder)


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
        r"\(expected by the VQ-VAE {model}\); rerun the encode step",
    ),
    "codebook": (
        lambda up, d: {"encode": foreign_codes(up, d, codebook_size={"top": 512, "bottom": 512})},
        CodeDatasetMismatch,
        r"code dataset {encode}: field 'codebook_size\.top' mismatch: expected 16, found 512",
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
                PixelCNNPrior(PriorConfig(num_codes=16, shape=(8, 8), channels=8, layers=1)),
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
                up, d, "top", PixelCNNPrior(PriorConfig(num_codes=16, shape=(8, 8), channels=8, layers=1))
            )
        },
        CheckpointError,
        r"{train_prior}/top\.pt models 16 codes on a \[8, 8\] map, but the code dataset {encode} has 16 codes on a "
        r"\[4, 4\] map at level 'top'",
    ),
    "prior_kind": (
        lambda up, d: {"train_prior": swapped_prior(up, d, "top", VAE(VAEConfig(**SMALL, latent_channels=4)))},
        CheckpointError,
        r"{train_prior}/top\.pt: checkpoint holds a 'vae' model, expected 'prior'",
    ),
    "model_kind": (
        lambda up, d: {"train_vqvae": swapped_prior(up, d, "model", PixelCNNPrior(PriorConfig(num_codes=16)))},
        CheckpointError,
        r"{model}: checkpoint holds a 'prior' model, expected 'vqvae2' or 'vqvae' or 'vae'",
    ),
    "prior_missing": (
        lambda up, d: {"train_prior": str(d)},
        MissingInputError,
        r"{train_prior}/top\.pt does not exist: the code dataset {encode} has levels \['top', 'bottom'\]",
    ),
}


@pytest.mark.parametrize("case", sorted(FOREIGN))
def test_codes_and_priors_of_another_vqvae_are_refused_before_any_work(upstream, tmp_path, monkeypatch, case):
    """In-process, so the work functions can be replaced by tripwires: the checks run before any of them."""
    make, error, pattern = FOREIGN[case]
    ins = {**inputs(upstream, *ALL), **make(upstream, tmp_path / "foreign")}

    def work(*args, **kwargs):
        raise AssertionError("evaluate started work before checking its inputs")

    for name in ("real_images", "reconstruction", "code_metrics", "sample_images", "features"):
        monkeypatch.setattr(evaluate, name, work)
    names = {k: re.escape(v) for k, v in ins.items()} | {"model": re.escape(f"{ins['train_vqvae']}/model.pt")}
    with pytest.raises(error, match=pattern.format(**names)):
        evaluate.evaluate(QUICK, ins, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_foreign_code_dataset_fails_the_step_and_writes_nothing(ray_local, upstream, tmp_path):
    """Through run() and its Ray task: the error names the code dataset and the field; the output stays empty."""
    foreign = foreign_codes(upstream, tmp_path / "other_encode", codebook_size={"top": 512, "bottom": 512})
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(CodeDatasetMismatch, match=rf"code dataset {re.escape(foreign)}: field 'codebook_size\.top'"):
        run(QUICK, {**inputs(upstream, *ALL), "encode": foreign}, str(out))
    assert list(out.iterdir()) == []


def test_missing_inputs_and_extras_fail_clearly(ray_local, upstream, tmp_path):
    with pytest.raises(MissingInputError, match="run the sample step first"):
        run(QUICK, inputs(upstream, "shard", "train_vqvae"), str(tmp_path / "out"))
    with pytest.raises(FileNotFoundError, match="the sample output"):
        run(QUICK, {**inputs(upstream, *ALL), "sample": str(tmp_path / "nowhere")}, str(tmp_path / "out"))
    if evaluate.importlib.util.find_spec("torch_fidelity") is None:
        from dataclasses import replace

        with pytest.raises(ImportError, match=r"vqvae2-pipeline\[fid\]"):
            run(replace(QUICK, inception_fid=True), inputs(upstream, *ALL), str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out" / "metrics.json")


@pytest.mark.parametrize(
    "kwargs,key",
    [({"max_val_images": 2}, "max_val_images"), ({"knn_k": 0}, "knn_k"), ({"use_gpu": "yes"}, "use_gpu")],
)
def test_config_errors_name_the_key(kwargs, key):
    with pytest.raises(ValueError, match=rf"evaluate\.{key}"):
        EvaluateConfig(**kwargs)


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
