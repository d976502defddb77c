"""The sample step on local Ray with tiny untrained models: artifacts, determinism, conditioning, the cached sampler,
sampling controls, classifier-based rejection, clear errors."""

from __future__ import annotations

import io
import json
import logging
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from steps.artifacts.autoencoder import Autoencoder
from steps.artifacts.code_format import CodeMeta, code_schema, schema_code_meta
from steps.artifacts.priors import Priors
from steps.artifacts.samples import Samples
from steps.core.step import MissingInputError
from steps.generation.generator import sample_seed
from steps.nn import registry
from steps.nn.checkpoint import CheckpointError, load_model, save_checkpoint
from steps.nn.classifier import ClassifierConfig, ImageClassifier
from steps.nn.pixelcnn import PixelCNNConfig
from steps.nn.sampler import CachedSampler
from steps.sample import run
from steps.train_classifier import TrainClassifierConfig
from steps.train_classifier import train as train_classifier

TOP = PixelCNNConfig(num_codes=32, shape=(4, 4), channels=16, layers=2, attn_heads=2, dropout=0.0)
BOTTOM = PixelCNNConfig(
    num_codes=32, shape=(8, 8), channels=16, layers=2, cond_num_codes=32, cond_shape=(4, 4), dropout=0.0
)


def save_model(artifacts, folder: Path, model: torch.nn.Module) -> str:
    """A train_vqvae output holding ``model``; returns its digest."""
    return Autoencoder.open(artifacts.autoencoder(folder, model)).digest


@pytest.fixture(scope="module")
def vq2(tmp_path_factory, artifacts) -> dict[str, str]:
    """A two-level VQ-VAE and unconditional top / bottom priors trained (nominally) on its codes."""
    root = tmp_path_factory.mktemp("vq2")
    d = save_model(artifacts, root / "vqvae", artifacts.small_vqvae2())
    return {
        "train_vqvae": str(root / "vqvae"),
        "train_prior": artifacts.priors(root / "prior", d, top=TOP, bottom=BOTTOM),
        "digest": d,
    }


@pytest.fixture(scope="module")
def base_run(ray_local, vq2, tmp_path_factory, tiny):
    """3 shards (the last one short) over 2 actors; the grid covers the first two shards."""
    cfg = tiny.sample(num_samples=10, shard_size=4, grid_size=6, num_actors=2)
    out = tmp_path_factory.mktemp("base") / "out"
    result = run(cfg, inputs_of(vq2), str(out))
    return cfg, out, result


def inputs_of(fixture: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in fixture.items() if k in ("train_vqvae", "train_prior")}


def pngs(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "images").glob("*.png"))}


def grid_side(n: int, size: int, pad: int = 2) -> tuple[int, int]:
    """(width, height) of steps.io.pixels.grid_png for n images of side size."""
    nrow = math.ceil(math.sqrt(n))
    return nrow * (size + pad) + pad, math.ceil(n / nrow) * (size + pad) + pad


def image(path: Path) -> Image.Image:
    return Image.open(io.BytesIO(path.read_bytes()))


