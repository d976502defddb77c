"""A throwaway S3 API on 127.0.0.1 for tests: moto's standalone server (``moto[server]``, a dev dependency).

``with s3_api("bucket") as api:`` starts ``python -m moto.server`` on a free port in its own process group, creates
the bucket, and hands back :class:`S3API`: ``api.env`` holds the variables that point pyarrow (and so the pipeline,
its Ray workers and ``pipeline.verify``) and boto3 at it, the same ones a user sets for MinIO, Ceph or any other S3
API. The server keeps everything in memory and is stopped on exit, so nothing outlives the test.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass
class S3API:
    endpoint: str
    bucket: str
    env: dict[str, str]  # AWS_ENDPOINT_URL, credentials and region: add to a subprocess's environment

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"],
            region_name=self.env["AWS_DEFAULT_REGION"],
        )

    def keys(self, prefix: str = "") -> dict[str, dict]:
        """Every object under ``prefix``: key -> its listing entry (Size, LastModified, ETag)."""
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return {obj["Key"]: obj for page in pages for obj in page.get("Contents", [])}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def s3_api(bucket: str, timeout: float = 60.0) -> Iterator[S3API]:
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ENDPOINT_URL": endpoint,  # pyarrow >= 15 and boto3 read it; AWS_ENDPOINT_URL_S3 would also do
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",  # no instance-metadata look-ups for credentials or region
    }
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={k: v for k, v in os.environ.items() if not k.startswith("AWS_")},
        )
        try:
            _wait_until_up(proc, endpoint, log, timeout)
            api = S3API(endpoint, bucket, env)
            api.client().create_bucket(Bucket=bucket)
            yield api
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _wait_until_up(proc: subprocess.Popen, endpoint: str, log, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2).close()
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                tail = log.read().decode(errors="replace")[-3000:]
                raise RuntimeError(f"moto server did not start on {endpoint}:\n{tail}") from None
            time.sleep(0.2)
