"""The whole pipeline as a user runs it (`python -m pipeline debug=tiny`), then cached, then a sample-only rerun."""

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from tiny_pipeline import pipeline

from pipeline.graph import NAMES
from steps.artifacts.autoencoder import Autoencoder
from steps.artifacts.codes import CodeDataset, read_code_meta
from steps.artifacts.images import ImageShards
from steps.artifacts.priors import Priors

pytestmark = pytest.mark.e2e
EVALUATE_METRICS = ["recon_mse", "psnr", "ssim", "usage_top", "perplexity_bottom", "nll_bits_top", "bits_per_dim"]
EVALUATE_METRICS += ["fd_effnet", "kid_effnet", "kid_effnet_std", "precision", "recall", "fd_effnet_real"]
STEPS = [n for n in NAMES if n != "tune_decoder"]  # debug=tiny runs every step but the optional one


def finished(root: Path, step: str) -> list[Path]:
    return sorted(p.parent for p in (root / step).glob("*/_SUCCESS"))


def mlflow_runs(workdir: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    exp = client.get_experiment_by_name("vqvae2")
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"], max_results=1000)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = {
        p.info.run_id: [r for r in runs if r.data.tags.get("mlflow.parentRunId") == p.info.run_id] for p in parents
    }
    return client, parents, children


@pytest.fixture(scope="module")
def workdir(tiny_run):
    """The session's tiny run (tests/e2e/conftest.py), which this module's reruns build on."""
    return tiny_run


def test_the_console_shows_progress_and_not_ray_chatter(workdir):
    """Each long step says how far it got (steps/core/progress.py); Ray's INFO chatter is off (ray.log_level)."""
    output = (workdir / "console.txt").read_text()
    for done in ("shard  rows 200/200 (100%)", "encode  rows 200/200 (100%)", "train_vqvae  step 10/10 (100%)"):
        assert done in output, f"no progress line {done!r} in:\n{output[-5000:]}"
    assert "train_prior[top]  step 10/10 (100%)" in output and "train_prior[bottom]  step 10/10 (100%)" in output
    assert "done in" in output and "val mse" in output and "val bits" in output
    for chatter in ("Starting execution of Dataset", "Progress bars disabled", "Reporting training result"):
        assert chatter not in output, f"Ray's chatter {chatter!r} is back:\n{output[-5000:]}"


def test_every_artifact_and_schema(workdir):
    root = workdir / "artifacts"
    outs = {step: finished(root, step) for step in STEPS}
    assert all(len(v) == 1 for v in outs.values()), outs
    assert not list(root.glob("*/*.partial")), "no work directory may be left behind"
    for step, (out,) in outs.items():
        record = json.loads((out / "_SUCCESS").read_text())
        assert record["step"] == step and record["fingerprint"] == out.name

    manifest = ImageShards.open(str(outs["shard"][0])).manifest
    assert manifest["rows"]["train"] + manifest["rows"]["val"] == 200

    autoencoder = Autoencoder.open(str(outs["train_vqvae"][0]))
    assert autoencoder.kind == "vqvae2" and autoencoder.codebook_sizes == {"top": 512, "bottom": 512}
    assert (outs["train_vqvae"][0] / "recon.png").stat().st_size > 0

    codes = outs["encode"][0]
    meta = read_code_meta(str(codes))
    assert meta.shapes == {"top": (4, 4), "bottom": (8, 8)} and meta.codebook_size == {"top": 512, "bottom": 512}
    table = pq.read_table(CodeDataset.open(str(codes)).split_uri("train"))
    assert table.schema.field("top").type.list_size == 16 and table.schema.field("bottom").type.list_size == 64
    assert str(table.schema.field("top").type.value_type) == "int16"
    assert table.num_rows == manifest["rows"]["train"] and len(set(table.column("id").to_pylist())) == table.num_rows

    priors = Priors.open(str(outs["train_prior"][0]))
    assert priors.checkpoint("top").extra("vqvae") == meta.vqvae == autoencoder.digest
    assert priors.load("top").config.attn_heads == 4 and priors.load("bottom").config.cond_shape == (4, 4)

    sample = outs["sample"][0]
    assert len(list((sample / "images").glob("*.png"))) == 8 and (sample / "grid.png").exists()
    assert pq.read_table(sample / "codes").num_rows == 8

    report = json.loads((outs["evaluate"][0] / "metrics.json").read_text())
    metrics = report["metrics"]
    assert set(EVALUATE_METRICS) <= set(metrics), set(EVALUATE_METRICS) - set(metrics)
    assert metrics["recon_mse"] > 0 and 0 < metrics["usage_top"] <= 1 and metrics["nll_bits_bottom"] > 0
    assert metrics["fd_effnet_real"] >= 0 and 0 <= metrics["precision"] <= 1
    assert report["counts"]["real_split"] == "val" and report["counts"]["samples"] == 8
    assert (outs["evaluate"][0] / "real_vs_samples.png").stat().st_size > 0


