"""The ``train_prior`` step: autoregressive priors over the code dataset (VQ-VAE-2, section 3.2).

One prior per level of the code dataset. The top prior is a gated PixelCNN with causal self-attention (PixelSNAIL
style); the bottom prior is a gated PixelCNN conditioned on the true top codes. Given the codes the two are
independent, so with ``parallel=true`` both train at the same time (two Ray Train runs side by side) when the
cluster has room. Either can be class-conditional when the code dataset has labels.

    <out>/top.pt, <out>/bottom.pt   prior checkpoints (format 1) with extra keys level, vqvae, num_classes, step
    <out>/priors.json               levels, VQ-VAE digest, final metrics per level (NLL in bits per code)
    <out>/ray/                      Ray Train run state (a rerun after a crash resumes from it)
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from steps import common
from steps.codes import CodeMeta, batch_to_tensors, parquet_files, read_code_meta
from steps.common import MetricsSink, PrefixSink, StepResult, require_input
from steps.nn.prior import PixelCNNPrior, PriorConfig
from steps.training import TrainConfig, TrainTask, export_checkpoint, fit, run_storage

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PriorHParams:
    """Architecture of one prior; its code-map shape and codebook size come from the code dataset."""

    channels: int = 128
    layers: int = 10
    kernel_size: int = 5
    dropout: float = 0.1
    attn_heads: int = 0
    attn_every: int = 2
    cond_channels: int = 64
    cond_res_blocks: int = 2

    def __post_init__(self) -> None:
        # Check the architecture now, not after encoding: the same checks as the full config, on a stand-in shape.
        probe = {"num_codes": 2, "shape": (8, 8), "cond_num_codes": 2, "cond_shape": (4, 4)}
        try:
            PriorConfig(**probe, **asdict(self))
        except ValueError as exc:
            raise ValueError(str(exc).replace("PriorConfig.", "PriorHParams.")) from None


def _top_default() -> PriorHParams:
    return PriorHParams(attn_heads=4)


@dataclass(frozen=True)
class TrainPriorConfig:
    top: PriorHParams = field(default_factory=_top_default)
    bottom: PriorHParams = field(default_factory=PriorHParams)
    train: TrainConfig = field(default_factory=TrainConfig)
    class_conditional: bool = False
    parallel: bool = True  # train the levels at the same time

    def __post_init__(self) -> None:
        self.train.validate("train_prior.train")


def prior_config(hp: PriorHParams, meta: CodeMeta, level: str, class_conditional: bool) -> PriorConfig:
    """The full prior config of ``level``: architecture from ``hp``, shapes from the code dataset."""
    cond = {}
    if level != meta.levels[0]:  # every level below the top sees the level above it
        above = meta.levels[meta.levels.index(level) - 1]
        cond = {"cond_num_codes": meta.codebook_size[above], "cond_shape": meta.shapes[above]}
    try:
        return PriorConfig(
            num_codes=meta.codebook_size[level],
            shape=meta.shapes[level],
            channels=hp.channels,
            layers=hp.layers,
            kernel_size=hp.kernel_size,
            dropout=hp.dropout,
            num_classes=meta.num_classes if class_conditional else 0,
            attn_heads=hp.attn_heads,
            attn_every=hp.attn_every,
            cond_channels=hp.cond_channels,
            cond_res_blocks=hp.cond_res_blocks,
            **cond,
        )
    except ValueError as exc:  # name the config group the user would edit
        raise ValueError(str(exc).replace("PriorConfig.", f"train_prior.{level}.")) from None


class PriorTask(TrainTask):
    """Trains the prior of one level on code-dataset batches."""

    def __init__(self, level: str, config: dict[str, Any], meta: dict[str, Any]) -> None:
        self.name = f"train_prior[{level}]"
        self.level = level
        self.config = config
        self.meta = meta

    def build_model(self) -> torch.nn.Module:
        return PixelCNNPrior(PriorConfig.from_dict(self.config))

    def prepare_batch(self, batch: Mapping[str, Any], device: torch.device) -> dict[str, torch.Tensor | None]:
        meta = CodeMeta.from_json(self.meta)
        tensors = batch_to_tensors(batch, meta)
        cfg = PriorConfig.from_dict(self.config)
        above = meta.levels[meta.levels.index(self.level) - 1] if cfg.cond_num_codes else None
        return {
            "codes": tensors[self.level].to(device),
            "cond": tensors[above].to(device) if above else None,
            "labels": tensors["label"].clamp_min(0).to(device) if cfg.num_classes else None,
        }

    def loss(self, model, batch):
        logits = model(batch["codes"], batch["labels"], batch["cond"])  # (B, K, H, W); may be bf16 under autocast
        nll = torch.nn.functional.cross_entropy(logits.float(), batch["codes"]) / math.log(2.0)
        return nll, {"nll_bits": nll.detach()}

    def evaluate(self, model, batches) -> dict[str, float]:
        if not batches:
            return {}
        total = sum(model.nll_bits(b["codes"], b["labels"], b["cond"]).item() * len(b["codes"]) for b in batches)
        return {"nll_bits": total / sum(len(b["codes"]) for b in batches)}


def _train_level(level, config, meta, cfg, code_uri, storage, sink):
    import ray.data

    columns = [*meta.levels, "label"]
    datasets = {"train": ray.data.read_parquet(parquet_files(common.join(code_uri, "train")), columns=columns)}
    val_files = parquet_files(common.join(code_uri, "val"))
    if val_files:
        datasets["val"] = ray.data.read_parquet(val_files, columns=columns)
    task = PriorTask(level, config.to_dict(), meta.to_dict())
    prefixed = PrefixSink(sink, f"{level}/") if sink is not None else None
    return fit(task, cfg.train, datasets, storage=storage, name=f"prior_{level}", sink=prefixed)


def run(cfg: TrainPriorConfig, inputs: Mapping[str, str], out: str, sink: MetricsSink | None = None) -> StepResult:
    code_uri = require_input(inputs, "train_prior", "encode")
    meta = read_code_meta(code_uri)
    if cfg.class_conditional and meta.num_classes is None:
        raise ValueError(
            f"train_prior.class_conditional=true, but the code dataset at {code_uri} has no labels "
            "(shard a source with labels, or set train_prior.class_conditional=false)"
        )
    if not parquet_files(common.join(code_uri, "train")):
        raise FileNotFoundError(f"no training codes under {common.join(code_uri, 'train')}: run the encode step")
    hparams = {"top": cfg.top, "bottom": cfg.bottom}
    configs = {lvl: prior_config(hparams[lvl], meta, lvl, cfg.class_conditional) for lvl in meta.levels}
    storage = run_storage(out)

    jobs = {lvl: (lvl, configs[lvl], meta, cfg, code_uri, storage, sink) for lvl in meta.levels}
    if cfg.parallel and len(jobs) > 1:
        with ThreadPoolExecutor(max_workers=len(jobs), thread_name_prefix="train_prior") as pool:
            futures = {lvl: pool.submit(_train_level, *args) for lvl, args in jobs.items()}
            results = {lvl: f.result() for lvl, f in futures.items()}
    else:
        results = {lvl: _train_level(*args) for lvl, args in jobs.items()}

    metrics: dict[str, float] = {}
    artifacts: dict[str, str] = {}
    summary: dict[str, Any] = {"levels": list(meta.levels), "vqvae": meta.vqvae, "metrics": {}}
    for lvl, result in results.items():
        uri = common.join(out, f"{lvl}.pt")
        num_classes = meta.num_classes if cfg.class_conditional else None
        with result.checkpoint.as_directory() as d:
            export_checkpoint(d, uri, level=lvl, vqvae=meta.vqvae, num_classes=num_classes)
        artifacts[f"prior_{lvl}"] = uri
        level_metrics = {k.replace("/", "_"): float(v) for k, v in (result.metrics or {}).items() if k != "step"}
        summary["metrics"][lvl] = level_metrics
        metrics.update({f"{lvl}_{k}": v for k, v in level_metrics.items()})
    common.write_json(common.join(out, "priors.json"), summary)
    artifacts["metadata"] = common.join(out, "priors.json")
    return StepResult(metrics=metrics, artifacts=artifacts, info={"vqvae": meta.vqvae, "levels": list(meta.levels)})
