"""The generator as a product: the Python API (the sample step's images, encode/decode, clear errors), the MLflow
generator and encoder models (log, register, load, predict, complete images, over the JSON REST form too), Ray Serve's
batching of requests (without Ray), and the alias policy."""

from __future__ import annotations

import base64
import json
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline import Generator
from pipeline.serving.generator import pixels_of_base64
from steps.artifacts import records
from steps.artifacts.autoencoder import Autoencoder
from steps.core.step import MissingInputError
from steps.io import storage
from steps.io.pixels import encode_png, hwc
from steps.nn.checkpoint import CheckpointError
from steps.nn.pixelcnn import PixelCNNConfig
from steps.sample import run as sample_run

TOP = PixelCNNConfig(num_codes=32, shape=(4, 4), channels=16, layers=2, attn_heads=2, dropout=0.0, num_classes=3)
BOTTOM = PixelCNNConfig(
    num_codes=32, shape=(8, 8), channels=16, layers=2, cond_num_codes=32, cond_shape=(4, 4), dropout=0.0, num_classes=3
)


@pytest.fixture(scope="module")
def outputs(tmp_path_factory, artifacts) -> dict[str, str]:
    """A VQ-VAE-2 and class-conditional priors as the pipeline writes them, with the run records that link them."""
    root = tmp_path_factory.mktemp("generator")
    vq = artifacts.autoencoder(root / "train_vqvae" / "v1", artifacts.small_vqvae2())
    digest = Autoencoder.open(vq).digest
    priors = artifacts.priors(root / "train_prior" / "p1", digest, top=TOP, bottom=BOTTOM)
    encode = root / "encode" / "e1"
    encode.mkdir(parents=True)
    storage.write_json(str(encode / records.SUCCESS), {"step": "encode", "inputs": {"train_vqvae": vq}})
    storage.write_json(str(root / "train_prior" / "p1" / records.SUCCESS), {"inputs": {"encode": str(encode)}})
    return {"train_vqvae": vq, "train_prior": priors}


@pytest.fixture(scope="module")
def gen(outputs) -> Generator:
    return Generator.load(outputs["train_prior"], device="cpu")


def test_generate_is_the_sample_step(ray_local, outputs, gen, tmp_path, tiny):
    """Image i of generate(n, seed=s) is image i of the sample step with sample.seed=s, byte for byte."""
    cfg = tiny.sample(num_samples=8, shard_size=4, seed=5, num_actors=1, temperature=0.8)
    sample_run(cfg, outputs, str(tmp_path / "out"))
    images = gen.generate(4, temperature=0.8, seed=5, offset=4)  # the second shard: labels cycle from index 4
    assert images.dtype == torch.uint8 and tuple(images.shape) == (4, 1, 32, 32)
    for i, pixels in enumerate(hwc(images.numpy())):
        assert (tmp_path / "out" / "images" / f"{4 + i:06d}.png").read_bytes() == encode_png(pixels)
    again = gen.generate(2, labels=[1, 2], temperature=0.8, seed=5, offset=4)
    assert torch.equal(again[1], images[1]), "the label of index 5 cycles to 2"
    assert not torch.equal(gen.generate(1, seed=6), gen.generate(1, seed=5)), "another seed, another image"


def test_encode_and_decode(gen):
    images = gen.generate(3, labels=0, seed=1)
    codes = gen.encode(images)
    assert set(codes) == {"top", "bottom"} and tuple(codes["top"].shape) == (3, 4, 4)
    pngs = [encode_png(p) for p in hwc(images.numpy())]
    assert all(torch.equal(a, b) for a, b in zip(gen.encode(pngs).values(), codes.values(), strict=True))
    decoded = gen.decode(codes)
    with torch.no_grad():
        x = images.float() / 127.5 - 1.0
        want = gen.model(x).recon.clamp(-1, 1)
    assert torch.equal(decoded, ((want + 1) * 127.5).round().byte()), "decode(encode(x)) is the reconstruction"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n": 0}, "n must be an int in"),
        ({"n": 10**7}, "n must be an int in"),
        ({"n": 2, "labels": [0, 3]}, r"labels must be in \[0, 3\)"),
        ({"n": 2, "labels": [0]}, "one per image"),
        ({"n": 1, "temperature": 0.0}, "temperature must be > 0"),
        ({"n": 1, "top_p": 1.5}, "top_p must be in"),
        ({"n": 1, "top_k": -1}, "top_k must be an int"),
        ({"n": 1, "seed": -1}, "seed must be an int"),
        ({"n": 1, "guidance_scale": -1.0}, "guidance_scale must be a finite number >= 0"),
        ({"n": 1, "guidance_scale": 2.0}, r"needs class-conditional priors trained with class_dropout > 0 \(prior"),
    ],
)
def test_bad_requests_name_the_field(gen, kwargs, message):
    with pytest.raises(ValueError, match=message):
        gen.generate(**kwargs)


