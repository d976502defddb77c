"""Exact resume for :mod:`steps.training.loop`: what a training checkpoint holds so that a run killed at step k (a
worker
SIGKILLed and restarted by Ray Train, or a killed driver rerun on the same work directory) ends with the same weights
and logs the same metrics as a run that was never interrupted (bitwise on CPU).

That takes, besides model, optimiser, scheduler and weight average:

* **Data order** (:class:`BatchStream`): each epoch's order over a rank's shard is a pure function of
  (seed, epoch, rank, the shard's row order). The shard's row order is fixed by running the datasets with Ray Data's
  ``preserve_order`` (then ``streaming_split`` also hands every rank the same rows in every run); the shuffle is
  ours, seeded per window of rows, not Ray Data's local shuffle buffer (whose output depends on block boundaries).
  The checkpoint records each rank's (epoch, offset); a resumed rank skips the batches it had already consumed.
* **Random streams, per rank**: torch (and CUDA), numpy's global generator and Python's ``random``, gathered from
  every rank at each checkpoint (:func:`rank_state`).
* **Buffers outside the state_dict** (a quantiser's usage counts, which the logged usage statistics read) and the
  **metric window** (sums and counts since the last log line), so a resume between two log steps logs the same values.

What cannot match: ``train/items_per_s`` (wall-clock time) and the ``train/resumed_from`` point a resumed run adds.
"""

from __future__ import annotations

import io
import logging
import os
import random
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import pyarrow.fs as pafs
import torch
from torch import nn

from steps.artifacts.checkpoints import TRAIN_STATE_FILE
from steps.io.storage import filesystem, join, read_bytes
from steps.nn.averaging import WeightAverage
from steps.nn.checkpoint import checkpoint_dict, unwrap

log = logging.getLogger(__name__)
STATE_FILE = TRAIN_STATE_FILE  # a training checkpoint's file (steps.artifacts.checkpoints names it)
SHUFFLE_WINDOW = 8  # batches whose rows are shuffled together (the local shuffle buffer of Ray Data before)
# Metrics that differ between runs by nature (cpu_threads: when runs beside it finished, steps/training/threads.py)
UNREPRODUCIBLE = ("train/items_per_s", "train/resumed_from", "train/cpu_threads")


