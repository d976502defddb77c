"""Plan the step graph against the cache, then run what is missing, each step inside its MLflow child run."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pipeline import __version__, cache, graph, outputs, ray_logs
from pipeline.config import ConfigError, PipelineConfig, flatten
from pipeline.secrets import redact, redact_overrides
from pipeline.serving import registration
from pipeline.tracking import Tracker, login_problem, result_record, run_name, run_params
from pipeline.tracking_buffer import MLflowSink
from steps.artifacts.priors import Priors
from steps.core.step import TaskWrap

log = logging.getLogger("pipeline")
RUN_ONLY = ("seconds", "steps_run")  # parent-run metrics that say nothing about a model


class MissingUpstreamError(RuntimeError):
    """A selected step needs an upstream output that is not in the cache."""


@dataclass
class Planned:
    step: graph.Step
    fingerprint: str
    inputs: dict[str, str]  # upstream name -> final URI
    input_fps: dict[str, str]  # upstream name -> fingerprint
    action: str  # "run" | "cached"
    record: dict | None = None
    seconds: float = 0.0
    result: dict[str, Any] = field(default_factory=dict)


def plan(cfg: PipelineConfig, store: cache.ArtifactStore) -> list[Planned]:
    active = graph.active(cfg)
    names = [s.name for s in active]
    for key, values in (("steps", cfg.steps), ("force", cfg.force)):
        unknown = [v for v in values if v not in graph.NAMES]
        if unknown:
            raise ConfigError(f"{key}: unknown step(s) {unknown}; steps are {list(graph.NAMES)}")
        off = [v for v in values if v not in names]
        if off:
            raise ConfigError(f"{key}: {off} not used with model.kind={cfg.model_kind} (steps: {names})")
    selected = set(cfg.steps) or set(names)
    forced = graph.downstream(set(cfg.force), cfg) & selected
    fps: dict[str, str] = {}
    planned: list[Planned] = []
    for step in active:
        ups = graph.inputs_of(step, cfg)
        fps[step.name] = cache.fingerprint(step.name, step.config(cfg), {u: fps[u] for u in ups})
        if step.name not in selected:
            continue
        record = store.record(step.name, fps[step.name])
        action = "run" if record is None or step.name in forced else "cached"
        inputs = {u: store.final(u, fps[u]) for u in ups}
        planned.append(Planned(step, fps[step.name], inputs, {u: fps[u] for u in ups}, action, record))
    will_run = {p.step.name for p in planned if p.action == "run"}
    for p in planned:
        if p.action != "run":
            continue
        for up, uri in p.inputs.items():
            if up not in will_run and store.record(up, fps[up]) is None:
                raise MissingUpstreamError(
                    f"{p.step.name} needs the {up} output for this config ({uri}), which does not exist: run "
                    f"`python -m pipeline steps=[{up}]` with the same settings, or the whole pipeline"
                )
    return planned


def worker_tracking_uri(uri: str) -> str:
    """A server on this machine's loopback is not reachable from other nodes: give workers this node's IP. On a
    one-node Ray (a laptop) the loopback address stays, so a server bound to 127.0.0.1 is reached as it is."""
    for host in ("127.0.0.1", "localhost"):
        if uri.startswith(f"http://{host}:"):
            import ray

            if ray.is_initialized() and sum(1 for n in ray.nodes() if n.get("Alive")) > 1:
                return uri.replace(host, ray.util.get_node_ip_address(), 1)
    return uri


def _start_ray(cfg: PipelineConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    kwargs: dict[str, Any] = {"include_dashboard": cfg.ray.include_dashboard}
    if not address:
        kwargs.update(num_cpus=cfg.ray.num_cpus, num_gpus=cfg.ray.num_gpus)
    # Workers import our packages from the working directory that `ray job submit --working-dir` ships, or from
    # this checkout when run locally. Ray's chatter is set per process (pipeline/ray_logs.py); not ray.LoggingConfig,
    # which would also lower this driver's own logging and hide the step progress lines.
    ray.init(address=address, runtime_env=ray_logs.runtime_env(cfg.ray.log_level), **kwargs)
    ray_logs.quiet_driver(cfg.ray.log_level)


def execute(
    cfg: PipelineConfig,
    resolved_yaml: str,
    overrides: list[str],
    trial: bool = False,
    choices: Mapping[str, str | None] | None = None,
    wrap_task: TaskWrap | None = None,
) -> list[Planned]:
    """Run the plan. ``trial``: a debug run or a multirun member, which by default does not move the model alias.
    ``choices``: Hydra's chosen option per config group (experiment, model, ...), recorded on the parent run.
    ``wrap_task``: wraps the training steps' tasks (``python -m pipeline.faults``); None in normal use."""
    if (problem := outputs.write_problem(cfg.root)) is not None:  # before Ray starts, with the setting's name
        raise ConfigError(f"artifacts.root {cfg.root!r} is not writable: {problem}")
    if (problem := login_problem(cfg.mlflow.tracking_uri)) is not None:  # before Ray starts too
        raise ConfigError(f"mlflow.tracking_uri: {problem}")
    store = cache.ArtifactStore(cfg.root)
    planned = plan(cfg, store)
    todo = [p.step.name for p in planned if p.action == "run"]
    log.info("plan: %s", ", ".join(f"{p.step.name}={p.action}" for p in planned))
    if todo:
        _start_ray(cfg)
    tags = {"overrides": redact_overrides(overrides)[:5000], "version": __version__, "artifacts_root": redact(cfg.root)}
    choices = dict(choices or {})
    name = cfg.mlflow.run_name or run_name(overrides, choices)
    m = cfg.mlflow
    with Tracker(m.tracking_uri, m.experiment, name, tags, m.system_metrics, m.outage_limit_s) as tracker:
        tracker.log_text(resolved_yaml, "config.yaml")
        for p in planned:
            _execute_one(p, cfg, store, tracker, wrap_task)
        datasets = {p.step.name: (store.final(p.step.name, p.fingerprint), p.fingerprint) for p in planned
                    if p.record and p.step.output.is_dataset}  # fmt: skip
        tracker.log_run(run_params(overrides, choices), _run_metrics(planned), datasets)
        if cfg.mlflow.register_models:
            move = cfg.mlflow.move_alias if cfg.mlflow.move_alias is not None else not trial
            _register_models(planned, cfg, store, move)
    _print_summary(planned)
    print(tracker.where(), flush=True)  # redacted
    return planned


