"""Typed configuration: the Hydra schema is derived from the steps' own config dataclasses, and converted back.

The whole run is one frozen :class:`PipelineConfig` whose fields are the steps' configs, one per row of the step
graph (``pipeline/graph.py``: ``shard`` holds a ``steps.shard.ShardConfig``...), plus Ray, MLflow and the artifact
root. Nothing here mirrors a step or its fields by hand:

* :func:`schema` derives an OmegaConf-friendly (mutable) dataclass from a config class, field by field (tuples become
  lists, derived fields such as a prior's code-map shape are left out); :func:`register` puts the whole tree into
  Hydra's ConfigStore, so composing rejects unknown keys and wrong types of the fixed parts, naming the key.
* A polymorphic field (a model, a prior, a quantiser: see ``steps.nn.config.is_role_base``) is untyped in the schema;
  its ``kind`` picks the config class from ``steps.nn.registry`` when :func:`load` builds it.
* :func:`load` builds the frozen configs, which check their own values; a ``FieldError`` from any of them is
  re-labelled with the user's key (``data.image_size``). All of this happens before Ray starts; nothing below
  ``pipeline/`` sees a DictConfig.

Hydra groups are named for what users pick, not for the step that uses it. :data:`ALIASES` is the one mapping.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from pipeline import ray_logs
from pipeline.graph import GRAPH
from pipeline.outputs import write_problem
from pipeline.tracking_buffer import DEFAULT_OUTAGE_LIMIT_S
from steps.io.storage import is_local
from steps.nn import registry
from steps.nn.config import ConfigBase, FieldError, hints, is_config_type, is_derived, is_role_base, optional_inner

# The user's key of a config subtree (a Hydra group) -> where it lives in PipelineConfig. Everything else sits
# under its own name: train_vqvae.train.lr is PipelineConfig.train_vqvae.train.lr.
ALIASES: dict[str, tuple[str, ...]] = {
    "data": ("shard",),  # what to shard: conf/data/*.yaml
    "model": ("train_vqvae", "model"),  # the autoencoder: conf/model/*.yaml
    "prior": ("train_prior", "prior"),  # the prior of each level: conf/prior/*.yaml
}
# Where each role's per-kind schema nodes live in Hydra's ConfigStore (``<group>/<kind>_schema``): a group option
# starts from the node of its kind in its defaults list (conf/model/vqvae2.yaml: ``- vqvae2_schema``), so composing
# it is typed, with every default filled in. conf/prior/*.yaml place one per level: ``- pixelcnn_schema@top``.
SCHEMA_GROUPS = {"autoencoder": "model", "quantizer": "model/quantizer", "prior": "prior"}


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the key."""


# ------------------------------------------------------------------------------------------------ top level
@dataclass(frozen=True)
class ArtifactsConf(ConfigBase):
    root: str = "outputs"  # local path or a URI every Ray node reaches (s3://..., a shared mount)


@dataclass(frozen=True)
class MLflowConf(ConfigBase):
    tracking_uri: str = "sqlite:///mlflow.db"
    experiment: str = "vqvae2"
    register_models: bool = True  # register the run's generator and encoder (pipeline/serving/registration.py)
    model_alias: str = "current"  # the alias a new model version takes (MLflow reserves "latest")
    # Move the alias? None: yes, except in debug runs (debug=...) and multirun members; true / false: always / never.
    move_alias: bool | None = None
    run_name: str | None = None  # None: built from the experiment and the overrides ("digits32 model=vqvae")
    # Log CPU, memory, disk, network (and GPU where there is one) of the driver as system/* metrics of the parent run.
    system_metrics: bool = False
    # How long the tracking store may stay unreachable before the run fails (pipeline/tracking_buffer.py): shorter
    # outages only delay metrics, which training workers buffer and the driver retries.
    outage_limit_s: float = DEFAULT_OUTAGE_LIMIT_S

    def validate(self) -> None:
        self.require("outage_limit_s", self.outage_limit_s > 0, "> 0 seconds (how long the tracking store may be down)")


