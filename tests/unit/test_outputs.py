"""The artifacts root as a place to write: an unwritable root is named up front; a full disk is recognised."""

from __future__ import annotations

import errno

import pytest

from pipeline import outputs
from pipeline.config import local_dir


def test_a_root_that_cannot_be_created_is_named_with_the_reason(tmp_path):
    (tmp_path / "a-file").write_text("not a folder")
    root = str(tmp_path / "a-file" / "artifacts")
    problem = outputs.write_problem(root)
    assert problem is not None and problem.startswith("NotADirectoryError: Not a directory")
    assert local_dir(root) == "outputs"  # Hydra's logs go elsewhere; the pipeline then stops naming the setting
    assert outputs.write_problem(str(tmp_path / "fine" / "artifacts")) is None
    assert (tmp_path / "fine" / "artifacts").is_dir() and not list((tmp_path / "fine" / "artifacts").iterdir())
    assert outputs.write_problem("s3://bucket/artifacts") is None  # object stores are not probed


def test_a_full_disk_is_recognised_as_an_exception_or_as_a_workers_text():
    assert outputs.storage_failure(OSError(errno.ENOSPC, "No space left on device")) == "no space left on the device"
    try:
        try:
            raise OSError(errno.EDQUOT, "Disk quota exceeded", "/data/x")
        except OSError as inner:
            raise RuntimeError("step failed") from inner
    except RuntimeError as outer:
        assert outputs.storage_failure(outer) == "the disk quota is exceeded"
    # What a Ray Train worker's pyarrow copy leaves in the driver's WorkerGroupError: text only.
    text = "OSError: [Errno 28] Error writing bytes to file. Detail: [errno 28] No space left on device"
    assert outputs.storage_failure(RuntimeError(text)) == "no space left on the device"
    assert outputs.storage_failure(RuntimeError("OSError: [Errno 30] Read-only file system: '/x'")) == (
        "the file system is read-only"
    )
    assert outputs.storage_failure(PermissionError(errno.EACCES, "Permission denied")) is None  # a read can raise it
    assert outputs.storage_failure(ValueError("loss is not finite at step 7")) is None


def test_the_error_says_what_was_kept_and_what_to_do():
    err = outputs.write_error("train_vqvae", "/mnt/a/train_vqvae/f.partial", "/mnt/a", "no space left on the device")
    assert isinstance(err, outputs.OutputWriteError)
    text = str(err)
    assert text.startswith("train_vqvae: no space left on the device while writing under /mnt/a/train_vqvae/f.partial")
    assert "artifacts.root=/mnt/a" in text and "Nothing of train_vqvae was published" in text
    with pytest.raises(outputs.OutputWriteError, match="rerun the same command"):
        raise err
