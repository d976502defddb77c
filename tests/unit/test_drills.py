"""The fault-drill harness's own clean-up: bench/faults.py must print its JSON line and exit 0 after its scenarios,
which needs every tmpfs a scenario kept mounted (disk_full) released before the bench's folder is removed."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

from drills import io_faults

BENCH = Path(__file__).resolve().parents[2] / "bench" / "faults.py"


def bench_faults():
    spec = importlib.util.spec_from_file_location("bench_faults", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_bench_folder_goes_although_a_scenario_kept_a_tmpfs_mounted_in_it():
    with bench_faults().scratch(None) as base:
        with io_faults.tmpfs(base / "disk_full" / "artifacts", "size=1m", keep=True) as cannot:
            if cannot:
                pytest.skip(cannot)
            (base / "disk_full" / "artifacts" / "x").write_text("on the tmpfs")
        assert os.path.ismount(base / "disk_full" / "artifacts"), "kept mounted after its block, as disk_full needs"
    assert not base.exists(), "released, then removed: no EBUSY"


def test_a_kept_workdir_is_kept_and_its_mounts_released(tmp_path):
    with bench_faults().scratch(str(tmp_path)) as base, io_faults.tmpfs(base / "root", "size=1m", keep=True) as cannot:
        if cannot:
            pytest.skip(cannot)
    assert tmp_path.exists() and not os.path.ismount(tmp_path / "root")