@dataclass(frozen=True)
class RayConf(ConfigBase):
    address: str | None = None  # None: start a local Ray; "auto": join the cluster (ray job submit sets it)
    num_cpus: int | None = None  # local Ray only
    num_gpus: int | None = None  # local Ray only
    # Local Ray only. Ray Train's clean-up monitor queries the State API, which the dashboard serves: without it, it
    # logs a warning every second while training. With it, the dashboard is at http://127.0.0.1:8265.
    include_dashboard: bool = True
    # Ray's own console output, on the driver and in every worker (pipeline/ray_logs.py). WARNING: Ray's warnings and
    # errors only. INFO brings back all of it: every Ray Data dataset pass, progress bars, Ray Train's worker groups.
    log_level: str = "WARNING"

    def validate(self) -> None:
        self.require("log_level", self.log_level.upper() in ray_logs.LEVELS, f"one of {', '.join(ray_logs.LEVELS)}")


@dataclass(frozen=True)
class _Run(ConfigBase):
    """What :class:`PipelineConfig` adds to its fields."""

    @property
    def root(self) -> str:
        return self.artifacts.root

    @property
    def model_kind(self) -> str:
        return self.train_vqvae.kind

    def validate(self) -> None:
        if self.tune_decoder.enabled and not registry.makes_codes(self.model_kind):
            raise FieldError(
                "PipelineConfig", "tune_decoder.enabled", f"must be false with model={self.model_kind}: it retrains "
                "a VQ model's decoder for its codes, and this model has none"
            )  # fmt: skip


# The whole run, typed and validated: what ``pipeline/`` hands to the step graph. One field per step of the graph,
# named after it and typed with its settings, then the rest.
PipelineConfig = dataclasses.make_dataclass(
    "PipelineConfig",
    [(s.name, s.config_cls, field(default_factory=s.config_cls)) for s in GRAPH]
    + [
        ("ray", RayConf, field(default_factory=RayConf)),
        ("mlflow", MLflowConf, field(default_factory=MLflowConf)),
        ("artifacts", ArtifactsConf, field(default_factory=ArtifactsConf)),
        ("steps", tuple[str, ...], field(default=())),  # run only these steps (their upstream must be cached)
        ("force", tuple[str, ...], field(default=())),  # rerun these steps (and what depends on them) despite the cache
    ],
    bases=(_Run,),
    frozen=True,
    namespace={"__module__": __name__, "__doc__": "The whole run, typed and validated (see above)."},
)


# ------------------------------------------------------------------------------------------------ schema
_SCHEMAS: dict[tuple[type, tuple[str, ...], str | None], type] = {}


def schema(cls: type, skip: tuple[str, ...] = (), kind: str | None = None) -> type:
    """A mutable, OmegaConf-compatible mirror of config class ``cls`` without the fields ``skip`` (and with a
    ``kind`` field first, for a registered kind's node). Polymorphic fields are left to their group's option."""
    if (cls, skip, kind) in _SCHEMAS:
        return _SCHEMAS[(cls, skip, kind)]
    specs: list[Any] = [("kind", str, kind)] if kind else []
    for f in dataclasses.fields(cls):
        if f.name in skip or is_derived(f):
            continue
        tp, optional = optional_inner(hints(cls)[f.name])
        default = _default(f)
        if is_role_base(tp):  # polymorphic: the option of its group fills it (SCHEMA_GROUPS), unless it may be unset
            specs.append((f.name, Any, None if optional and default is None else MISSING))
        elif is_config_type(tp):
            sub = schema(tp)
            values = {
                k: v for k, v in dataclasses.asdict(default).items() if k in {s.name for s in dataclasses.fields(sub)}
            }
            specs.append((f.name, sub, field(default_factory=lambda s=sub, v=values: s(**_lists(v)))))
        else:
            if typing.get_origin(tp) is tuple:
                tp = list[typing.get_args(tp)[0]]
            tp = tp | None if optional else tp
            value = _lists(default)
            specs.append(
                (f.name, tp, field(default_factory=lambda v=value: _lists(v)) if isinstance(value, list) else value)
            )
    mirrored = dataclasses.make_dataclass(f"{cls.__name__}Schema", specs)
    _SCHEMAS[(cls, skip, kind)] = mirrored
    return mirrored


