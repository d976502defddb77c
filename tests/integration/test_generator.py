"""The generator as a product: the Python API (the sample step's images, encode/decode, clear errors), the MLflow
generator and encoder models (log, register, load, predict), and the alias policy."""

from __future__ import annotations

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