# ------------------------------------------------------------------------------------------------ two levels
def test_writes_images_codes_grid_and_metadata(base_run, vq2, read_four_ways):
    _, out, result = base_run
    assert sorted(pngs(out)) == [f"{i:06d}.png" for i in range(10)]
    first = image(out / "images" / "000000.png")
    assert first.size == (32, 32) and first.mode == "L"
    grid = image(out / "grid.png")
    assert grid.size == grid_side(6, 32) and grid.mode == "L"
    tiles = np.asarray(grid)
    for i in range(6):  # in sample order, whichever actor drew them
        y, x = (2 + 34 * k for k in divmod(i, 3))
        assert np.array_equal(tiles[y : y + 32, x : x + 32], np.asarray(image(out / "images" / f"{i:06d}.png")))

    assert sorted(p.name for p in (out / "codes").iterdir()) == [f"part-{k:05d}.parquet" for k in range(3)]
    table = pq.read_table(out / "codes").sort_by("id")
    assert table.num_rows == 10
    assert table.column("id").to_pylist() == [f"sample-{i:06d}" for i in range(10)]
    assert table.column("label").null_count == 10
    assert table.column("seed").to_pylist() == [sample_seed(0, i) for i in range(10)]
    for level, size in (("top", 16), ("bottom", 64)):
        kind = table.schema.field(level).type
        assert pa.types.is_fixed_size_list(kind) and kind.list_size == size and kind.value_type == pa.int16()
        codes = np.array(table.column(level).to_pylist())
        assert codes.min() >= 0 and codes.max() < 32
    # The codes folder alone is the dataset (PNGs and JSON live beside it, never in it); it has no split.
    assert Samples.open(str(out)).codes_uri == str(out / "codes")
    for reader, seen in read_four_ways(str(out / "codes")).items():
        assert seen == {"columns": table.column_names, "rows": {None: 10}}, reader
    # The code dataset's format: the same schema and metadata, the sample's own columns after the levels.
    meta = schema_code_meta(table.schema)
    assert meta == CodeMeta.of(Autoencoder.open(vq2["train_vqvae"]))
    assert meta.shapes == {"top": (4, 4), "bottom": (8, 8)} and meta.codebook_size == {"top": 32, "bottom": 32}
    code_schema_fields = list(code_schema(meta))
    assert list(table.schema)[: len(code_schema_fields)] == code_schema_fields and table.column_names[-1] == "seed"

    info = json.loads((out / "samples.json").read_text())
    assert info["num_samples"] == 10 and info["num_shards"] == 3 and info["vqvae"] == vq2["digest"]
    assert info["labels"] is None and info["shapes"] == {"top": [4, 4], "bottom": [8, 8]}
    priors = Priors.open(vq2["train_prior"])
    assert info["priors"] == {lv: priors.checkpoint(lv).digest for lv in ("top", "bottom")}
    assert info["samples_per_s"] > 0
    assert result.metrics["num_samples"] == 10 and result.metrics["samples_per_s"] > 0
    assert result.artifacts == {
        "grid": str(out / "grid.png"),
        "images": str(out / "images"),
        "codes": str(out / "codes"),
        "metadata": str(out / "samples.json"),
    }


def test_same_config_gives_same_samples_on_any_number_of_actors(base_run, vq2, tmp_path):
    cfg, first, _ = base_run
    out = tmp_path / "out"
    (out / "images").mkdir(parents=True)
    (out / "images" / "999999.png").write_bytes(b"left over by a crashed attempt")
    run(replace(cfg, num_actors=1), inputs_of(vq2), str(out))
    assert pngs(out) == pngs(first)
    assert (out / "grid.png").read_bytes() == (first / "grid.png").read_bytes()
    assert pq.read_table(out / "codes").sort_by("id").equals(pq.read_table(first / "codes").sort_by("id"))


def test_an_interrupted_run_resumes_with_the_shards_it_finished(base_run, vq2, tmp_path, caplog):
    """The state a killed driver leaves: shards 0 and 2 finished (their records written), shard 1 wrote its codes
    but no record, no grid or samples.json. The rerun keeps shard 2's files untouched, redraws shard 1 (and the
    grid's shard 0), and ends identical to an uninterrupted run; other settings start over."""
    import shutil

    cfg, first, _ = base_run
    out = tmp_path / "out"
    shutil.copytree(first, out)
    for name in ("shards/part-00001.json", "grid.png", "samples.json", "images/000005.png"):
        (out / name).unlink()
    kept = {p: p.stat().st_mtime_ns for p in [out / "codes/part-00002.parquet", out / "images/000009.png"]}
    with caplog.at_level(logging.INFO, logger="steps.sample"):
        result = run(replace(cfg, num_actors=1), inputs_of(vq2), str(out))
    assert "resuming: 2 of 3 shards were already written" in caplog.text
    assert result.info["resumed_shards"] == 1, "shard 2 kept; shard 0 redrawn for the grid"
    assert {p: p.stat().st_mtime_ns for p in kept} == kept
    assert pngs(out) == pngs(first)
    assert (out / "grid.png").read_bytes() == (first / "grid.png").read_bytes()
    assert pq.read_table(out / "codes").sort_by("id").equals(pq.read_table(first / "codes").sort_by("id"))
    assert json.loads((out / "samples.json").read_text())["resumed_shards"] == 1

    (out / "samples.json").unlink()
    result = run(replace(cfg, seed=7, num_actors=1), inputs_of(vq2), str(out))
    assert result.info["resumed_shards"] == 0, "other settings: nothing is reused"
    assert pngs(out) != pngs(first)


