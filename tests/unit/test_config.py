"""Every conf file composes and validates; bad values fail naming the key; fingerprints and the plan behave."""

import os
import re
from dataclasses import replace
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from pipeline import cache, graph
from pipeline.config import ConfigError, load, register
from pipeline.run import MissingUpstreamError, plan
from steps.io import sources

CONF = Path(__file__).resolve().parents[2] / "conf"
register()


def make(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return load(compose("config", overrides=list(overrides)))


def path_for(*overrides: str) -> list[str]:
    """``data.path=/data`` when the composed config's source reads the user's own data and names no path (the source
    registry says which sources need one)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        data = compose("config", overrides=list(overrides)).data
    unset = OmegaConf.is_missing(data, "path") or data.path is None
    return ["data.path=/data"] if sources.get(data.source).needs_path and unset else []


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("experiment", options("experiment"))
@pytest.mark.parametrize("model", options("model"))
def test_every_experiment_composes_with_every_model(experiment, model):
    cfg = make(f"experiment={experiment}", f"model={model}", *path_for(f"experiment={experiment}"))
    assert cfg.model_kind == model
    assert cfg.train_vqvae.model.image_size == cfg.shard.image_size


@pytest.mark.parametrize("experiment", options("experiment"))
@pytest.mark.parametrize("prior", options("prior"))
def test_every_experiment_composes_with_every_prior(experiment, prior):
    # An experiment sets the keys every prior kind has; prior_recipe/<experiment>_<prior>.yaml adds its own.
    cfg = make(f"experiment={experiment}", f"prior={prior}", *path_for(f"experiment={experiment}"))
    top = cfg.train_prior.prior.top
    recipe = CONF / "prior_recipe" / f"{experiment}_{prior}.yaml"
    if recipe.exists():
        for key, value in OmegaConf.load(recipe).top.items():
            assert getattr(top, key) == value, (recipe.name, key)
    assert top.channels == OmegaConf.load(CONF / "experiment" / f"{experiment}.yaml").prior.top.channels


def test_prior_recipes_name_an_experiment_and_a_prior():
    pairs = {f"{e}_{p}" for e in options("experiment") for p in options("prior")}
    assert set(options("prior_recipe")) <= pairs
    assert set(options("model_recipe")) <= {f"{e}_{m}" for e in options("experiment") for m in options("model")}


@pytest.mark.parametrize(
    "overrides,levels",
    [
        (["debug=tiny3"], {"top": (4, 4), "middle": (8, 8), "bottom": (16, 16)}),
        (["experiment=fashion_mnist64"], {"top": (4, 4), "middle": (8, 8), "bottom": (16, 16)}),
        (["experiment=ffhq1024", "data.path=/data"], {"top": (32, 32), "middle": (64, 64), "bottom": (128, 128)}),
        (["experiment=fashion_mnist64", "model.factors=[4,2]"], {"top": (8, 8), "bottom": (16, 16)}),
    ],
)
def test_the_level_recipes(overrides, levels):
    cfg = make(*overrides)
    assert cfg.train_vqvae.model.shapes == levels
    assert cfg.train_prior.prior.middle is None  # middle levels take the bottom's architecture
    middle = make(*overrides, "prior.middle={channels: 8, layers: 1}").train_prior.prior
    assert type(middle.middle).__name__ == "PixelCNNConfig" and middle.middle.channels == 8


@pytest.mark.parametrize(
    "group,option", [(g, o) for g in ("data", "prior", "ray", "mlflow", "debug") for o in options(g)]
)
def test_every_group_option_composes(group, option):
    extra = path_for(f"{group}={option}")
    extra += ["mlflow=server"] if (group, option) == ("ray", "cluster") else []  # a cluster needs a server
    cfg = make(f"{group}={option}", *extra)
    assert cfg.root.startswith("/")


def test_defaults_are_the_digits_recipe(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = make()
    assert cfg.shard.source == "digits" and cfg.shard.image_size == 32 and cfg.model_kind == "vqvae2"
    assert cfg.mlflow.tracking_uri == "sqlite:///" + os.path.abspath("mlflow.db")
    assert cfg.train_prior.prior.top.attn_heads > 0 and cfg.train_prior.prior.bottom.attn_heads == 0
    assert type(cfg.train_prior.prior.top).__name__ == "PixelCNNConfig"


@pytest.mark.parametrize(
    "override,message",
    [
        ("train_vqvae.train.lr=-1", "train_vqvae.train.lr"),
        ("data.image_size=36", "data.image_size"),
        ("model.quantizer.codebook_size=40000", "model.quantizer.codebook_size must be in [2, 32768]"),
        ("model.top_codebook_size=1", "model.top_codebook_size"),
        ("model.factors=[4]", "model.factors must be a list of at least two factors"),
        ("model.factors=[8,8]", "model.factors [8, 8] multiply to 64, which must divide image_size=32"),
        ("model.factors=[4,3]", "model.factors must be powers of two"),
        ("model.middle_codebook_size=64", "model.middle_codebook_size must be unset: two levels have no middle level"),
        ("prior.middle={kind: nope}", "prior.middle.kind: unknown prior kind 'nope'"),
        ("data.source=flickr", "data.source"),
        ("prior.top.kernel_size=4", "prior.top.kernel_size"),
        ("sample.num_samples=0", "sample.num_samples"),
        ("encode.batch_size=0", "encode.batch_size"),
        ("evaluate.knn_k=0", "evaluate.knn_k"),
        ("data.val_fraction=1.5", "data.val_fraction"),
    ],
)
def test_bad_values_fail_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        make(override)


@pytest.mark.parametrize("override", ["model.bogus=1", "data.image_size=abc", "train_vqvae.train.typo=3"])
def test_unknown_keys_and_wrong_types_fail_at_composition(override):
    with pytest.raises(Exception, match=override.split("=")[0].split(".")[-1]):
        make(override)


def test_fingerprints_follow_config_and_upstream():
    cfg = make("debug=tiny")
    fp = cache.fingerprint("sample", cfg.sample, {"train_prior": "a"})
    assert fp == cache.fingerprint("sample", cfg.sample, {"train_prior": "a"})
    assert fp != cache.fingerprint("sample", replace(cfg.sample, num_samples=9), {"train_prior": "a"})
    assert fp != cache.fingerprint("sample", cfg.sample, {"train_prior": "b"})
    # Settings that cannot change the result keep the fingerprint.
    tv = cfg.train_vqvae
    same = replace(tv, train=replace(tv.train, max_failures=9, cache_data=False))
    assert cache.fingerprint("t", tv, {}) == cache.fingerprint("t", same, {})
    pool = replace(cfg.sample, num_actors=7, cpus_per_actor=2)
    assert cache.fingerprint("sample", pool, {"train_prior": "a"}) == fp


def test_graph_skips_code_steps_for_the_vae():
    names = [s.name for s in graph.active(make("model=vae"))]
    assert names == ["shard", "train_vqvae", "sample", "evaluate"]
    vae = make("model=vae")
    steps = {s.name: s for s in graph.GRAPH}
    assert graph.inputs_of(steps["sample"], vae) == ("train_vqvae",)
    assert graph.inputs_of(steps["evaluate"], vae) == ("shard", "train_vqvae", "sample")


def test_tune_decoder_is_off_by_default_and_reruns_only_what_decodes(tmp_path):
    store = cache.ArtifactStore(str(tmp_path))
    base = {p.step.name: p.fingerprint for p in plan(make("debug=tiny"), store)}
    assert "tune_decoder" not in base and graph.decoder_of(make("debug=tiny")).name == "train_vqvae"
    on = make("debug=tiny", "tune_decoder.enabled=true")
    tuned = {p.step.name: p.fingerprint for p in plan(on, store)}
    assert list(tuned) == [s.name for s in graph.active(on)] and graph.decoder_of(on).name == "tune_decoder"
    assert all(base[s] == tuned[s] for s in ("shard", "train_vqvae", "encode", "train_prior")), "codes, priors cached"
    assert all(base[s] != tuned[s] for s in ("sample", "evaluate"))
    steps = {s.name: s for s in graph.GRAPH}
    assert graph.inputs_of(steps["sample"], on) == ("train_vqvae", "tune_decoder", "train_prior")
    with pytest.raises(ConfigError, match=r"tune_decoder.enabled must be false with model=vae"):
        make("model=vae", "tune_decoder.enabled=true")


def test_plan_changes_propagate_downstream(tmp_path):
    store = cache.ArtifactStore(str(tmp_path))
    base = {p.step.name: p.fingerprint for p in plan(make("debug=tiny"), store)}
    more = {p.step.name: p.fingerprint for p in plan(make("debug=tiny", "model.quantizer.codebook_size=64"), store)}
    assert base["shard"] == more["shard"]
    assert all(base[s] != more[s] for s in ("train_vqvae", "encode", "train_prior", "sample", "evaluate"))


def test_plan_errors(tmp_path):
    store = cache.ArtifactStore(str(tmp_path))
    with pytest.raises(ConfigError, match="unknown step"):
        plan(make("steps=[sampel]"), store)
    with pytest.raises(ConfigError, match="not used with model.kind=vae"):
        plan(make("model=vae", "steps=[encode]"), store)
    with pytest.raises(MissingUpstreamError, match=r"sample needs the train_vqvae output.*steps=\[train_vqvae\]"):
        plan(make("steps=[sample]"), store)


def test_atomic_publish_and_force(tmp_path):
    store = cache.ArtifactStore(str(tmp_path))
    work = store.work_dir("shard", "abc")
    os.makedirs(work)
    Path(work, "data.txt").write_text("v1")
    assert store.record("shard", "abc") is None  # a work dir is never mistaken for a finished output
    final = store.publish("shard", "abc", {"step": "shard"})
    assert Path(final, "data.txt").read_text() == "v1" and store.record("shard", "abc") == {"step": "shard"}
    assert not os.path.exists(work)
    os.makedirs(work)
    Path(work, "data.txt").write_text("v2")
    store.publish("shard", "abc", {"step": "shard", "n": 2})
    assert Path(final, "data.txt").read_text() == "v2" and not list(tmp_path.glob("shard/*.old-*"))


@pytest.mark.parametrize(
    "override,message",
    [
        ("prior.top.shape=[4,4]", "prior.top.shape"),  # derived from the code dataset: not in the schema
        ("model/quantizer=nope", "nope"),  # no such option
        ("model.quantizer.kind=nope", "model.quantizer.kind: unknown quantizer kind 'nope'"),
        ("prior.bottom.kind=nope", "prior.bottom.kind: unknown prior kind 'nope'"),
    ],
)
def test_kinds_and_derived_fields(override, message):
    with pytest.raises(Exception, match=re.escape(message)):
        make(override)


def test_every_registered_kind_has_a_typed_schema_node():
    """A group option starts from its kind's node; the registry, not a hand list, decides which nodes exist."""
    from hydra.core.config_store import ConfigStore

    from pipeline.config import SCHEMA_GROUPS
    from steps.nn import registry

    repo = ConfigStore.instance().repo
    for role, group in SCHEMA_GROUPS.items():
        node = repo
        for part in group.split("/"):
            node = node[part]
        assert {f"{k}_schema.yaml" for k in registry.kinds(role)} <= set(node), (role, sorted(node))


def test_the_logged_config_is_the_whole_run_and_builds_back():
    from pipeline.config import PipelineConfig, as_user_dict, build

    cfg = make("debug=tiny", "model.quantizer.dim=8")
    data = as_user_dict(cfg)
    assert data["model"]["kind"] == "vqvae2" and data["model"]["quantizer"]["dim"] == 8
    assert data["prior"]["top"]["kind"] == "pixelcnn" and "shape" not in data["prior"]["top"]
    assert data["data"]["source"] == "digits" and "shard" not in data
    # Back through the same alias mapping: the same typed config.
    back = {k: v for k, v in data.items() if k not in ("data", "model", "prior")}
    back["shard"] = data["data"]
    back["train_vqvae"]["model"] = data["model"]
    back["train_prior"]["prior"] = data["prior"]
    assert build(PipelineConfig, back) == cfg


def test_tracking_uri_comes_from_the_environment_when_set(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.internal:5000")
    assert make().mlflow.tracking_uri == "http://tracking.internal:5000"
    assert make("mlflow.tracking_uri=sqlite:////tmp/x.db").mlflow.tracking_uri == "sqlite:////tmp/x.db"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert make().mlflow.tracking_uri == "sqlite:///" + os.path.abspath("mlflow.db")


def test_cluster_run_with_a_store_on_the_driver_is_refused(monkeypatch):
    # mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI: an earlier in-process test may have left a server's there
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(ConfigError, match=r"mlflow.tracking_uri=sqlite:///.*ray.address=auto"):
        make("ray=cluster")
    assert make("ray=cluster", "mlflow=server").mlflow.tracking_uri.startswith("http://")


@pytest.mark.parametrize(
    ("root", "logs"),
    [("s3://bucket/root", "outputs"), ("gs://bucket", "outputs"), ("/data/runs", "/data/runs"),
     ("file:///data/runs", "/data/runs"), ("outputs", "outputs")],
)  # fmt: skip
def test_hydra_logs_stay_on_local_disk_for_a_uri_root(root, logs):
    """Hydra writes its run folder with ``os``: for an s3:// root it would make a local folder named ``s3:``."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        hydra = compose("config", overrides=[f"artifacts.root={root}"], return_hydra_config=True).hydra
    assert hydra.run.dir.startswith(f"{logs}/_hydra/") and hydra.sweep.dir.startswith(f"{logs}/_hydra/multirun-")