def test_mlflow_run_tree(workdir):
    client, parents, children = mlflow_runs(workdir)
    assert len(parents) == 1
    kids = {r.data.tags["mlflow.runName"]: r for r in children[parents[0].info.run_id]}
    assert sorted(kids) == sorted(STEPS)
    # The parent run is what users compare: its name and params say what was chosen, its metrics what it did.
    parent = parents[0]
    assert parent.info.run_name == "digits32 debug=tiny"
    assert parent.data.params["debug"] == "tiny" and parent.data.params["model"] == "vqvae2"
    assert {"fd_effnet", "precision", "recall", "psnr", "nll_bits_top", "usage_bottom"} <= set(parent.data.metrics)
    assert {"fd_clf", "recall_clf", "coverage", "coverage_clf"} <= set(parent.data.metrics)  # both feature spaces
    assert parent.data.metrics["fd_effnet"] == kids["evaluate"].data.metrics["final/fd_effnet"]
    assert client.get_experiment_by_name("vqvae2").tags["mlflow.experimentKind"] == "custom_model_development"
    assert {d.dataset.name for d in client.get_run(parent.info.run_id).inputs.dataset_inputs} == {"shard", "encode"}
    for step, upstream in (("train_vqvae", "shard"), ("encode", "shard"), ("train_prior", "encode")):
        (read,) = client.get_run(kids[step].info.run_id).inputs.dataset_inputs
        assert (
            read.dataset.name == upstream
            and read.dataset.digest == finished(workdir / "artifacts", upstream)[0].name[:16]
        )
        assert "split" in read.dataset.schema, "the split is a column of the dataset"
    tv = kids["train_vqvae"]
    assert tv.data.params["model.quantizer.codebook_size"] == "512" and tv.data.params["train.steps"] == "10"
    assert tv.data.params["model.kind"] == "vqvae2" and tv.data.params["model.quantizer.kind"] == "ema"
    out = finished(workdir / "artifacts", "train_vqvae")[0]
    assert tv.data.tags["fingerprint"] == out.name and tv.data.tags["git_sha"]
    assert tv.data.tags["input.shard"].endswith(finished(workdir / "artifacts", "shard")[0].name)
    history = client.get_metric_history(tv.info.run_id, "train/loss")
    assert [m.step for m in history] == [5, 10], "rank-0 worker streams metrics by global step"
    # The crash after step 7 restarted the workers from step 5 in the same MLflow run: the restart is recorded, and
    # no metric step is logged twice or left out.
    assert [m.step for m in client.get_metric_history(tv.info.run_id, "train/resumed_from")] == [5]
    for key in [k for k in tv.data.metrics if k.startswith(("train/", "val/"))]:
        steps = [m.step for m in client.get_metric_history(tv.info.run_id, key)]
        assert steps == sorted(set(steps)), f"{key} logged at {steps}"
    assert "final/val_recon_mse" in tv.data.metrics
    assert any(a.path == "recon.png" for a in client.list_artifacts(tv.info.run_id))
    prior = kids["train_prior"]
    assert {"top/train/nll_bits", "bottom/train/nll_bits"} <= set(prior.data.metrics)
    assert any(a.path == "grid.png" for a in client.list_artifacts(kids["sample"].info.run_id))
    evaluation = kids["evaluate"]
    assert {f"final/{name}" for name in EVALUATE_METRICS} <= set(evaluation.data.metrics)
    assert evaluation.data.params["knn_k"] == "3"
    assert {"metrics.json", "real_vs_samples.png"} <= {a.path for a in client.list_artifacts(evaluation.info.run_id)}
    # One generator and one encoder per run, logged in the parent run; a debug run does not move the alias.
    (generator,) = client.search_model_versions("name='vqvae2-generator'")
    assert generator.run_id == parents[0].info.run_id and generator.tags["pipeline_run_id"] == generator.run_id
    assert float(generator.tags["metric.fd_effnet"]) > 0 and "metric.nll_bits_top" in generator.tags
    assert len(client.search_model_versions("name='vqvae2-encoder'")) == 1
    assert not generator.aliases, "debug=tiny is a trial: it leaves mlflow.model_alias where it was"
    assert not [m for m in client.search_registered_models() if "prior" in m.name], "priors alone do not predict"