# ------------------------------------------------------------------------------------------------ data order
class BatchStream:
    """A rank's training batches, epoch after epoch over its data shard, from position (``epoch``, ``offset``).

    An epoch reads the shard in order in windows of ``SHUFFLE_WINDOW`` batches, shuffles each window's rows with a
    generator seeded by (seed, epoch, rank, window) and cuts it into batches; rows that do not fill a last batch are
    dropped. So batch ``i`` of epoch ``e`` is the same in every run, and a resumed stream skips to it without replaying
    any random draws. :attr:`position` is where the next batch comes from.
    """

    def __init__(self, shard, batch_size: int, seed: int, rank: int, epoch: int = 0, offset: int = 0) -> None:
        self.shard, self.batch_size, self.seed, self.rank = shard, batch_size, seed, rank
        self.position = (epoch, offset)
        self._it = self._stream()

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._it)

    def _stream(self) -> Iterator[dict[str, np.ndarray]]:
        while True:
            epoch, offset = self.position
            yielded = offset
            for index, batch in self._epoch(epoch, offset):
                self.position = (epoch, index + 1)
                yielded += 1
                yield batch
            if yielded == 0:
                raise ValueError(f"a worker's data shard holds fewer rows than one batch ({self.batch_size})")
            self.position = (epoch + 1, 0)

    def _epoch(self, epoch: int, offset: int) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        bs, window = self.batch_size, SHUFFLE_WINDOW
        windows = self.shard.iter_batches(batch_size=window * bs, batch_format="numpy", drop_last=False)
        for w, rows in enumerate(windows):
            if (w + 1) * window <= offset:
                continue  # consumed before the checkpoint
            n = len(next(iter(rows.values())))
            order = np.random.default_rng([self.seed % 2**63, epoch, self.rank, w]).permutation(n)
            for b in range(max(offset - w * window, 0), n // bs):
                picked = order[b * bs : (b + 1) * bs]
                yield w * window + b, {k: v[picked] for k, v in rows.items()}


def preserve_order(dataset):
    """``dataset`` (a Ray Dataset of our own making), set to run in a fixed row order, which :class:`BatchStream`'s
    order builds on. Read datasets carry their own copy of the Data context, so this changes no other dataset."""
    dataset.context.execution_options.preserve_order = True
    return dataset


# ------------------------------------------------------------------------------------------------ per-rank state
def seed_rank(seed: int, rank: int, keep_torch: bool) -> None:
    """The random streams a rank starts with: numpy's and Python's from (seed, rank); torch's too unless
    ``keep_torch`` (rank 0 goes on from the stream that drew the initial weights)."""
    mixed = seed * 1_000_003 + rank * 7919
    if not keep_torch:
        torch.manual_seed(mixed)
    np.random.seed(mixed % 2**32)
    random.seed(mixed)


def rank_state(device: torch.device, position: tuple[int, int]) -> dict[str, Any]:
    """This rank's random streams and data position; only tensors and plain values (``weights_only`` loads it)."""
    np_state = np.random.get_state(legacy=False)
    version, internal, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "numpy": {
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "python": {"version": version, "internal": list(internal), "gauss": gauss},
        "data": list(position),
    }


def restore_rank_state(state: Mapping[str, Any], device: torch.device) -> tuple[int, int]:
    """Restore :func:`rank_state`'s streams; returns the data position."""
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    npy = state["numpy"]
    np.random.set_state(("MT19937", npy["key"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["gauss"]))
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss"]))
    epoch, offset = state["data"]
    return int(epoch), int(offset)


def gather_rank_states(local: dict[str, Any], world: int) -> list[dict[str, Any]]:
    """Every rank's :func:`rank_state`, in rank order (a collective: every rank calls it)."""
    if world == 1:
        return [local]
    import torch.distributed as dist

    states: list[Any] = [None] * world
    dist.all_gather_object(states, local)
    return states


def transient_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """Buffers the state_dict leaves out (``persistent=False``, e.g. a quantiser's usage counts)."""
    kept = set(model.state_dict())
    return {k: b.detach().cpu().clone() for k, b in model.named_buffers() if k not in kept}


def restore_buffers(model: nn.Module, buffers: Mapping[str, torch.Tensor]) -> None:
    own = dict(model.named_buffers())
    with torch.no_grad():
        for k, v in buffers.items():
            if k in own:
                own[k].copy_(v)


# ------------------------------------------------------------------------------------------------ checkpoint files
def save_state(path: str, model: nn.Module, opt, sched, average: WeightAverage | None, **extra: Any) -> None:
    """The training state; ``model`` holds the weights to use (the average, with ``ema_decay``), ``live`` the
    optimiser's own weights when they differ. ``extra``: step, metrics, per-rank states, the metric window."""
    live = unwrap(model)
    averaged = {"live": live.state_dict(), "average": average.state_dict()} if average is not None else {}
    used = average.model(live) if average is not None else live
    payload = checkpoint_dict(
        used, optimizer=opt.state_dict(), scheduler=sched.state_dict(), buffers=transient_buffers(live), **averaged,
        **extra,
    )  # fmt: skip
    torch.save(payload, path)


def _load_state(uri: str) -> dict[str, Any] | None:
    try:
        return torch.load(io.BytesIO(read_bytes(uri)), map_location="cpu", weights_only=True)
    except Exception as exc:  # a checkpoint cut short by the crash: fall back to an older one
        log.warning("cannot resume from %s (%s: %s)", uri, type(exc).__name__, exc)
        return None


def resume_state(checkpoint, run_dir: str) -> dict[str, Any] | None:
    """The newest training state to resume from, or None to start at step 0.

    Normally Ray Train's latest checkpoint. But Ray Train registers a reported checkpoint only when its controller
    next polls the workers: a worker killed (SIGKILL, preemption) right after reporting leaves a complete checkpoint
    directory on storage that Ray does not know of. Checkpoint directories are named by time, so any newer than the
    registered one (or any at all, without one) are tried first, newest first; one that does not load is skipped.
    Every rank sees the same files and so picks the same state.
    """
    registered = checkpoint.path.rstrip("/").rsplit("/", 1)[-1] if checkpoint is not None else ""
    fs, path = filesystem(run_dir)
    try:
        found = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except OSError:
        found = []
    names = sorted(
        (f.base_name for f in found if f.type == pafs.FileType.Directory and f.base_name.startswith("checkpoint_")),
        reverse=True,
    )
    for name in names:
        if name <= registered:
            break
        state = _load_state(join(run_dir, name, STATE_FILE))
        if state is not None:
            log.info("resuming from %s, written but not yet registered by Ray Train", name)
            return state
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as d:
        return torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=True)