def _execute_one(
    p: Planned, cfg: PipelineConfig, store: cache.ArtifactStore, tracker: Tracker, wrap_task: TaskWrap | None
) -> None:
    step, fp = p.step, p.fingerprint
    step_cfg = step.config(cfg)
    datasets = {u: (uri, p.input_fps[u]) for u, uri in p.inputs.items() if graph.STEPS[u].output.is_dataset}
    with tracker.step(step.name, fp, p.inputs, flatten(step_cfg), datasets) as run_id:
        if p.action == "cached":
            log.info("%s: cached (%s)", step.name, store.final(step.name, fp))
            tracker.cached(run_id, p.record)
            return
        with store.lock(step.name, fp):
            record = store.record(step.name, fp)
            if record is not None and step.name not in graph.downstream(set(cfg.force), cfg):
                p.action, p.record = "cached", record  # another pipeline finished it while we waited
                tracker.cached(run_id, record)
                return
            if step.name in cfg.force or record is not None:
                store.clear_work_dir(step.name, fp)  # forced: start over rather than resume
            work = store.work_dir(step.name, fp)
            hooks = {}  # a training step's live metrics and task hook
            if step.trains:
                sink = MLflowSink(worker_tracking_uri(cfg.mlflow.tracking_uri), run_id, cfg.mlflow.outage_limit_s)
                hooks = {"sink": sink, "wrap_task": wrap_task}
            log.info("%s: running -> %s", step.name, work)
            start = time.perf_counter()
            try:
                result = step.run(step_cfg, p.inputs, work, **hooks)
            except Exception as exc:
                if (why := outputs.storage_failure(exc)) is None:
                    raise
                raise outputs.write_error(step.name, work, cfg.root, why) from exc
            p.seconds = time.perf_counter() - start
            final = store.final(step.name, fp)
            out = result_record(result)
            out["artifacts"] = {k: cache.relocate(v, work, final) for k, v in out["artifacts"].items()}
            record = {
                "step": step.name,
                "fingerprint": fp,
                "version": __version__,
                "inputs": p.inputs,
                "config": flatten(step_cfg),
                "mlflow_run_id": run_id,
                "seconds": round(p.seconds, 2),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                **out,
            }
            store.publish(step.name, fp, record)
        p.record = record
        tracker.log_result(run_id, {**result.metrics, "seconds": p.seconds}, out["artifacts"])


def _run_metrics(planned: list[Planned]) -> dict[str, float]:
    """The parent run's metrics: the headline figures of every finished output (run or cached; the evaluate step's
    are the only ones today, :meth:`steps.artifacts.base.Artifact.headline`) and the seconds spent."""
    metrics: dict[str, float] = {}
    for p in planned:
        if p.record:
            metrics.update(p.step.output.headline(p.record.get("metrics", {})))
    metrics["seconds"] = sum(p.seconds for p in planned)
    metrics["steps_run"] = sum(p.action == "run" for p in planned)
    return metrics


def _register_models(planned: list[Planned], cfg: PipelineConfig, store: cache.ArtifactStore, move: bool) -> None:
    """Register the run's generator and encoder (:mod:`pipeline.serving.registration`) when its outputs include a
    whole generator: the autoencoder, and the priors if this config trains any."""
    done = {p.step.name: p for p in planned if p.record is not None}
    needed = [graph.decoder_of(cfg), graph.writer_of(Priors)]
    needed = [s for s in needed if s in graph.active(cfg)]
    if any(s.name not in done for s in needed):
        return  # a run of some steps only: nothing new to register
    import mlflow

    made = {s.output: store.final(s.name, done[s.name].fingerprint) for s in needed}
    autoencoder = made[needed[0].output]
    fingerprints = "/".join(done[s.name].fingerprint for s in needed)
    tags = {"pipeline_run_id": mlflow.active_run().info.run_id, "model_kind": cfg.model_kind}
    tags |= {f"metric.{k}": f"{v:.6g}" for k, v in _run_metrics(planned).items() if k not in RUN_ONLY}
    try:
        registration.register(cfg.mlflow.experiment, autoencoder, made.get(Priors), fingerprints,
                              cfg.mlflow.model_alias, move, tags)  # fmt: skip
    except Exception as exc:  # registration is a convenience: never fail a finished pipeline over it
        log.warning("could not register the generator in MLflow: %s", exc)


def _print_summary(planned: list[Planned]) -> None:
    lines = ["", f"{'step':<12} {'status':<7} {'seconds':>8}  output"]
    for p in planned:
        final = (p.record or {}).get("artifacts", {})
        where = next(iter(final.values()), "") if final else ""
        lines.append(f"{p.step.name:<12} {p.action:<7} {p.seconds:>8.1f}  {os.path.dirname(where) or where}")
    total = sum(p.seconds for p in planned)
    lines.append(f"{'total':<12} {'':<7} {total:>8.1f}")
    print(redact("\n".join(lines)), flush=True)  # output URIs may hold credentials
