"""A wheel (``pip install .``, not editable) carries the configs: the pipeline runs from any working directory."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_wheel_runs_the_pipeline_from_another_directory(tmp_path):
    source, wheels, target, elsewhere = (tmp_path / d for d in ("source", "wheels", "site", "elsewhere"))
    source.mkdir()  # a copy of what the wheel is built from: a build writes build/ beside it
    for name in ("pyproject.toml", "setup.py", "README.md", "pipeline", "steps", "conf"):
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(ROOT / name, source / name)
    build = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels)]
    subprocess.run([*build, str(source)], check=True, capture_output=True, timeout=300, cwd=tmp_path)
    (wheel,) = wheels.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    shipped = {n.removeprefix("pipeline/conf/") for n in names if n.startswith("pipeline/conf/")}
    assert shipped == {str(p.relative_to(ROOT / "conf")) for p in (ROOT / "conf").rglob("*.yaml")}
    install = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)]
    subprocess.run(install, check=True, capture_output=True, timeout=300)

    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target)}  # the installed copy, not this checkout
    settings = ["debug=tiny", "steps=[shard]", f"artifacts.root={elsewhere / 'out'}"]
    settings.append(f"mlflow.tracking_uri=sqlite:///{elsewhere / 'mlflow.db'}")
    where = subprocess.run(
        [sys.executable, "-c", "import pipeline; print(pipeline.__file__)"], env=env, cwd=elsewhere, text=True,
        capture_output=True, check=True,
    )  # fmt: skip
    assert where.stdout.startswith(str(target))
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", *settings], env=env, cwd=elsewhere, text=True, capture_output=True,
        timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert list((elsewhere / "out" / "shard").glob("*/_SUCCESS"))
