"""Typed configuration: Hydra schemas derived from the steps' own dataclasses, and the conversion to them.

Each step owns a frozen config dataclass (``steps.shard.ShardConfig``, ...) whose ``__post_init__`` validates values.
Hydra needs mutable dataclasses with OmegaConf-friendly types, so :func:`schema` mirrors a step dataclass field by
field (no copy to keep in sync by hand). The mirrors are registered in Hydra's ConfigStore: composing the config
already rejects unknown keys and wrong types, naming the key. :func:`load` then builds the frozen step configs,
which runs their value checks. All of this happens before Ray starts; nothing below ``pipeline/`` sees a DictConfig.
"""

from __future__ import annotations

import dataclasses
import os
import re
import typing
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from steps.encode import EncodeConfig
from steps.evaluate import EvaluateConfig
from steps.nn.vae import VAEConfig
from steps.nn.vqvae import VQVAE2Config, VQVAEConfig
from steps.sample import SampleConfig
from steps.shard import ShardConfig
from steps.train_prior import PriorHParams, TrainPriorConfig
from steps.train_vqvae import TrainVQVAEConfig
from steps.training import TrainConfig

MODEL_CONFIGS: dict[str, type] = {"vqvae2": VQVAE2Config, "vqvae": VQVAEConfig, "vae": VAEConfig}
_SCHEMAS: dict[type, type] = {}


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the key."""


def schema(cls: type, extra: tuple = ()) -> type:
    """A mutable, OmegaConf-compatible mirror of dataclass ``cls``: tuples become lists, nested dataclasses mirrored."""
    if cls in _SCHEMAS and not extra:
        return _SCHEMAS[cls]
    hints = typing.get_type_hints(cls)
    specs = list(extra)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            sub = schema(tp)
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else tp()
            specs.append((f.name, sub, field(default_factory=_factory(sub, dataclasses.asdict(default)))))
            continue
        origin = typing.get_origin(tp)
        if origin is tuple:
            tp = list[typing.get_args(tp)[0]]
        elif typing.get_origin(tp) in (typing.Union, getattr(__import__("types"), "UnionType", None)):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            if len(args) > 1:  # a union of dataclasses (the model): typed per option, see register()
                tp = Any
        if f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
            specs.append((f.name, tp, field(default_factory=lambda v=value: list(v) if isinstance(v, tuple) else v)))
        elif f.default is not dataclasses.MISSING:
            value = list(f.default) if isinstance(f.default, tuple) else f.default
            specs.append((f.name, tp, field(default_factory=lambda v=value: v) if isinstance(value, list) else value))
        else:
            specs.append((f.name, tp, MISSING))
    mirrored = dataclasses.make_dataclass(f"{cls.__name__}Schema", specs)
    if not extra:
        _SCHEMAS[cls] = mirrored
    return mirrored


def _factory(sub: type, values: dict[str, Any]):
    def make():
        return sub(**{k: list(v) if isinstance(v, tuple) else v for k, v in values.items()})

    return make


def build(cls: type, data: Any, key: str) -> Any:
    """Construct frozen dataclass ``cls`` from plain ``data``; value errors are re-raised naming ``key``."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        value = data[f.name]
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp) and isinstance(value, dict):
            value = build(tp, value, f"{key}.{f.name}")
        elif typing.get_origin(tp) is tuple and isinstance(value, list):
            value = tuple(value)
        kwargs[f.name] = value
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        msg = str(exc)
        if not msg.startswith(key + "."):  # the step names its own config ("shard.x", "VQVAE2Config.x"): use the key
            msg = re.sub(r"^[A-Za-z0-9_]+\.", key + ".", msg, count=1)
        raise ConfigError(msg if msg.startswith(key) else f"{key}: {msg}") from None


# ------------------------------------------------------------------------------------------------ top level
@dataclass
class ArtifactsConf:
    root: str = "outputs"  # local path or a URI every Ray node reaches (s3://..., a shared mount)


@dataclass
class MLflowConf:
    tracking_uri: str = "sqlite:///mlflow.db"
    experiment: str = "vqvae2"
    register_models: bool = True  # register the VQ-VAE and priors in the model registry
    model_alias: str = "current"  # MLflow reserves "latest"
    run_name: str | None = None


@dataclass
class RayConf:
    address: str | None = None  # None: start a local Ray; "auto": join the cluster (ray job submit sets it)
    num_cpus: int | None = None  # local Ray only
    num_gpus: int | None = None  # local Ray only
    # Local Ray only. Ray Train's clean-up monitor queries the State API, which the dashboard serves: without it, it
    # logs a warning every second while training. With it, the dashboard is at http://127.0.0.1:8265.
    include_dashboard: bool = True
    log_level: str = "WARNING"  # of Ray Data on the driver; INFO shows every dataset pass and progress bars


ShardSchema = schema(ShardConfig)
TrainSchema = schema(TrainConfig)
PriorSchema = schema(PriorHParams)
EncodeSchema = schema(EncodeConfig)
SampleSchema = schema(SampleConfig)
EvaluateSchema = schema(EvaluateConfig)


