"""Packaging beyond what pyproject.toml can say: the Hydra configs (conf/, at the top of the checkout) travel inside
the wheel as the ``pipeline.conf`` package, so an installed pipeline finds them from any working directory."""

import os

from setuptools import find_packages, setup

CONF = "conf"
conf_packages = ["pipeline.conf"] + [
    "pipeline.conf." + os.path.relpath(d, CONF).replace(os.sep, ".")
    for d, _, files in sorted(os.walk(CONF))
    if d != CONF and any(f.endswith(".yaml") for f in files)
]
setup(
    packages=find_packages(include=["pipeline*", "steps*"]) + conf_packages,
    package_dir={"pipeline.conf": CONF},
    package_data={p: ["*.yaml"] for p in conf_packages},
)
