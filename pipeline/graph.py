"""The step graph, as data: name, step function, upstream steps.

    shard -> train_vqvae -> encode -> train_prior -> sample -> evaluate

Read top to bottom, this is the whole pipeline. A step's settings are the field of the same name in
:class:`~pipeline.config.PipelineConfig`. A step is switched off for some models (an autoencoder without codes, the
Gaussian VAE, skips encode and train_prior); a step's inputs are its upstream steps that are switched on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pipeline.config import PipelineConfig
from steps import encode, evaluate, sample, shard, train_prior, train_vqvae
from steps.core.step import StepRun
from steps.nn import registry


def _has_codes(cfg: PipelineConfig) -> bool:
    return registry.makes_codes(cfg.model_kind)


def _always(cfg: PipelineConfig) -> bool:
    return True


@dataclass(frozen=True)
class Step:
    name: str  # also the PipelineConfig field holding its settings
    run: StepRun[Any]
    upstream: tuple[str, ...]
    enabled: Callable[[PipelineConfig], bool] = _always
    trains: bool = False  # streams live metrics from rank-0 workers

    def config(self, cfg: PipelineConfig) -> Any:
        """The step's own (frozen, validated) settings."""
        return getattr(cfg, self.name)


GRAPH: tuple[Step, ...] = (
    Step("shard", shard.run, ()),
    Step("train_vqvae", train_vqvae.run, ("shard",), trains=True),
    Step("encode", encode.run, ("shard", "train_vqvae"), enabled=_has_codes),
    Step("train_prior", train_prior.run, ("encode",), enabled=_has_codes, trains=True),
    Step("sample", sample.run, ("train_vqvae", "train_prior")),
    Step("evaluate", evaluate.run, ("shard", "train_vqvae", "encode", "train_prior", "sample")),
)
NAMES = tuple(s.name for s in GRAPH)
DATASETS = ("shard", "encode")  # steps whose output is a Parquet dataset (logged as MLflow inputs where read)


def active(cfg: PipelineConfig) -> list[Step]:
    """The steps this config uses, in dependency order."""
    return [s for s in GRAPH if s.enabled(cfg)]


def inputs_of(step: Step, cfg: PipelineConfig) -> tuple[str, ...]:
    on = {s.name for s in active(cfg)}
    return tuple(u for u in step.upstream if u in on)


def downstream(names: set[str], cfg: PipelineConfig) -> set[str]:
    """``names`` and every active step that depends on them, transitively."""
    out = set(names)
    for step in active(cfg):
        if any(u in out for u in inputs_of(step, cfg)):
            out.add(step.name)
    return out