@dataclass
class PriorsConf:
    top: PriorSchema = field(default_factory=lambda: PriorSchema(attn_heads=4))
    bottom: PriorSchema = field(default_factory=PriorSchema)


@dataclass
class TrainPriorConf:
    train: TrainSchema = field(default_factory=TrainSchema)
    class_conditional: bool = False
    parallel: bool = True


@dataclass
class TrainVQVAEConf:
    train: TrainSchema = field(default_factory=TrainSchema)
    grid_images: int = 16


@dataclass
class PipelineSchema:
    data: ShardSchema = field(default_factory=ShardSchema)
    model: Any = MISSING  # typed per option: conf/model/*.yaml start from the <kind>_schema nodes
    prior: PriorsConf = field(default_factory=PriorsConf)
    train_vqvae: TrainVQVAEConf = field(default_factory=TrainVQVAEConf)
    encode: EncodeSchema = field(default_factory=EncodeSchema)
    train_prior: TrainPriorConf = field(default_factory=TrainPriorConf)
    sample: SampleSchema = field(default_factory=SampleSchema)
    evaluate: EvaluateSchema = field(default_factory=EvaluateSchema)
    ray: RayConf = field(default_factory=RayConf)
    mlflow: MLflowConf = field(default_factory=MLflowConf)
    artifacts: ArtifactsConf = field(default_factory=ArtifactsConf)
    steps: list[str] = field(default_factory=list)  # run only these steps (their upstream must be cached)
    force: list[str] = field(default_factory=list)  # rerun these steps (and what depends on them) despite the cache


def register() -> None:
    """Put the schemas into Hydra's ConfigStore (idempotent)."""
    cs = ConfigStore.instance()
    cs.store(name="pipeline_schema", node=PipelineSchema)
    for kind, cls in MODEL_CONFIGS.items():
        cs.store(group="model", name=f"{kind}_schema", node=schema(cls, extra=(("kind", str, kind),)))


# ------------------------------------------------------------------------------------------------ typed result
@dataclass(frozen=True)
class PipelineConfig:
    """The whole run, typed and validated: what ``pipeline/`` hands to the step graph."""

    shard: ShardConfig
    train_vqvae: TrainVQVAEConfig
    encode: EncodeConfig
    train_prior: TrainPriorConfig
    sample: SampleConfig
    evaluate: EvaluateConfig
    ray: RayConf
    mlflow: MLflowConf
    root: str
    steps: tuple[str, ...]
    force: tuple[str, ...]

    @property
    def model_kind(self) -> str:
        return self.train_vqvae.kind


def load(cfg: DictConfig) -> PipelineConfig:
    """Resolve and validate a composed Hydra config. Raises ConfigError naming the key at fault."""
    try:
        data = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except Exception as exc:  # interpolation / missing-value errors already name the key
        raise ConfigError(str(exc).splitlines()[0]) from None
    shard = build(ShardConfig, data["data"], "data")  # first: model.image_size interpolates data.image_size
    model = dict(data["model"])
    kind = model.pop("kind", None)
    if kind not in MODEL_CONFIGS:
        raise ConfigError(f"model.kind must be one of {sorted(MODEL_CONFIGS)}, got {kind!r}")
    model_cfg = build(MODEL_CONFIGS[kind], model, "model")
    tv = data["train_vqvae"]
    tp = data["train_prior"]
    root = data["artifacts"]["root"]
    return PipelineConfig(
        shard=shard,
        train_vqvae=build(TrainVQVAEConfig, {"model": model_cfg, **tv}, "train_vqvae"),
        encode=build(EncodeConfig, data["encode"], "encode"),
        train_prior=build(
            TrainPriorConfig,
            {
                "top": build(PriorHParams, data["prior"]["top"], "prior.top"),
                "bottom": build(PriorHParams, data["prior"]["bottom"], "prior.bottom"),
                **tp,
            },
            "train_prior",
        ),
        sample=build(SampleConfig, data["sample"], "sample"),
        evaluate=build(EvaluateConfig, data["evaluate"], "evaluate"),
        ray=RayConf(**data["ray"]),
        mlflow=MLflowConf(**{**data["mlflow"], "tracking_uri": absolute_tracking_uri(data["mlflow"]["tracking_uri"])}),
        root=root if "://" in root else os.path.abspath(os.path.expanduser(root)),
        steps=tuple(data["steps"]),
        force=tuple(data["force"]),
    )


def absolute_tracking_uri(uri: str) -> str:
    """``sqlite:///mlflow.db`` relative to where the user ran us, not to each Ray worker's working directory."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + os.path.abspath(uri[len(prefix) :])
    return uri


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """A step config as flat ``a.b.c -> value`` pairs (MLflow params)."""
    if dataclasses.is_dataclass(obj):
        obj = dataclasses.asdict(obj)
    out: dict[str, Any] = {}
    for k, v in obj.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