def test_a_sample_output_loads_the_models_that_made_it(outputs, gen, tmp_path):
    """A sample (or evaluate) output's record names its decoder and priors: loading it gives those models."""
    folder = tmp_path / "sample" / "s1"
    folder.mkdir(parents=True)
    storage.write_json(str(folder / records.SUCCESS), {"step": "sample", "inputs": dict(outputs)})
    loaded = Generator.load(str(folder), device="cpu")
    assert loaded.autoencoder.digest == gen.autoencoder.digest and loaded.priors.uri == gen.priors.uri
    assert torch.equal(loaded.generate(2, seed=3), gen.generate(2, seed=3))
    gone = tmp_path / "sample" / "s2"
    gone.mkdir()
    record = {"step": "sample", "inputs": {"train_prior": outputs["train_prior"]}}  # no decoder named
    storage.write_json(str(gone / records.SUCCESS), record)
    with pytest.raises(MissingInputError, match="train_vqvae"):
        Generator.load(str(gone))


def test_bad_sources_and_mismatched_models(outputs, artifacts, tmp_path):
    with pytest.raises(MissingInputError, match="no generator at"):
        Generator.load(str(tmp_path / "nowhere"))
    lonely = artifacts.priors(tmp_path / "lonely", "0" * 16, top=TOP, bottom=BOTTOM)
    with pytest.raises(
        MissingInputError,
        match="cannot find the autoencoder of .*lonely: its run record does not lead to a train_vqvae output",
    ):
        Generator.load(lonely)
    with pytest.raises(CheckpointError, match="trained on codes of VQ-VAE 0{16}"):
        Generator.from_artifacts(outputs["train_vqvae"], lonely)
    only_vq = Generator.load(outputs["train_vqvae"])  # a VQ-VAE alone encodes and decodes, but draws nothing
    zeros = {"top": torch.zeros(1, 4, 4, dtype=torch.long), "bottom": torch.zeros(1, 8, 8, dtype=torch.long)}
    assert not only_vq.can_generate and set(only_vq.encode(only_vq.decode(zeros))) == {"top", "bottom"}
    with pytest.raises(ValueError, match="has no priors"):
        only_vq.generate(1)
    unconditional = artifacts.priors(
        tmp_path / "uncond",
        Autoencoder.open(outputs["train_vqvae"]).digest,
        top=replace(TOP, num_classes=0),
        bottom=replace(BOTTOM, num_classes=0),
    )
    with pytest.raises(ValueError, match="not class-conditional"):
        Generator.from_artifacts(outputs["train_vqvae"], unconditional).generate(1, labels=[0])


def test_guidance_with_transformer_priors(outputs, artifacts, tmp_path):
    """Transformer priors trained with class_dropout: guided images differ from plain ones, scale 1 is plain, and the
    generator is deterministic per seed either way."""
    from steps.nn.transformer import TransformerConfig

    shared = dict(num_codes=32, channels=16, layers=2, heads=2, dropout=0.0, num_classes=3, class_dropout=0.1)
    priors = artifacts.priors(
        tmp_path / "transformer",
        Autoencoder.open(outputs["train_vqvae"]).digest,
        top=TransformerConfig(shape=(4, 4), **shared),
        bottom=TransformerConfig(shape=(8, 8), cond_num_codes=32, cond_shape=(4, 4), cond_channels=8, **shared),
    )
    gen = Generator.from_artifacts(outputs["train_vqvae"], priors)
    for level in ("top", "bottom"):  # classes that matter, so that guidance visibly changes the draws
        torch.nn.init.normal_(gen._images.samplers[level].model.start.weight)
    plain = gen.generate(4, labels=1, seed=3)
    assert torch.equal(gen.generate(4, labels=1, seed=3, guidance_scale=1.0), plain)
    guided = gen.generate(4, labels=1, seed=3, guidance_scale=3.0)
    assert not torch.equal(guided, plain) and torch.equal(gen.generate(4, labels=1, seed=3, guidance_scale=3.0), guided)


