"""python -m pipeline [overrides]: run the VQ-VAE-2 pipeline (see conf/config.yaml and README.md)."""

from __future__ import annotations

import logging
import os
import sys
import traceback

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from pipeline.config import ConfigError, as_user_dict, load, register
from pipeline.outputs import OutputWriteError
from pipeline.run import MissingUpstreamError, execute
from pipeline.secrets import install_console_filter, redact, redact_console
from steps.core.step import SinkUnavailableError, TaskWrap

HERE = os.path.dirname(os.path.abspath(__file__))
# An installed wheel carries the configs as pipeline/conf; a checkout (editable install, `ray job submit
# --working-dir .`) has them at its top, beside pipeline/.
CONF_DIR = next(
    d for d in (os.path.join(HERE, "conf"), os.path.join(os.path.dirname(HERE), "conf")) if os.path.isdir(d)
)
log = logging.getLogger("pipeline")

register()


def main(wrap_task: TaskWrap | None = None) -> None:
    """Run the pipeline on the command line's overrides. ``wrap_task`` wraps every training task (what
    ``python -m pipeline.faults`` injects faults through); None in normal use."""
    redact_console()  # before Hydra: its own errors quote the overrides

    @hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
    def pipeline(dcfg: DictConfig) -> None:
        _main(dcfg, wrap_task)

    pipeline()


def _main(dcfg: DictConfig, wrap_task: TaskWrap | None) -> None:
    install_console_filter()  # Hydra has set up the console and log file: no secret reaches either
    try:
        cfg = load(dcfg)  # every value validated here, before Ray starts
        hydra = HydraConfig.get()
        overrides = list(hydra.overrides.task)
        # A debug run or one member of a multirun is a trial: by default it does not move the model alias.
        trial = hydra.runtime.choices.get("debug") not in (None, "null") or hydra.mode == RunMode.MULTIRUN
        resolved = OmegaConf.to_yaml(OmegaConf.create(as_user_dict(cfg)))  # what runs, in full
        execute(cfg, resolved, overrides, trial, dict(hydra.runtime.choices), wrap_task=wrap_task)
    except (ConfigError, MissingUpstreamError) as exc:
        _fail(exc, 2)
    except (SinkUnavailableError, OutputWriteError) as exc:  # tracking server down, or disk full: no traceback
        _fail(exc, 1)
    except Exception:  # anything else: its traceback, redacted (an error may quote a URI with its password)
        log.error("the pipeline failed:\n%s", traceback.format_exc())
        sys.exit(1)


def _fail(exc: Exception, status: int) -> None:
    log.error("%s", exc)
    print(f"error: {redact(str(exc))}", file=sys.stderr, flush=True)
    sys.exit(status)


if __name__ == "__main__":
    main()
