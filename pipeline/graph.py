"""The step graph, as data: name, upstream steps, the step function and its slice of the config.

    shard -> train_vqvae -> encode -> train_prior -> sample -> evaluate

Read top to bottom, this is the whole pipeline. A step is switched off for some models (a Gaussian VAE has no codes,
so it skips encode and train_prior); a step's inputs are its upstream steps that are switched on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pipeline.config import PipelineConfig
from steps import encode, evaluate, sample, shard, train_prior, train_vqvae


def _has_codes(cfg: PipelineConfig) -> bool:
    return cfg.model_kind != "vae"


def _always(cfg: PipelineConfig) -> bool:
    return True


@dataclass(frozen=True)
class Step:
    name: str
    run: Callable[..., Any]  # run(step_config, inputs, out, sink) -> StepResult
    upstream: tuple[str, ...]
    config: Callable[[PipelineConfig], Any]  # the step's own (frozen, validated) config
    enabled: Callable[[PipelineConfig], bool] = _always
    trains: bool = False  # streams live metrics from rank-0 workers


GRAPH: tuple[Step, ...] = (
    Step("shard", shard.run, (), lambda c: c.shard),
    Step("train_vqvae", train_vqvae.run, ("shard",), lambda c: c.train_vqvae, trains=True),
    Step("encode", encode.run, ("shard", "train_vqvae"), lambda c: c.encode, enabled=_has_codes),
    Step("train_prior", train_prior.run, ("encode",), lambda c: c.train_prior, enabled=_has_codes, trains=True),
    Step("sample", sample.run, ("train_vqvae", "train_prior"), lambda c: c.sample),
    Step("evaluate", evaluate.run, ("shard", "train_vqvae", "encode", "train_prior", "sample"), lambda c: c.evaluate),
)
NAMES = tuple(s.name for s in GRAPH)


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