def test_another_seed_gives_other_codes(base_run, vq2, tmp_path):
    cfg, first, _ = base_run
    run(replace(cfg, seed=1, num_actors=1, num_samples=4), inputs_of(vq2), str(tmp_path))
    ours = pq.read_table(tmp_path / "codes").sort_by("id")
    theirs = pq.read_table(first / "codes").sort_by("id").slice(0, 4)
    assert ours.column("top").to_pylist() != theirs.column("top").to_pylist()
    assert ours.column("seed").to_pylist() == [sample_seed(1, i) for i in range(4)]


def test_codes_come_from_the_cached_sampler_with_a_seed_per_sample(base_run, vq2):
    """Sample i is reproducible on its own: its seed column, one CPU generator, top then bottom from it."""
    _, out, _ = base_run
    table = pq.read_table(out / "codes").sort_by("id")
    priors = {lv: Priors.open(vq2["train_prior"]).load(lv) for lv in ("top", "bottom")}
    gens = [torch.Generator().manual_seed(s) for s in table.column("seed").to_pylist()[:4]]  # shard 0
    top = CachedSampler(priors["top"]).sample(4, generator=gens)
    bottom = CachedSampler(priors["bottom"]).sample(4, cond=top, generator=gens)  # the same streams, continued
    assert table.column("top").to_pylist()[:4] == top.flatten(1).tolist()
    assert table.column("bottom").to_pylist()[:4] == bottom.flatten(1).tolist()
    info = json.loads((out / "samples.json").read_text())
    assert info["sampler"] == "cached" and info["top_k"] == 0 and info["top_p"] == 1.0
    assert info["cache_bytes"]["top"] > 0 and info["cache_bytes"]["bottom"] > 0


def test_top_k_1_is_greedy_whatever_the_seed(ray_local, vq2, tmp_path, tiny):
    cfg = tiny.sample(num_samples=4, shard_size=2, num_actors=1, top_k=1, write_pngs=False)
    result = run(cfg, inputs_of(vq2), str(tmp_path / "greedy"))
    table = pq.read_table(tmp_path / "greedy" / "codes")
    assert len({tuple(c) for c in table.column("top").to_pylist()}) == 1  # unconditional prior: one greedy map
    assert len({tuple(c) for c in table.column("bottom").to_pylist()}) == 1
    assert result.metrics["num_samples"] == 4 and "acceptance_rate" not in result.metrics
    run(replace(cfg, top_k=0, top_p=0.5), inputs_of(vq2), str(tmp_path / "nucleus"))
    info = json.loads((tmp_path / "nucleus" / "samples.json").read_text())
    assert info["top_p"] == 0.5 and info["config"]["top_p"] == 0.5


# ------------------------------------------------------------------------------------------------ other models
@pytest.fixture(scope="module")
def conditional(vq2, tmp_path_factory, artifacts) -> dict[str, str]:
    root = tmp_path_factory.mktemp("cond")
    top, bottom = replace(TOP, num_classes=3), replace(BOTTOM, num_classes=3)
    return {**vq2, "train_prior": artifacts.priors(root, vq2["digest"], top=top, bottom=bottom)}


