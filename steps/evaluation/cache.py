"""Evaluate's reusable work, kept between runs and keyed by content: feature vectors and the classifier it trains.

Most of an evaluation repeats between runs: the real images' features (halves A and B) are the same for every run
on the same shards, the reconstructions' for every run of the same autoencoder, and the second feature space's
classifier for every run on the same labelled images. Only the samples change when a user draws more samples from
the same priors or tries another temperature. :class:`ContentCache` keeps those results under one URI
(``evaluate.feature_cache``; the pipeline's default is ``<artifacts.root>/_cache/evaluate``):

    <uri>/<key[:2]>/<key>.npy      a feature array (float32, as the network computed it)
    <uri>/<key[:2]>/<key>.pt       a trained classifier's state dict

A key is a SHA-256 of everything the result is a function of: the images' bytes and shape, the network's
parameters (so another checkpoint or weights package is another key), and the settings that shape the result. So an
entry can never be stale; the cache holds no index and nothing to invalidate, and deleting the folder (or any file
in it) only costs recomputation. Features are stored as the network's float32 output, so a cached evaluation's
metrics equal a fresh one's bit for bit (on the same device; a GPU's features differ from a CPU's in the last
bits, and either may serve the other).

A cache that cannot be read or written (an unreadable entry, a full disk, a read-only mount) is logged and
bypassed: it never fails the step. Entries are written whole (a temporary file and a rename on local disk; one PUT
on an object store), so two evaluations filling the same key at once both leave a complete entry.
"""

from __future__ import annotations

import copy
import hashlib
import io
import logging
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from steps.io import storage

log = logging.getLogger(__name__)

VERSION = 1  # part of every key: bump it when a cached function's meaning changes


def content_key(*parts: Any) -> str:
    """A hex SHA-256 of ``parts``: arrays and tensors by dtype, shape and bytes; a module by its state dict;
    mappings by sorted items; anything else by ``repr``."""
    h = hashlib.sha256(f"v{VERSION}".encode())

    def feed(p: Any) -> None:
        if isinstance(p, torch.nn.Module):
            p = p.state_dict()
        if isinstance(p, torch.Tensor):
            h.update(f"tensor {p.dtype}".encode())  # bfloat16 has no numpy dtype: hashed as its int16 bit patterns
            p = p.detach().cpu().contiguous()
            p = (p.view(torch.int16) if p.dtype == torch.bfloat16 else p).numpy()
        if isinstance(p, np.ndarray):
            h.update(f"array {p.dtype.str} {p.shape}".encode())
            h.update(np.ascontiguousarray(p).data)
        elif isinstance(p, Mapping):
            h.update(f"map {len(p)}".encode())
            for k in sorted(p, key=str):
                h.update(repr(k).encode())
                feed(p[k])
        else:
            h.update(repr(p).encode())
        h.update(b"\x00")

    for part in parts:
        feed(part)
    return h.hexdigest()


class ContentCache:
    """Results of deterministic functions, stored under ``uri`` by content key; ``uri`` empty or None: off (every
    call computes). ``hits`` and ``misses`` count the lookups."""

    def __init__(self, uri: str | None) -> None:
        self.uri = uri or None  # absolute already: evaluate's run() resolves it where the driver runs
        self.hits = self.misses = 0
        self._broken = False  # a write failed: stop trying for the rest of this evaluation

    def _path(self, key: str, suffix: str) -> str:
        return storage.join(self.uri, key[:2], key + suffix)

    def _get(self, key: str, suffix: str) -> bytes | None:
        if self.uri is None:
            return None
        try:
            return storage.read_bytes(self._path(key, suffix))
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("evaluate cache: cannot read %s (%s); computing it", self._path(key, suffix), exc)
            return None

    def _put(self, key: str, suffix: str, data: bytes) -> None:
        if self.uri is None or self._broken:
            return
        try:
            storage.write_bytes(self._path(key, suffix), data)
        except OSError as exc:
            self._broken = True
            log.warning("evaluate cache: cannot write under %s (%s); going on without it", self.uri, exc)

    def array(self, key: str, compute: Callable[[], np.ndarray]) -> np.ndarray:
        """The array stored under ``key``, else ``compute()`` (stored for next time)."""
        data = self._get(key, ".npy")
        if data is not None:
            try:
                value = np.load(io.BytesIO(data), allow_pickle=False)
                self.hits += 1
                return value
            except (ValueError, OSError, EOFError) as exc:
                log.warning("evaluate cache: %s is not a readable array (%s); computing it", self._path(key, ".npy"),
                            exc)  # fmt: skip
        self.misses += 1
        value = compute()
        buf = io.BytesIO()
        np.save(buf, value, allow_pickle=False)
        self._put(key, ".npy", buf.getvalue())
        return value

    def module(self, key: str, build: Callable[[], torch.nn.Module], train: Callable[[torch.nn.Module], None]):
        """``build()`` with the state dict stored under ``key`` loaded into it, else ``build()`` trained by
        ``train`` (stored for next time)."""
        model = build()
        data = self._get(key, ".pt")
        if data is not None:
            initial = copy.deepcopy(model.state_dict())
            try:
                model.load_state_dict(torch.load(io.BytesIO(data), map_location="cpu", weights_only=True))
                self.hits += 1
                return model
            except Exception as exc:  # a truncated or foreign file: train again rather than fail
                log.warning("evaluate cache: %s is not a loadable state dict (%s); training again",
                            self._path(key, ".pt"), exc)  # fmt: skip
                model.load_state_dict(initial)  # as built: training starts where it would have without a cache
        self.misses += 1
        train(model)
        buf = io.BytesIO()
        torch.save(model.state_dict(), buf)
        self._put(key, ".pt", buf.getvalue())
        return model