# ------------------------------------------------------------------------------------------------ MLflow models
@pytest.fixture(scope="module")
def store(outputs, tmp_path_factory, monkeypatch_module):
    """A SQLite store holding the registered generator and encoder (alias "current")."""
    import mlflow

    from pipeline.serving import registration as models

    root = tmp_path_factory.mktemp("mlflow")
    monkeypatch_module.chdir(root)  # a SQLite store keeps artifacts under ./mlruns
    uri = f"sqlite:///{root / 'mlflow.db'}"
    monkeypatch_module.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("vqvae2")
    with mlflow.start_run() as run:
        registered = models.register("vqvae2", outputs["train_vqvae"], outputs["train_prior"], "v1/p1", "current",
                                     True, {"metric.fd_effnet": "12.5"})  # fmt: skip
    return {"uri": uri, "run_id": run.info.run_id, "registered": registered}


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def test_registered_generator_predicts_the_api_images(store, gen):
    import mlflow
    from mlflow.tracking import MlflowClient

    assert store["registered"] == {"generator": "models:/vqvae2-generator/1", "encoder": "models:/vqvae2-encoder/1"}
    version = MlflowClient().get_model_version_by_alias("vqvae2-generator", "current")
    assert version.tags["metric.fd_effnet"] == "12.5" and version.tags["fingerprints"] == "v1/p1"
    model = mlflow.pyfunc.load_model("models:/vqvae2-generator@current")
    assert {s.name for s in model.metadata.get_params_schema().params} == {
        "temperature",
        "top_k",
        "top_p",
        "guidance_scale",
        "keep_rows",
    }
    out = model.predict(pd.DataFrame([{"label": 2, "seed": 7}, {"label": 0, "seed": 8}]), params={"temperature": 0.9})
    assert list(out.columns) == ["png", "label", "seed", "top", "bottom"] and out["label"].tolist() == [2, 0]
    pixels = pixels_of_base64(out["png"].tolist(), 1)
    assert np.array_equal(pixels[0], gen.generate(1, labels=[2], seed=7, temperature=0.9)[0].numpy())
    assert np.array_equal(pixels[1], gen.generate(1, labels=[0], seed=8, temperature=0.9)[0].numpy())
    assert len(out["top"][0]) == 16 and len(out["bottom"][0]) == 64
    with pytest.raises(Exception, match="every row needs a label"):
        model.predict(pd.DataFrame([{"seed": 1}]))
    with pytest.raises(Exception, match=r"labels must be in \[0, 3\)"):
        model.predict(pd.DataFrame([{"label": 5, "seed": 1}]))
    with pytest.raises(Exception, match="temperature must be > 0"):
        model.predict(pd.DataFrame([{"label": 1, "seed": 1}]), params={"temperature": 0.0})
    with pytest.raises(Exception, match="needs class-conditional priors trained with class_dropout > 0"):
        model.predict(pd.DataFrame([{"label": 1, "seed": 1}]), params={"guidance_scale": 2.0})
    loaded = Generator.load("models:/vqvae2-generator@current")  # the Python API over the same model
    assert torch.equal(loaded.generate(2, seed=3), gen.generate(2, seed=3))
    with pytest.raises(MissingInputError, match="no MLflow model at models:/vqvae2-nothing@current"):
        Generator.load("models:/vqvae2-nothing@current")