def _default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return MISSING if f.default is dataclasses.MISSING else f.default


def _lists(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_lists(v) for v in value]
    if isinstance(value, dict):
        return {k: _lists(v) for k, v in value.items()}
    return value


def pipeline_schema() -> type:
    """The schema of the composed config: :class:`PipelineConfig`'s, with the :data:`ALIASES` subtrees (at most two
    levels deep) moved to their user keys."""
    top = hints(PipelineConfig)
    specs: list[Any] = []
    for f in dataclasses.fields(PipelineConfig):
        if not is_config_type(top[f.name]):  # steps, force
            specs.append((f.name, list[str], field(default_factory=list)))
            continue
        skip = tuple(path[1] for path in ALIASES.values() if len(path) == 2 and path[0] == f.name)
        node = schema(top[f.name], skip)
        specs.append((_user_key((f.name,)), node, field(default_factory=node)))
    for alias, path in ALIASES.items():
        if len(path) == 2:
            tp, _ = optional_inner(hints(top[path[0]])[path[1]])
            node = None if is_role_base(tp) else schema(tp)  # polymorphic: the group's option fills it
            specs.append((alias, Any, MISSING) if node is None else (alias, node, field(default_factory=node)))
    return dataclasses.make_dataclass("PipelineSchema", specs)


def local_dir(root: str) -> str:
    """Where Hydra keeps a run's logs for ``artifacts.root=root`` (``${local_dir:${artifacts.root}}`` in
    conf/config.yaml): on the root itself when it is a local path (or ``file://``), else ``outputs`` in the working
    directory. Hydra writes through ``os``, so a URI root would otherwise become a local folder named ``s3:``."""
    if not is_local(root):
        return "outputs"
    # An unwritable root: Hydra's logs go to ./outputs, and the pipeline stops with a message naming artifacts.root.
    return "outputs" if write_problem(root) else root.removeprefix("file://")


def register() -> None:
    """Put the schemas into Hydra's ConfigStore (idempotent): the pipeline's, and one per registered kind; and the
    ``local_dir`` resolver conf/config.yaml uses."""
    OmegaConf.register_new_resolver("local_dir", local_dir, replace=True)
    cs = ConfigStore.instance()
    cs.store(name="pipeline_schema", node=pipeline_schema())
    for role, group in SCHEMA_GROUPS.items():
        for kind in registry.kinds(role):
            cs.store(group=group, name=f"{kind}_schema", node=schema(registry.get(kind).config, kind=kind))


# ------------------------------------------------------------------------------------------------ build
def _user_key(path: tuple[str, ...]) -> str:
    """The key a user writes for ``path`` in PipelineConfig (aliases applied)."""
    for alias, target in sorted(ALIASES.items(), key=lambda a: -len(a[1])):
        if path[: len(target)] == target:
            return ".".join((alias, *path[len(target) :]))
    return ".".join(path)


