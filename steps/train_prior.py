"""The ``train_prior`` step: autoregressive priors over the code dataset (VQ-VAE-2, section 3.2).

One prior per level of the code dataset, of whatever architecture ``prior.<level>`` configures (a prior kind of
:mod:`steps.nn.registry`: the gated PixelCNN, with PixelSNAIL-style attention for the top level by default). Every
level below the top is conditioned on the true codes of the level above. Given the codes the priors are
independent, so with ``parallel=true`` they train at the same time (Ray Train runs side by side) when the cluster
has room. They can be class-conditional when the code dataset has labels.

Writes the priors artifact (:mod:`steps.artifacts.priors`): one checkpoint per level tagged with the VQ-VAE digest,
a summary with the final metrics (NLL in bits per code), and Ray Train's run state (a rerun after a crash resumes).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from steps.artifacts.code_format import CodeMeta, batch_to_tensors
from steps.artifacts.codes import CodeDataset
from steps.artifacts.priors import PriorsWriter
from steps.core.step import MetricsSink, MissingInputError, PrefixSink, StepResult, TaskWrap, require_input
from steps.nn import registry
from steps.nn.config import ConfigBase, FieldError, later
from steps.nn.pixelcnn import PixelCNNConfig
from steps.nn.prior import PriorConfig, drop_labels
from steps.training.loop import final_payload, fit
from steps.training.task import TrainConfig, TrainTask
from steps.training.threads import ThreadLedger

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LevelPriors(ConfigBase):
    """The prior of each level: any prior kind, its fields derived from the code dataset filled in by the step.

    ``middle`` is the prior of every level between the top and the bottom of a model with more than two levels; unset,
    they take the bottom's (each is conditioned on the level above, as the bottom is)."""

    top: PriorConfig = field(default_factory=lambda: PixelCNNConfig(attn_heads=4))
    bottom: PriorConfig = field(default_factory=PixelCNNConfig)
    middle: PriorConfig | None = later(None)

    def name_of(self, level: str, levels: Sequence[str]) -> str:
        """The field that configures ``level`` of ``levels`` (top first): ``prior.<name>`` to the user."""
        if level == levels[0]:
            return "top"
        if level == levels[-1] or self.middle is None:
            return "bottom"
        return "middle"


@dataclass(frozen=True)
class TrainPriorConfig(ConfigBase):
    prior: LevelPriors = field(default_factory=LevelPriors)
    train: TrainConfig = field(default_factory=TrainConfig)
    class_conditional: bool = False
    parallel: bool = True  # train the levels at the same time
    # With parallel: when a level finishes, its CPU threads go to the levels still training on the same node
    # (steps/training/threads.py). Faster on CPU, but a level that took up threads is no longer bitwise what the same
    # run without would be (the thread count changes a few reductions' order, and when it changes depends on timing).
    share_threads: bool = False


def prior_config(cfg: TrainPriorConfig, meta: CodeMeta, level: str) -> PriorConfig:
    """The full config of ``level``'s prior: the architecture of ``cfg.prior``, what it models from the code data."""
    above = meta.levels[meta.levels.index(level) - 1] if level != meta.levels[0] else None
    derived = {
        "num_codes": meta.codebook_size[level],
        "shape": meta.shapes[level],
        "num_classes": (meta.num_classes or 0) if cfg.class_conditional else 0,
        "cond_num_codes": meta.codebook_size[above] if above else 0,
        "cond_shape": meta.shapes[above] if above else (0, 0),
    }
    name = cfg.prior.name_of(level, meta.levels)
    try:
        return replace(getattr(cfg.prior, name), **derived)
    except FieldError as exc:  # the architecture does not fit this code map: name the config group to edit
        raise ValueError(f"prior.{name}.{exc.field} {exc.problem} (for the {level} codes of {meta.shapes})") from None