def test_registered_generator_completes_images(store, gen, png_claiming):
    """A row with an image and the keep_rows param is Generator.complete of that image: its codes kept in the kept
    rows at every level, the rest drawn; the same over MLflow's JSON REST form, the image sent as base64."""
    import mlflow
    from mlflow.pyfunc.scoring_server import invocations

    model = mlflow.pyfunc.load_model("models:/vqvae2-generator@current")
    assert {c.name: c.required for c in model.metadata.get_input_schema().inputs}["image"] is False
    images = gen.generate(2, labels=[1, 2], seed=11)
    pngs = [encode_png(p) for p in hwc(images.numpy())]
    rows = pd.DataFrame([{"label": 0, "seed": 3, "image": pngs[0]}, {"label": 2, "seed": 4, "image": pngs[1]}])
    out = model.predict(rows, params={"keep_rows": 16, "temperature": 0.9})
    assert list(out.columns) == ["png", "label", "seed", "top", "bottom"]
    pixels = pixels_of_base64(out["png"].tolist(), 1)
    for i, (label, seed) in enumerate([(0, 3), (2, 4)]):
        want = gen.complete(images[i : i + 1], keep_rows=16, labels=[label], seed=seed, temperature=0.9)
        assert np.array_equal(pixels[i], want[0].numpy())
    codes = gen.encode(images)  # top codes span 8 image rows, bottom codes 4: 16 rows keep 2 and 4 code rows
    top, bottom = np.array(out["top"].tolist()).reshape(2, 4, 4), np.array(out["bottom"].tolist()).reshape(2, 8, 8)
    assert np.array_equal(top[:, :2], codes["top"][:, :2]) and np.array_equal(bottom[:, :4], codes["bottom"][:, :4])
    assert not np.array_equal(bottom, codes["bottom"]), "the rows below are drawn"
    whole = model.predict(rows, params={"keep_rows": 32})  # every row kept: the reconstructions
    assert np.array_equal(pixels_of_base64(whole["png"].tolist(), 1), gen.decode(codes).numpy())
    plain = model.predict(rows, params={"temperature": 0.9})  # keep_rows=0: the images are ignored
    assert plain["png"].tolist() == model.predict(rows[["label", "seed"]], params={"temperature": 0.9})["png"].tolist()
    as_text = rows.assign(image=[base64.b64encode(p).decode("ascii") for p in pngs])  # a Python caller's base64
    assert model.predict(as_text, params={"keep_rows": 16, "temperature": 0.9})["png"].tolist() == out["png"].tolist()

    # mlflow models serve: the JSON body as a client sends it, through the scoring server's request handler
    request = {"dataframe_records": as_text.to_dict("records"), "params": {"keep_rows": 16, "temperature": 0.9}}
    answer = invocations(json.dumps(request), "application/json", model, model.metadata.get_input_schema())
    assert answer.status == 200
    assert [r["png"] for r in json.loads(answer.response)["predictions"]] == out["png"].tolist()

    bad = [
        (rows[["label", "seed"]], {"keep_rows": 8}, r"row 0: keep_rows > 0 needs an image in every row"),
        (rows.assign(image=[pngs[0], None]), {"keep_rows": 8}, r"row 1: keep_rows > 0 needs an image in every row"),
        (rows, {"keep_rows": 33}, r"keep_rows must be an integer in \[0, 32\] \(image rows to keep\), got 33"),
        (rows, {"keep_rows": -1}, r"keep_rows must be an integer in \[0, 32\] \(image rows to keep\), got -1"),
        (rows.assign(image=[pngs[0], b"not an image"]), {"keep_rows": 8}, r"image 1: not an image file \(PNG, JPEG"),
        (rows.assign(image=[png_claiming(12000, 12000), pngs[1]]), {"keep_rows": 8},
         "image 0: 12000x12000 pixels by its header, but the model takes 32x32 images"),
        (rows.assign(image=["%% not base64", pngs[1]]), {"keep_rows": 8}, "row 0: image is not base64"),
    ]  # fmt: skip
    for frame, params, message in bad:
        with pytest.raises(Exception, match=message):
            model.predict(frame, params=params)
    request["dataframe_records"][1]["image"] = base64.b64encode(b"not an image").decode("ascii")
    with pytest.raises(Exception, match=r"image 1: not an image file") as refused:
        invocations(json.dumps(request), "application/json", model, model.metadata.get_input_schema())
    assert refused.value.get_http_status_code() == 400


