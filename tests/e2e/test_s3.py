"""The pipeline on an S3 API (`artifacts.root=s3://...`): moto's server on 127.0.0.1 (tests/s3_server.py), reached
through the same environment variables a user sets for AWS, MinIO or Ceph. The tiny pipeline end to end, then
cached, then a sample-only rerun, then ``python -m pipeline.verify`` on the bucket; nothing lands on local disk
under the root's name."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from s3_server import s3_api

from pipeline.graph import NAMES
from steps.artifacts.samples import Samples

pytestmark = pytest.mark.e2e
STEPS = [n for n in NAMES if n != "tune_decoder"]  # debug=tiny runs every step but the optional one
BUCKET, PREFIX = "vqvae2-e2e", "root"
ROOT = f"s3://{BUCKET}/{PREFIX}"


@pytest.fixture(scope="module")
def s3():
    """The S3 API, and its variables set here too (the test reads the bucket through pyarrow)."""
    with s3_api(BUCKET) as api, pytest.MonkeyPatch.context() as env:
        for key, value in api.env.items():
            env.setenv(key, value)
        yield api


def run(workdir: Path, *args: str) -> str:
    """``python *args`` in ``workdir``, with the S3 API's variables (set by the ``s3`` fixture) inherited."""
    proc = subprocess.run([sys.executable, *args], cwd=workdir, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{args[:2]} failed:\n{proc.stdout[-5000:]}\n{proc.stderr[-5000:]}"
    # Hydra's logs stay on local disk (outputs/_hydra/); nothing local is named after the root (an "s3:" folder).
    assert not list(workdir.rglob("s3:")) and not list(workdir.rglob(BUCKET)), sorted(workdir.iterdir())
    return proc.stdout + proc.stderr


def pipeline(workdir: Path, *overrides: str) -> str:
    settings = ["debug=tiny", f"artifacts.root={ROOT}", f"mlflow.tracking_uri=sqlite:///{workdir / 'mlflow.db'}"]
    return run(workdir, "-m", "pipeline", *settings, *overrides)


def finished(s3, step: str) -> dict[str, dict]:
    """``<fingerprint> -> listing entry of its _SUCCESS`` for each finished output of ``step`` in the bucket."""
    found = s3.keys(f"{PREFIX}/{step}/")
    return {key.split("/")[2]: obj for key, obj in found.items() if key.count("/") == 3 and key.endswith("/_SUCCESS")}


@pytest.fixture(scope="module")
def workdir(s3, tmp_path_factory):
    path = tmp_path_factory.mktemp("s3")
    pipeline(path)
    return path


def test_every_step_publishes_to_the_bucket(s3, workdir):
    client = s3.client()
    for step in STEPS:
        (fp,) = finished(s3, step)
        record = json.loads(client.get_object(Bucket=BUCKET, Key=f"{PREFIX}/{step}/{fp}/_SUCCESS")["Body"].read())
        assert record["step"] == step and record["fingerprint"] == fp
        assert all(uri.startswith(f"{ROOT}/{step}/{fp}") for uri in record["artifacts"].values()), record
    leases = [k for k in s3.keys(PREFIX) if ".lock/" in k and not k.endswith("/")]
    assert not leases, f"every lock is released: {leases}"
    assert (workdir / "outputs" / "_hydra").is_dir(), "Hydra's run logs go to outputs/ for a URI root"


def test_second_invocation_is_fully_cached(s3, workdir):
    before = {step: finished(s3, step) for step in STEPS}
    output = pipeline(workdir)
    assert output.count("cached") >= len(STEPS)
    assert {step: finished(s3, step) for step in STEPS} == before, "no output is written again"


def test_sample_only_rerun_reuses_the_priors(s3, workdir):
    priors = finished(s3, "train_prior")
    pipeline(workdir, "steps=[sample]", "sample.num_samples=12")
    assert finished(s3, "train_prior") == priors
    samples = [Samples.open(f"{ROOT}/sample/{fp}") for fp in finished(s3, "sample")]
    assert sorted(s.num_samples for s in samples) == [8, 12]
    assert sorted(len(s.ids()) for s in samples) == [8, 12]


def test_verify_checks_the_bucket(s3, workdir):
    output = run(workdir, "-m", "pipeline.verify", ROOT)
    assert f"{len(STEPS) + 1} finished outputs checked, 0 in progress" in output, output
    assert output.rstrip().endswith("ok"), output