def test_class_conditional_priors_cycle_the_labels(ray_local, conditional, tmp_path, tiny):
    cfg = tiny.sample(num_samples=5, shard_size=3, labels=[2, 0], num_actors=1)
    run(cfg, inputs_of(conditional), str(tmp_path / "given"))
    table = pq.read_table(tmp_path / "given" / "codes").sort_by("id")
    assert table.column("label").to_pylist() == [2, 0, 2, 0, 2]
    assert json.loads((tmp_path / "given" / "samples.json").read_text())["labels"] == [2, 0]

    # Without labels every class takes its turn; without PNGs only the grid shows the images.
    result = run(
        tiny.sample(num_samples=4, shard_size=4, num_actors=1, write_pngs=False),
        inputs_of(conditional),
        str(tmp_path / "default"),
    )
    assert pq.read_table(tmp_path / "default" / "codes").sort_by("id").column("label").to_pylist() == [0, 1, 2, 0]
    assert not (tmp_path / "default" / "images").exists() and "images" not in result.artifacts
    # The grid has one column per class (whole rows only: 4 samples of 3 classes make one row of 3).
    assert image(tmp_path / "default" / "grid.png").size == (3 * 34 + 2, 34 + 2)
    assert json.loads((tmp_path / "default" / "samples.json").read_text())["grid_columns"] == [0, 1, 2]


def test_one_level_vqvae(ray_local, tmp_path, tiny, artifacts):
    torch.manual_seed(0)
    model = registry.build(tiny(*tiny.SMALL, "model=vqvae", "model.downsample=8").train_vqvae.model)
    d = save_model(artifacts, tmp_path / "vqvae", model)
    inputs = {"train_vqvae": str(tmp_path / "vqvae"), "train_prior": artifacts.priors(tmp_path / "prior", d, top=TOP)}
    result = run(tiny.sample(num_samples=3, shard_size=2, num_actors=1), inputs, str(tmp_path / "out"))
    table = pq.read_table(tmp_path / "out" / "codes")
    assert table.column_names == ["id", "label", "top", "seed"] and table.num_rows == 3
    assert len(pngs(tmp_path / "out")) == 3
    assert image(tmp_path / "out" / "grid.png").size == grid_side(3, 32)  # grid_size 64 > num_samples
    assert result.artifacts["codes"] == str(tmp_path / "out" / "codes")


# ------------------------------------------------------------------------------------------------ rejection
@pytest.fixture(scope="module")
def digits_classifier(digit_shards, tmp_path_factory) -> tuple[str, dict]:
    """A tiny classifier trained by steps.train_classifier on the bundled digits (10 classes, 1 x 32 x 32)."""
    path = tmp_path_factory.mktemp("classifier") / "classifier.pt"
    metrics = train_classifier(
        TrainClassifierConfig(steps=120, batch_size=32, channels=8, threads=1), digit_shards, str(path)
    )
    return str(path), metrics


@pytest.fixture(scope="module")
def ten_classes(vq2, tmp_path_factory, artifacts) -> dict[str, str]:
    root = tmp_path_factory.mktemp("ten")
    top, bottom = replace(TOP, num_classes=10), replace(BOTTOM, num_classes=10)
    return {**vq2, "train_prior": artifacts.priors(root, vq2["digest"], top=top, bottom=bottom)}


def test_train_classifier_on_image_shards(digits_classifier):
    path, metrics = digits_classifier
    model, payload = load_model(path, expect="classifier")
    assert isinstance(model, ImageClassifier) and model.config.num_classes == 10
    assert model.config.image_size == 32 and model.config.in_channels == 1
    assert metrics["train_images"] + metrics["val_images"] == 240 and payload["metrics"] == metrics
    assert metrics["val_accuracy"] > 0.5  # chance is 0.1; 120 tiny steps beat it clearly


