"""The lock of an object-store root (pipeline/lease.py behind ``ArtifactStore.lock``) against a real S3 API: moto's
server on 127.0.0.1 (tests/s3_server.py). A second holder waits; a killed holder's lease expires and is taken over;
a holder that stalled past its lease does not publish; two pipelines run one step once."""

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from s3_server import s3_api

from pipeline.cache import ArtifactStore
from pipeline.lease import Lease, LeaseLostError
from steps.io import storage

REPO = Path(__file__).resolve().parents[2]
TTL, POLL = 3.0, 0.3  # seconds: short, so that expiry is tested in seconds
FP = "0123456789abcdef"


@pytest.fixture(scope="module")
def s3():
    with s3_api("lease-tests") as api, pytest.MonkeyPatch.context() as env:
        for key, value in api.env.items():
            env.setenv(key, value)
        yield api


@pytest.fixture
def root(s3, request) -> str:
    return f"s3://{s3.bucket}/{request.node.name}"


def holders(s3, uri: str) -> list[str]:
    """The lease objects under a lock prefix (a directory marker pyarrow may leave is not one)."""
    prefix = uri.split("/", 3)[3] + "/"
    return [k for k in s3.keys(prefix) if not k.endswith("/")]


def test_a_second_holder_waits_while_the_first_beats(s3, root):
    uri, said = f"{root}/x.lock", []
    first = Lease(uri, TTL, POLL, said.append)
    first.acquire()
    second = Lease(uri, TTL, POLL, said.append)
    got = threading.Event()
    thread = threading.Thread(target=lambda: (second.acquire(), got.set()))
    thread.start()
    assert not got.wait(2 * TTL), "the first holder's heartbeat keeps its lease past the ttl"
    assert any(first.holder in line and "waiting" in line for line in said), said
    first.check()
    first.release()
    assert got.wait(30), "the second holder takes the lock once the first lets go"
    thread.join()
    assert holders(s3, uri) == [f"{uri.split('/', 3)[3]}/{second.holder}"]
    second.release()
    assert holders(s3, uri) == []


HOLD = "import sys, time; from pipeline.lease import Lease; Lease(sys.argv[1], float(sys.argv[2])).acquire(); "
HOLD += "print('held', flush=True); time.sleep(600)"


def test_a_killed_holders_lease_expires_and_is_taken_over(s3, root):
    uri, said = f"{root}/x.lock", []
    proc = subprocess.Popen([sys.executable, "-c", HOLD, uri, str(TTL)], stdout=subprocess.PIPE, text=True,
                            cwd=REPO)  # fmt: skip
    try:
        assert proc.stdout.readline().strip() == "held"
    finally:
        proc.kill()  # SIGKILL: no release, no clean-up; its lease object stays behind
        proc.wait()
    assert len(holders(s3, uri)) == 1
    start = time.monotonic()
    with Lease(uri, TTL, POLL, said.append) as lease:
        waited = time.monotonic() - start
        assert holders(s3, uri) == [f"{uri.split('/', 3)[3]}/{lease.holder}"]
    assert any("taking over" in line for line in said), said
    assert waited < 10 * TTL


def test_two_pipelines_run_one_step_once(root):
    """What ``pipeline.run._execute_one`` does under the lock: the second finds the first one's _SUCCESS."""
    ran, records = [], {}

    def pipeline(name: str) -> None:
        store = ArtifactStore(root, TTL, POLL)
        with store.lock("encode", FP):
            record = store.record("encode", FP)
            if record is None:
                ran.append(name)
                storage.write_bytes(storage.join(store.work_dir("encode", FP), "part-0.parquet"), b"rows")
                time.sleep(1.0)
                store.publish("encode", FP, {"by": name})
                record = store.record("encode", FP)
        records[name] = record

    threads = [threading.Thread(target=pipeline, args=(name,)) for name in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(ran) == 1, ran
    assert records == {"a": {"by": ran[0]}, "b": {"by": ran[0]}}


def test_a_holder_that_stalled_past_its_lease_does_not_publish(root):
    slow, fast = ArtifactStore(root, TTL, POLL), ArtifactStore(root, TTL, POLL)
    with slow.lock("sample", FP):
        slow._leases[("sample", FP)]._stop.set()  # its heartbeat stops: a frozen VM, a long pause
        with fast.lock("sample", FP):  # waits out the ttl, then takes the lease over
            fast.publish("sample", FP, {"by": "fast"})
        with pytest.raises(LeaseLostError, match="lost its lock"):
            slow.publish("sample", FP, {"by": "slow"})
    assert slow.record("sample", FP) == {"by": "fast"}
