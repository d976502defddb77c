"""Secrets never leave the driver: whatever looks like a credential (a secret-named key's value, a URI's password, a
token of a well-known shape, the value of a secret-named environment variable) is hidden in MLflow params, tags, run
names, the logged config and the console, including errors and tracebacks."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.secrets import RedactingFilter, environment_secrets, install_console_filter, redact, redact_value
from pipeline.tracking import run_name, run_params

REPO = Path(__file__).resolve().parents[2]
TOKENS = {
    "aws key id": "AKIAIOSFODNN7EXAMPLE",
    "github": "ghp_" + "a1B2" * 9,
    "hugging face": "hf_" + "xYz9" * 8,
    "slack": "xoxb-1234567890-abcdefghij",
    "openai": "sk-" + "Q" * 24,
    "jwt": "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJib2IifQ.c2lnbmF0dXJlMTIz",
}


@pytest.mark.parametrize("name", sorted(TOKENS))
def test_tokens_of_known_shapes_are_hidden_wherever_they_stand(name):
    token = TOKENS[name]
    for text in (token, f"data.path=/data/{token}/x", f"note: run with {token} please", f'"{token}"'):
        assert token not in redact(text) and "***" in redact(text), text


@pytest.mark.parametrize(
    "text",
    [
        "https://bucket.s3.amazonaws.com/x.parquet?X-Amz-Credential=AKIA/2026&X-Amz-Signature=deadbeefcafe",
        "https://account.blob.core.windows.net/c/x?sv=2022&sig=c2VjcmV0LXNpZw%3D%3D",
        "Authorization: Bearer abc.def.ghijklmnop",
        "curl -H 'Authorization: Basic Ym9iOmh1bnRlcjI='",
        "mlflow.tracking_uri=http://bob:deadbeefcafe@mlflow.internal:5000",
        "ray:\n  auth_token: deadbeefcafe\n",
    ],
)
def test_secret_parameters_and_authorisations_are_hidden(text):
    secrets = ("deadbeefcafe", "c2VjcmV0LXNpZw", "abc.def.ghijklmnop", "Ym9iOmh1bnRlcjI=")
    assert not any(s in redact(text) for s in secrets), redact(text)


def test_values_of_secret_environment_variables_are_hidden_anywhere(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "correct-horse-battery")
    monkeypatch.setenv("SERVICE_API_TOKEN", "tok3n-value")
    monkeypatch.setenv("DATA_ROOT", "/mnt/data")  # not a secret's name: left alone
    assert set(environment_secrets()) >= {"correct-horse-battery", "tok3n-value"}
    text = "error: cannot reach http://mlflow:5000 as bob/correct-horse-battery; data at /mnt/data; tok3n-value"
    assert redact(text) == "error: cannot reach http://mlflow:5000 as bob/***; data at /mnt/data; ***"


def test_everything_else_is_kept():
    text = (
        "data:\n  path: s3://bucket/images\n  image_size: 32\nmlflow:\n  tracking_uri: sqlite:////tmp/mlflow.db\n"
        "git_sha: 0123456789abcdef0123456789abcdef01234567\nfingerprint: 74e8774dc23f3eae\n"
        "url: https://example.com/design?page=2&size=10\n"
    )
    assert redact(text) == text
    assert redact_value("train_vqvae.train.lr", 0.001) == "0.001" and redact_value("api_token", "x") == "***"


def test_params_and_run_names_are_redacted():
    token = TOKENS["github"]
    overrides = [f"data.path=/data/{token}", "model.channels=64", "+db_password=hunter2"]
    params = run_params(overrides, {"experiment": "digits32"})
    assert params == {"experiment": "digits32", "data.path": "/data/***", "model.channels": "64", "db_password": "***"}
    assert token not in run_name(overrides, {"experiment": "digits32"})


def test_the_console_filter_redacts_messages_arguments_and_tracebacks(monkeypatch):
    monkeypatch.setenv("SOME_SECRET", "s3cr3t-value")
    out = io.StringIO()
    logger = logging.getLogger("test_secrets.console")
    handler = logging.StreamHandler(out)
    logger.addHandler(handler)
    logger.propagate = False
    install_console_filter(logger)
    install_console_filter(logger)  # once only
    assert sum(isinstance(f, RedactingFilter) for f in handler.filters) == 1
    try:
        logger.warning("reaching %s with %s", "http://bob:hunter2@host", TOKENS["hugging face"])
        try:
            raise RuntimeError("store at postgresql://bob:hunter2@db said no to s3cr3t-value")
        except RuntimeError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
    written = out.getvalue()
    assert "hunter2" not in written and TOKENS["hugging face"] not in written and "s3cr3t-value" not in written
    assert "http://bob:***@host" in written and "RuntimeError" in written


def test_a_failing_pipeline_prints_no_secret(tmp_path):
    """A bad value is named in the error, but a credential in it (by shape, or an environment secret's value) is not
    printed: the console of `python -m pipeline` is redacted, Hydra's own composition errors (exit 1) and the config
    errors of the pipeline (exit 2, before Ray starts) alike, and so is Hydra's log file."""
    env = {**os.environ, "SERVICE_API_TOKEN": "qwertyuiop123"}
    cases = [
        (f"data.channels={TOKENS['github']}", TOKENS["github"], 1),  # Hydra: not an integer
        ("data.image_size=qwertyuiop123", "qwertyuiop123", 1),
        ("data.path=/nope/qwertyuiop123", "qwertyuiop123", 2),  # ours: data.path must be unset for the digits
    ]
    for bad, secret, status in cases:
        proc = subprocess.run(
            [sys.executable, "-m", "pipeline", bad, f"artifacts.root={tmp_path}/out",
             f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db"],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        output = proc.stdout + proc.stderr
        assert proc.returncode == status and "***" in output, output[-2000:]
        assert secret not in output, output[-2000:]
        assert not any(secret in p.read_text() for p in tmp_path.rglob("*.log")), "Hydra's log file"