def test_ray_serve_batches_completions_with_plain_draws(gen, png_claiming):
    """The replica's batch logic (without Ray): requests grouped by (controls, keep_rows), each answer the image of
    Generator.generate or Generator.complete, a bad image or control refusing only its own requests."""
    from pipeline.serving.ray_serve import BadRequest, draw_requests, parse

    images = gen.generate(2, labels=[1, 2], seed=11)
    b64 = [base64.b64encode(encode_png(p)).decode("ascii") for p in hwc(images.numpy())]
    damaged = base64.b64encode(encode_png(hwc(images.numpy())[0])[:-40]).decode("ascii")  # passes the header checks
    bodies = [
        {"seed": 7, "label": 2, "temperature": 0.9},
        {"seed": 3, "label": 0, "temperature": 0.9, "image": b64[0], "keep_rows": 16},
        {"seed": 4, "label": 2, "temperature": 0.9, "image": damaged, "keep_rows": 16},
        {"seed": 4, "label": 2, "temperature": 0.9, "image": b64[1], "keep_rows": 16},
        {"seed": 5, "label": 1, "image": b64[1], "keep_rows": 8},
        {"seed": 6, "label": 1, "guidance_scale": 2.0},
    ]
    answers = draw_requests(gen, [parse(b, gen.num_classes, image_size=32) for b in bodies])
    assert [size for _, size in answers] == [1, 2, 0, 2, 1, 0]
    want = [
        gen.generate(1, labels=[2], seed=7, temperature=0.9),
        gen.complete(images[:1], keep_rows=16, labels=[0], seed=3, temperature=0.9),
        None,
        gen.complete(images[1:], keep_rows=16, labels=[2], seed=4, temperature=0.9),
        gen.complete(images[1:], keep_rows=8, labels=[1], seed=5),
    ]
    for (answer, _), body, image in zip(answers, bodies, want, strict=False):
        if image is not None:
            assert answer["label"] == body["label"] and answer["seed"] == body["seed"]
            assert np.array_equal(pixels_of_base64([answer["png"]], 1)[0], image[0].numpy())
    assert answers[2][0]["error"].startswith("image: a damaged or truncated PNG file") and len(answers[2][0]) == 1
    assert "needs class-conditional priors trained with class_dropout > 0" in answers[5][0]["error"]
    with pytest.raises(BadRequest, match="image: 12000x12000 pixels by its header"):  # refused before it is queued
        parse({"seed": 0, "label": 0, "keep_rows": 4, "image": base64.b64encode(png_claiming(12000, 12000)).decode()},
              gen.num_classes, image_size=32)  # fmt: skip


def test_registered_encoder_gives_the_codes(store, gen, png_claiming):
    import mlflow

    images = gen.generate(2, seed=4)
    pngs = [encode_png(p) for p in hwc(images.numpy())]
    out = mlflow.pyfunc.load_model("models:/vqvae2-encoder@current").predict(pd.DataFrame({"png": pngs}))
    codes = gen.encode(images)
    assert out["top"].tolist() == codes["top"].flatten(1).tolist()
    assert out["bottom"].tolist() == codes["bottom"].flatten(1).tolist()
    encoder = mlflow.pyfunc.load_model("models:/vqvae2-encoder@current")
    with pytest.raises(Exception, match=r"image 0: not an image file \(PNG, JPEG"):
        encoder.predict(pd.DataFrame({"png": [b"not an image"]}))
    bomb = png_claiming(12000, 12000)  # a few bytes that claim a 12,000 x 12,000 canvas
    with pytest.raises(Exception, match="image 1: 12000x12000 pixels by its header, but the model takes 32x32"):
        encoder.predict(pd.DataFrame({"png": [pngs[0], bomb]}))


def test_alias_policy_and_reuse(store, outputs):
    """The same outputs registered again reuse their version; a trial does not move the alias."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from pipeline.serving import registration as models

    client = MlflowClient()
    with mlflow.start_run():
        again = models.register("vqvae2", outputs["train_vqvae"], outputs["train_prior"], "v1/p1", "current", True, {})
    assert again["generator"] == "models:/vqvae2-generator/1"
    assert len(client.search_model_versions("name='vqvae2-generator'")) == 1
    with mlflow.start_run():  # other outputs (another fingerprint), registered by a trial run: alias stays
        other = models.register("vqvae2", outputs["train_vqvae"], outputs["train_prior"], "v2/p2", "current", False, {})
    assert other["generator"] == "models:/vqvae2-generator/2"
    assert str(client.get_model_version_by_alias("vqvae2-generator", "current").version) == "1"
