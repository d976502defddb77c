r"""The step graph, as data: name, step function, upstream steps, and the kind of output each step writes.

    shard -> train_vqvae -> encode -> train_prior -> sample -> evaluate
                        \-> tune_decoder (optional) ----/

Read top to bottom, this is the whole pipeline. Each row names a step's function, its settings (a config dataclass:
:class:`~pipeline.config.PipelineConfig` gets one field of that name and type per row, and so does the Hydra
schema), its upstream steps, and its output: a handle class of :mod:`steps.artifacts` (the one protocol of
:class:`steps.artifacts.base.Artifact`), which everything downstream asks instead of the step's name: verify, the
datasets logged to MLflow, the parent run's metrics, model registration. A step is switched off for some models (an
autoencoder without codes, the Gaussian VAE, skips encode and train_prior); a step's inputs are its upstream steps
that are switched on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from steps import encode, evaluate, sample, shard, train_prior, train_vqvae, tune_decoder
from steps.artifacts.autoencoder import Autoencoder, TunedAutoencoder
from steps.artifacts.base import Artifact
from steps.artifacts.codes import CodeDataset
from steps.artifacts.evaluation import Evaluation
from steps.artifacts.images import ImageShards
from steps.artifacts.priors import Priors
from steps.artifacts.samples import Samples
from steps.core.step import StepRun
from steps.nn import registry
from steps.nn.config import ConfigBase

Config = Any  # a pipeline.config.PipelineConfig (which is built from this graph, so it cannot be imported here)


def _has_codes(cfg: Config) -> bool:
    return registry.makes_codes(cfg.model_kind)


def _always(cfg: Config) -> bool:
    return True


def _tunes_decoder(cfg: Config) -> bool:
    return cfg.tune_decoder.enabled and _has_codes(cfg)


@dataclass(frozen=True)
class Step:
    name: str  # also the PipelineConfig field (and the user's config key) holding its settings
    run: StepRun[Any]
    config_cls: type[ConfigBase]  # its settings
    upstream: tuple[str, ...]
    output: type[Artifact]  # the handle of what it writes
    enabled: Callable[[Config], bool] = _always
    trains: bool = False  # Ray Train: streams live metrics from rank-0 workers, takes the task hook (wrap_task)

    def config(self, cfg: Config) -> Any:
        """The step's own (frozen, validated) settings in a PipelineConfig."""
        return getattr(cfg, self.name)


# fmt: off
GRAPH: tuple[Step, ...] = (
    #    name           function          settings                        upstream                      output
    Step("shard",       shard.run,        shard.ShardConfig,              (),                           ImageShards),
    Step("train_vqvae", train_vqvae.run,  train_vqvae.TrainVQVAEConfig,   ("shard",),                   Autoencoder,
         trains=True),
    Step("encode",      encode.run,       encode.EncodeConfig,            ("shard", "train_vqvae"),     CodeDataset,
         enabled=_has_codes),
    Step("train_prior", train_prior.run,  train_prior.TrainPriorConfig,   ("encode",),                  Priors,
         enabled=_has_codes, trains=True),
    Step("tune_decoder", tune_decoder.run, tune_decoder.TuneDecoderConfig, ("shard", "train_vqvae"),  TunedAutoencoder,
         enabled=_tunes_decoder, trains=True),
    Step("sample",      sample.run,       sample.SampleConfig,
         ("train_vqvae", "tune_decoder", "train_prior"), Samples),
    Step("evaluate",    evaluate.run,     evaluate.EvaluateConfig,
         ("shard", "train_vqvae", "encode", "train_prior", "tune_decoder", "sample"), Evaluation),
)
# fmt: on
NAMES = tuple(s.name for s in GRAPH)
STEPS = {s.name: s for s in GRAPH}


def writer_of(output: type[Artifact]) -> Step:
    """The step that writes outputs of handle class ``output``."""
    return next(s for s in GRAPH if s.output is output)


def decoder_of(cfg: Config) -> Step:
    """The step whose autoencoder decodes this config's images: the last active one that writes an autoencoder
    (tune_decoder's retrained decoder when it is on, else train_vqvae's)."""
    return [s for s in active(cfg) if issubclass(s.output, Autoencoder)][-1]


def decoding_steps() -> set[str]:
    """The steps whose images are decoded by :func:`decoder_of`'s autoencoder: those that read the tuned decoder
    when it ran (an output of theirs was made with train_vqvae's model or tune_decoder's, as its inputs say)."""
    return {s.name for s in GRAPH if any(issubclass(STEPS[u].output, TunedAutoencoder) for u in s.upstream)}


def active(cfg: Config) -> list[Step]:
    """The steps this config uses, in dependency order."""
    return [s for s in GRAPH if s.enabled(cfg)]


def inputs_of(step: Step, cfg: Config) -> tuple[str, ...]:
    on = {s.name for s in active(cfg)}
    return tuple(u for u in step.upstream if u in on)


def downstream(names: set[str], cfg: Config) -> set[str]:
    """``names`` and every active step that depends on them, transitively."""
    out = set(names)
    for step in active(cfg):
        if any(u in out for u in inputs_of(step, cfg)):
            out.add(step.name)
    return out