def test_second_invocation_is_fully_cached(workdir):
    before = {step: finished(workdir / "artifacts", step) for step in STEPS}
    output = pipeline(workdir, "mlflow.move_alias=true")  # asked: even a debug run moves the alias
    assert output.count("cached") >= len(STEPS)
    assert {step: finished(workdir / "artifacts", step) for step in STEPS} == before
    _, parents, children = mlflow_runs(workdir)
    first, second = parents
    produced = {r.data.tags["mlflow.runName"]: r.info.run_id for r in children[first.info.run_id]}
    for run in children[second.info.run_id]:
        assert run.data.tags["cached"] == "true"
        assert run.data.tags["produced_by"] == produced[run.data.tags["mlflow.runName"]]
    # A cached run still carries the evaluate figures, and says where to look at it.
    assert second.data.metrics["fd_effnet"] == first.data.metrics["fd_effnet"] and second.data.metrics["steps_run"] == 0
    assert f"#/experiments/{second.info.experiment_id}/runs/{second.info.run_id}?workflowType=" in output
    client, _, _ = mlflow_runs(workdir)
    (version,) = client.search_model_versions("name='vqvae2-generator'")  # the same outputs: no second version
    assert str(client.get_model_version_by_alias("vqvae2-generator", "current").version) == str(version.version)


def test_sample_only_rerun_reuses_the_priors(workdir):
    root = workdir / "artifacts"
    priors = finished(root, "train_prior")
    stamp = (priors[0] / "_SUCCESS").stat().st_mtime
    pipeline(workdir, "steps=[sample]", "sample.num_samples=12")
    assert finished(root, "train_prior") == priors and (priors[0] / "_SUCCESS").stat().st_mtime == stamp
    samples = finished(root, "sample")
    assert len(samples) == 2
    counts = sorted(len(list((s / "images").glob("*.png"))) for s in samples)
    assert counts == [8, 12]
    _, parents, children = mlflow_runs(workdir)
    assert [r.data.tags["mlflow.runName"] for r in children[parents[-1].info.run_id]] == ["sample"]


def test_a_tuned_decoder_reruns_only_what_decodes(workdir, monkeypatch):
    """tune_decoder.enabled=true on the same outputs: the codes and priors come from the cache, sample and evaluate
    rerun with the new decoder, and the generator registered for it decodes with it."""
    from pipeline import Generator
    from pipeline.verify import verify

    root = workdir / "artifacts"
    kept = {step: finished(root, step) for step in ("shard", "train_vqvae", "encode", "train_prior")}
    pipeline(workdir, "tune_decoder.enabled=true")
    assert {step: finished(root, step) for step in kept} == kept
    (out,) = finished(root, "tune_decoder")
    tuned, base = Autoencoder.open(str(out)), Autoencoder.open(str(kept["train_vqvae"][0]))
    assert tuned.decoder_of == base.model_uri and tuned.codes_digest == base.digest != tuned.digest
    _, parents, children = mlflow_runs(workdir)
    newest = children[parents[-1].info.run_id]
    ran = {r.data.tags["mlflow.runName"] for r in newest if r.data.tags.get("cached") != "true"}
    assert ran == {"tune_decoder", "sample", "evaluate"}
    decoders = [json.loads((s / "samples.json").read_text())["vqvae"] for s in finished(root, "sample")]
    assert decoders.count(tuned.digest) == 1 and len(decoders) == 3, "a new sample output, decoded by the new decoder"
    assert verify(str(root)).ok
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{workdir / 'mlflow.db'}")
    client, _, _ = mlflow_runs(workdir)
    newest = max(int(v.version) for v in client.search_model_versions("name='vqvae2-generator'"))
    generator = Generator.load(f"models:/vqvae2-generator/{newest}")
    assert generator.autoencoder.digest == tuned.digest and generator.autoencoder.codes_digest == base.digest
    # From the folders: a sample output decodes as it was decoded; the priors alone with train_vqvae's decoder.
    (tuned_samples,) = [s for s in finished(root, "sample") if tuned.digest in (s / "samples.json").read_text()]
    assert Generator.load(str(tuned_samples), device="cpu").autoencoder.digest == tuned.digest
    assert Generator.load(str(kept["train_prior"][0]), device="cpu").autoencoder.digest == base.digest
