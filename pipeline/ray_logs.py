"""Ray's own console output: quiet by default, all of it back with one setting, ``ray.log_level``.

At INFO, Ray prints what a person running the pipeline has no use for: Ray Data announces every dataset pass (the
training loop makes one per epoch, so hundreds of "Starting execution of Dataset ..." lines) and a notice that its
progress bars are off; Ray Train reports every worker group, process group, checkpoint and report. Most of it comes
from worker processes (training workers, Ray Data's split coordinators), which set up their own logging, so the
driver's loggers do not reach it. Hence three levers, all driven by the one level:

* the driver: :func:`quiet_driver` sets the ``ray.data`` and ``ray.train`` loggers;
* every worker of the job: :func:`runtime_env` (for ``ray.init``) hands them the level in ``RAY_DATA_LOG_LEVEL``
  (which Ray Data reads whenever it sets up its logger) and runs :func:`setup_worker` in each worker at start-up;
* Ray Train's own workers and controller: :func:`steps.training.loop.fit` passes the driver's ``ray.train`` level as
  ``RunConfig(logging_config=...)``.

``ray.log_level=INFO`` (or DEBUG) leaves Ray as it is: every line back, progress bars on. WARNING, the default, keeps
Ray's warnings and errors. This module is imported in every Ray worker: keep its imports light.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any

LEVEL_ENV = "RAY_DATA_LOG_LEVEL"
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# Ray Data warns once per process that its progress bars are off, keyed by this name (ray.util.debug.log_once).
PROGRESS_BARS_NOTICE = "ray_data_progress_manager_disabled"
TRAIN_REPORT_LOGGER = os.path.join("train", "v2", "_internal", "execution", "context.py")  # under ray's package
JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # the runtime env of a `ray job submit` job, seen by its driver


def is_quiet(level: str) -> bool:
    """Whether ``level`` hides Ray's INFO lines."""
    return level.upper() not in ("DEBUG", "INFO")


def runtime_env(level: str) -> dict[str, Any]:
    """The ``runtime_env`` for ``ray.init``: the worker set-up hook and, when quiet, the level for Ray Data.

    Ray refuses to merge a job's runtime env (``ray job submit --runtime-env-json``) with the driver's when both set
    the same field, so whatever the job already sets is left to the job.
    """
    job = _job_runtime_env()
    env: dict[str, Any] = {}
    if "worker_process_setup_hook" not in job:
        env["worker_process_setup_hook"] = f"{__name__}.setup_worker"
    taken = set(job.get("env_vars") or {}) | set(os.environ)
    if is_quiet(level) and LEVEL_ENV not in taken:
        env["env_vars"] = {LEVEL_ENV: level.upper()}
    return env


def _job_runtime_env() -> dict[str, Any]:
    raw = os.environ.get(JOB_CONFIG_ENV)
    if not raw:
        return {}
    try:
        return json.loads(raw).get("runtime_env") or {}
    except (ValueError, AttributeError):
        return {}


def quiet_driver(level: str) -> None:
    """Ray's loggers on this (the driver's) process; Ray Data's progress bars only when Ray is not quiet."""
    import ray.data
    from ray.util.debug import log_once

    level = level.upper()
    for name in ("ray.data", "ray.train"):
        logging.getLogger(name).setLevel(level)
    ray.data.DataContext.get_current().enable_progress_bars = not is_quiet(level)
    if is_quiet(level):
        log_once(PROGRESS_BARS_NOTICE)  # taken: the notice will not print


def setup_worker() -> None:
    """Ray's ``worker_process_setup_hook``: runs in every worker process of the job before it does any work.

    Our steps' INFO lines (progress of the evaluation task, a resumed training) reach the console: a plain Ray worker
    has no logging handler, so they would be dropped. Ray Train's workers replace the root handler with their own.
    ``RAY_ADDRESS`` names this job's cluster: Ray Train's placement-group cleaner looks its cluster up by it, or else
    by scanning this machine's processes, which fails (a 30-line traceback per training) when two Rays run here: two
    pipelines, or a pipeline beside the test suite.

    When quiet, Ray Data's notice that progress bars are off is taken before it prints, and Ray Train's report lines
    ("Reporting training result ...") are held back: their logger is named by its file's path, not ``ray.train.*``
    (``logging.getLogger(__file__)`` in Ray), so Train's own level misses it.
    """
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        root.addHandler(handler)
    logging.getLogger("steps").setLevel(logging.INFO)
    import ray

    os.environ.setdefault("RAY_ADDRESS", ray.get_runtime_context().gcs_address)
    level = os.environ.get(LEVEL_ENV, "INFO").upper()
    if is_quiet(level):
        from ray.util.debug import log_once

        log_once(PROGRESS_BARS_NOTICE)
        train_context = os.path.join(os.path.dirname(ray.__file__), TRAIN_REPORT_LOGGER)
        logging.getLogger(train_context).setLevel(level)