def build(cls: type, data: Any, path: tuple[str, ...] = ()) -> Any:
    """Construct config class ``cls`` from plain ``data``; every error names the user's key.

    Raises:
        ConfigError: an unknown key, a derived field set by hand, an unknown kind, or a value the config refuses.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{_user_key(path)} must be a mapping of settings, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"{_user_key((*path, unknown[0]))} is not a setting of {cls.__name__} (known: {sorted(fields)})"
        )
    kwargs = {}
    for name in [n for n in fields if n in data]:  # in field order: data (shard) before the model that uses it
        value, f, key = data[name], fields[name], (*path, name)
        if is_derived(f):
            raise ConfigError(f"{_user_key(key)} is set by the pipeline from {f.metadata['derived']}; remove it")
        tp, _ = optional_inner(hints(cls)[name])
        if is_role_base(tp) and isinstance(value, dict):
            value = dict(value)
            default = _default(f)
            kind = value.pop("kind", None) or (
                registry.kind_of(default) if default not in (MISSING, None) else registry.default_kind(tp.role)
            )
            try:
                tp = registry.get(kind, tp.role).config
            except registry.UnknownKindError as exc:
                raise ConfigError(f"{_user_key((*key, 'kind'))}: {exc}") from None
        if is_config_type(tp) and isinstance(value, dict):
            value = build(tp, value, key)
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except FieldError as exc:
        raise ConfigError(f"{_user_key((*path, exc.field))} {exc.problem}") from None


def load(cfg: DictConfig) -> PipelineConfig:
    """Resolve and validate a composed Hydra config. Raises ConfigError naming the key at fault."""
    try:
        data = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except Exception as exc:  # interpolation / missing-value errors already name the key
        raise ConfigError(str(exc).splitlines()[0]) from None
    for alias, path in sorted(ALIASES.items(), key=lambda a: len(a[1])):
        if alias in data:
            node = data
            for part in path[:-1]:
                node = node.setdefault(part, {})
            node[path[-1]] = data.pop(alias)
    data.pop("hydra", None)
    cfg_ = build(PipelineConfig, data)
    check_store_reach(cfg_)
    root = cfg_.artifacts.root
    return dataclasses.replace(
        cfg_,
        mlflow=dataclasses.replace(cfg_.mlflow, tracking_uri=absolute_tracking_uri(cfg_.mlflow.tracking_uri)),
        artifacts=ArtifactsConf(root=root if "://" in root else os.path.abspath(os.path.expanduser(root))),
    )


LOCAL_STORES = ("sqlite:", "file:")  # tracking stores that live on the driver's disk


def check_store_reach(cfg: PipelineConfig) -> None:
    """Refuse a cluster run whose MLflow store is a file on the driver's machine, before Ray starts.

    Training workers on other nodes log their curves into the store; a SQLite file (or a path) there is out of their
    reach, and the curves would be lost without an error. ``ray.address`` set (``ray=cluster``) means other nodes.
    """
    uri = cfg.mlflow.tracking_uri
    if cfg.ray.address and (uri.startswith(LOCAL_STORES) or "://" not in uri):
        raise ConfigError(
            f"mlflow.tracking_uri={uri} is a file on this machine, which the cluster's workers cannot reach "
            f"(ray.address={cfg.ray.address}): use mlflow=server, or set MLFLOW_TRACKING_URI to a tracking server "
            "every node reaches (cluster.yaml starts one on the head node)"
        )


def absolute_tracking_uri(uri: str) -> str:
    """``sqlite:///mlflow.db`` relative to where the user ran us, not to each Ray worker's working directory."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + os.path.abspath(uri[len(prefix) :])
    return uri


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """A config as flat ``a.b.c -> value`` pairs (MLflow params); polymorphic parts carry their ``kind``."""
    if isinstance(obj, ConfigBase):
        obj = obj.to_dict()
    out: dict[str, Any] = {}
    for k, v in obj.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def as_user_dict(cfg: PipelineConfig) -> dict[str, Any]:
    """The resolved config as the user writes it (aliases applied, derived fields left out): what ran, in full."""
    data = cfg.to_dict(derived=False)
    for alias, path in sorted(ALIASES.items(), key=lambda a: -len(a[1])):
        node = data
        for part in path[:-1]:
            node = node[part]
        data[alias] = node.pop(path[-1])
    return data