def test_classifier_rejection(ray_local, ten_classes, digits_classifier, tmp_path, caplog, tiny):
    path, _ = digits_classifier
    base = tiny.sample(num_samples=6, shard_size=4, num_actors=2, classifier=path, max_attempts=3)
    run(base, inputs_of(ten_classes), str(tmp_path / "all"))  # threshold 0: every first draw passes
    first = pq.read_table(tmp_path / "all" / "codes").sort_by("id")
    assert first.column("attempt").to_pylist() == [0] * 6 and all(first.column("accepted").to_pylist())
    probs = first.column("class_prob").to_pylist()
    threshold = float(np.median(probs))  # about half the first draws fail: they are redrawn

    cfg = replace(base, reject_threshold=threshold)
    with caplog.at_level(logging.INFO, logger="steps.sample"):
        result = run(cfg, inputs_of(ten_classes), str(tmp_path / "some"))
    assert any("acceptance" in r.getMessage() and "2/2 shards" in r.getMessage() for r in caplog.records)
    table = pq.read_table(tmp_path / "some" / "codes").sort_by("id")
    rows = table.to_pylist()
    classifier = load_model(path, expect="classifier")[0]
    for i, row in enumerate(rows):
        assert row["seed"] == sample_seed(0, i, row["attempt"])
        assert row["accepted"] == (row["class_prob"] >= threshold)
        if probs[i] >= threshold:  # the same first draw as with threshold 0, kept
            assert row["attempt"] == 0 and row["top"] == first.column("top")[i].as_py()
        else:
            assert row["attempt"] > 0 or not row["accepted"]
        pixels = np.asarray(image(tmp_path / "some" / "images" / f"{i:06d}.png"), dtype=np.float32)
        x = torch.from_numpy(pixels / 127.5 - 1.0)[None, None]  # the written PNG, re-read
        prob = classifier.class_probability(x, torch.tensor([row["label"]])).item()
        assert prob == pytest.approx(row["class_prob"], abs=1e-4)
    info = json.loads((tmp_path / "some" / "samples.json").read_text())
    draws = info["draws"]
    assert draws > 6 and info["accepted"] == sum(r["accepted"] for r in rows)
    assert result.metrics["acceptance_rate"] == pytest.approx(info["accepted"] / draws) == info["acceptance_rate"]
    assert result.metrics["draws_per_sample"] == pytest.approx(draws / 6)
    assert info["failed_samples"] == result.metrics["failed_samples"] == 6 - info["accepted"]
    assert info["reject_threshold"] == threshold and len(info["classifier"]) == 16

    # Rejection is as deterministic as plain sampling: another actor count gives the same bytes.
    run(replace(cfg, num_actors=1), inputs_of(ten_classes), str(tmp_path / "again"))
    assert pngs(tmp_path / "again") == pngs(tmp_path / "some")
    assert pq.read_table(tmp_path / "again" / "codes").sort_by("id").equals(table)


def test_rejection_needs_a_fitting_classifier(vq2, conditional, digits_classifier, tmp_path, tiny):
    path, _ = digits_classifier
    expect_error(
        tiny, ValueError, "priors are not class-conditional", inputs_of(vq2), tmp_path / "out1", classifier=path
    )
    expect_error(
        tiny,
        CheckpointError,
        "10 classes, but the models make 1x32x32 images of 3 classes",
        inputs_of(conditional),
        tmp_path / "out2",
        classifier=path,
    )
    wrong = tmp_path / "rgb.pt"
    save_checkpoint(wrong, ImageClassifier(ClassifierConfig(image_size=32, in_channels=3, num_classes=3)))
    expect_error(
        tiny, CheckpointError, "takes 3x32x32 images", inputs_of(conditional), tmp_path / "out3", classifier=str(wrong)
    )
    expect_error(
        tiny,
        MissingInputError,
        "does not exist: sample.classifier",
        inputs_of(conditional),
        tmp_path / "out4",
        classifier=str(tmp_path / "none.pt"),
    )
    expect_error(
        tiny,
        CheckpointError,
        "holds a 'pixelcnn' model, but sample.classifier",
        inputs_of(conditional),
        tmp_path / "out5",
        classifier=str(Path(conditional["train_prior"]) / "top.pt"),
    )


def test_vae_decodes_gaussian_draws(ray_local, tmp_path, tiny, artifacts):
    torch.manual_seed(0)
    vae = registry.build(tiny("model=vae", "data.channels=3", "model.latent_channels=4").train_vqvae.model)
    save_model(artifacts, tmp_path / "vae", vae)
    cfg = tiny.sample(num_samples=5, shard_size=2, grid_size=4, num_actors=1)
    result = run(cfg, {"train_vqvae": str(tmp_path / "vae")}, str(tmp_path / "out"))
    out = tmp_path / "out"
    assert len(pngs(out)) == 5 and image(out / "images" / "000004.png").mode == "RGB"
    grid = image(out / "grid.png")
    assert grid.size == grid_side(4, 32) and grid.mode == "RGB"
    assert not (out / "codes").exists() and "codes" not in result.artifacts
    assert json.loads((out / "samples.json").read_text())["kind"] == "vae"
    match = "sample.classifier given, but .* holds a vae, which is not class-conditional"
    expect_error(tiny, ValueError, match, {"train_vqvae": str(tmp_path / "vae")}, tmp_path / "out2", classifier="c.pt")