class PriorTask(TrainTask):
    """Trains the prior of one level on code-dataset batches."""

    progress_val = ("nll_bits", "val bits")

    def __init__(self, level: str, config: PriorConfig, meta: CodeMeta) -> None:
        self.name = f"train_prior[{level}]"
        self.level = level
        self.config = config
        self.meta = meta

    def build_model(self) -> torch.nn.Module:
        return registry.build(self.config)

    def prepare_batch(self, batch: Mapping[str, Any], device: torch.device) -> dict[str, torch.Tensor | None]:
        meta, cfg = self.meta, self.config
        tensors = batch_to_tensors(batch, meta)
        above = meta.levels[meta.levels.index(self.level) - 1] if cfg.cond_num_codes else None
        return {
            "codes": tensors[self.level].to(device),
            "cond": tensors[above].to(device) if above else None,
            "labels": tensors["label"].clamp_min(0).to(device) if cfg.num_classes else None,
        }

    def loss(self, model, batch):
        labels = drop_labels(self.config, batch["labels"])  # training only: evaluate scores the true labels
        logits = model(batch["codes"], labels, batch["cond"])  # (B, K, H, W); may be bf16 under autocast
        nll = torch.nn.functional.cross_entropy(logits.float(), batch["codes"]) / math.log(2.0)
        return nll, {"nll_bits": nll.detach()}

    def evaluate(self, model, batches) -> dict[str, float]:
        if not batches:
            return {}
        total = sum(model.nll_bits(b["codes"], b["labels"], b["cond"]).item() * len(b["codes"]) for b in batches)
        return {"nll_bits": total / sum(len(b["codes"]) for b in batches)}


def _train_level(
    level: str, config: PriorConfig, codes: CodeDataset, cfg: TrainPriorConfig, storage: str, sink, wrap_task,
    threads: ThreadLedger | None = None,
):  # fmt: skip
    import ray.data

    columns = [*codes.meta.levels, "label"]
    datasets = {"train": ray.data.read_parquet(codes.files("train"), columns=columns)}
    val_files = codes.files("val")
    if val_files:
        datasets["val"] = ray.data.read_parquet(val_files, columns=columns)
    task = PriorTask(level, config, codes.meta)
    prefixed = PrefixSink(sink, f"{level}/") if sink is not None else None
    return fit(task, cfg.train, datasets, storage=storage, name=f"prior_{level}", sink=prefixed, wrap_task=wrap_task,
               threads=threads)  # fmt: skip


def run(
    cfg: TrainPriorConfig, inputs: Mapping[str, str], out: str, sink: MetricsSink | None = None,
    wrap_task: TaskWrap | None = None,
) -> StepResult:  # fmt: skip
    """Train one prior per level of the code dataset ``inputs["encode"]``; write the priors artifact to ``out``.

    Raises:
        MissingInputError: no code dataset, or no training codes in it.
        ValueError: class conditioning without labels, or an architecture that does not fit a code map.
    """
    codes = CodeDataset.open(require_input(inputs, "train_prior", "encode"))
    meta = codes.meta
    if cfg.class_conditional and meta.num_classes is None:
        raise ValueError(
            f"train_prior.class_conditional=true, but the code dataset at {codes.uri} has no labels "
            "(shard a source with labels, or set train_prior.class_conditional=false)"
        )
    if not codes.files("train"):
        raise MissingInputError(f"no training codes under {codes.split_uri('train')}: run the encode step")
    configs = {lvl: prior_config(cfg, meta, lvl) for lvl in meta.levels}
    writer = PriorsWriter(out)
    jobs = {lvl: (lvl, configs[lvl], codes, cfg, writer.train_state, sink, wrap_task) for lvl in meta.levels}
    if cfg.parallel and len(jobs) > 1:
        ledger = ThreadLedger() if cfg.share_threads else None
        try:
            with ThreadPoolExecutor(max_workers=len(jobs), thread_name_prefix="train_prior") as pool:
                futures = {lvl: pool.submit(_train_level, *args, ledger) for lvl, args in jobs.items()}
                results = {lvl: f.result() for lvl, f in futures.items()}
        finally:
            if ledger is not None:
                ledger.close()
    else:
        results = {lvl: _train_level(*args) for lvl, args in jobs.items()}

    metrics: dict[str, float] = {}
    artifacts: dict[str, str] = {}
    per_level: dict[str, dict[str, float]] = {}
    for lvl, result in results.items():
        artifacts[f"prior_{lvl}"] = writer.write_level(lvl, final_payload(result), vqvae=meta.vqvae)
        per_level[lvl] = {k.replace("/", "_"): float(v) for k, v in (result.metrics or {}).items() if k != "step"}
        metrics.update({f"{lvl}_{k}": v for k, v in per_level[lvl].items()})
    artifacts["metadata"] = writer.finish(list(meta.levels), meta.vqvae, per_level)
    return StepResult(metrics=metrics, artifacts=artifacts, info={"vqvae": meta.vqvae, "levels": list(meta.levels)})