# ------------------------------------------------------------------------------------------------ clear errors
def expect_error(tiny, exc: type[Exception], match: str, inputs: dict[str, str], out: Path, **cfg) -> None:
    """run() fails with ``exc`` before it touches ``out``."""
    out.mkdir()
    (out / "keep").write_text("x")
    with pytest.raises(exc, match=match):
        run(tiny.sample(**cfg), inputs, str(out))
    assert [p.name for p in out.iterdir()] == ["keep"]


def test_priors_of_another_vqvae_are_refused(vq2, tmp_path, artifacts, tiny):
    prior = artifacts.priors(tmp_path / "prior", "0" * 16, top=TOP, bottom=BOTTOM)
    match = f"top prior was trained on codes of VQ-VAE 0{{16}}, but .*model.pt is {vq2['digest']}; rerun train_prior"
    expect_error(tiny, CheckpointError, match, {**inputs_of(vq2), "train_prior": prior}, tmp_path / "out")


def test_prior_shape_and_level_mismatches_are_refused(vq2, tmp_path, artifacts, tiny):
    prior = artifacts.priors(tmp_path / "shape", vq2["digest"], top=replace(TOP, shape=(8, 8)), bottom=BOTTOM)
    match = r"top\.pt models 32 codes on a \[8, 8\] map, but .*model\.pt has 32 codes on a \[4, 4\] map"
    expect_error(tiny, CheckpointError, match, {**inputs_of(vq2), "train_prior": prior}, tmp_path / "out1")

    prior = artifacts.priors(tmp_path / "codes", vq2["digest"], top=TOP, bottom=replace(BOTTOM, num_codes=16))
    expect_error(
        tiny,
        CheckpointError,
        r"bottom\.pt models 16 codes",
        {**inputs_of(vq2), "train_prior": prior},
        tmp_path / "out2",
    )

    prior = artifacts.priors(tmp_path / "cond", vq2["digest"], top=TOP, bottom=replace(BOTTOM, cond_num_codes=0))
    expect_error(
        tiny,
        CheckpointError,
        r"bottom\.pt is conditioned on 0 codes",
        {**inputs_of(vq2), "train_prior": prior},
        tmp_path / "out3",
    )

    prior = Path(artifacts.priors(tmp_path / "level", vq2["digest"], top=TOP, bottom=BOTTOM))
    (prior / "top.pt").write_bytes((prior / "bottom.pt").read_bytes())
    match = r"top\.pt holds a prior for level 'bottom', expected 'top'"
    expect_error(tiny, CheckpointError, match, {**inputs_of(vq2), "train_prior": str(prior)}, tmp_path / "out4")

    (prior / "top.pt").unlink()
    match = r"top\.pt does not exist.*rerun train_prior"
    expect_error(tiny, MissingInputError, match, {**inputs_of(vq2), "train_prior": str(prior)}, tmp_path / "out5")


def test_labels_must_fit_the_priors(vq2, conditional, tmp_path, tiny):
    expect_error(
        tiny,
        ValueError,
        "sample.labels given, but the priors are not class-conditional",
        inputs_of(vq2),
        tmp_path / "out1",
        labels=[0],
    )
    expect_error(
        tiny, ValueError, r"sample.labels must be in \[0, 3\)", inputs_of(conditional), tmp_path / "out2", labels=[1, 3]
    )


def test_missing_inputs_name_the_step_to_run(vq2, tmp_path, tiny):
    expect_error(
        tiny,
        MissingInputError,
        "run the train_prior step first",
        {"train_vqvae": vq2["train_vqvae"]},
        tmp_path / "out1",
    )
    expect_error(
        tiny,
        MissingInputError,
        "run the train_vqvae step first",
        {"train_prior": vq2["train_prior"]},
        tmp_path / "out2",
    )
