"""The training loop without Ray: the newest loadable checkpoint directory wins, the data order and random streams a
checkpoint records continue exactly (steps/training/resume.py), and the worker procedure (steps/training/worker.py),
driven through a fake :class:`WorkerContext`, checkpoints on schedule, learns, resumes bitwise and stops on a loss
that is not finite."""

from __future__ import annotations

import contextlib
import json
import random
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from steps.artifacts.checkpoints import NONFINITE_FILE
from steps.core.step import MetricsSink
from steps.nn.classifier import ClassifierConfig, ImageClassifier
from steps.training import resume, worker
from steps.training.resume import STATE_FILE, UNREPRODUCIBLE, BatchStream
from steps.training.resume import resume_state as _resume_state
from steps.training.task import TrainConfig, TrainTask


class Registered:
    """What ``ray.train.get_checkpoint()`` returns: a path and ``as_directory()``."""

    def __init__(self, path) -> None:
        self.path = str(path)

    @contextlib.contextmanager
    def as_directory(self):
        yield self.path


def write_state(run_dir, name: str, step: int) -> None:
    (run_dir / name).mkdir(parents=True)
    torch.save({"step": step, "model": {}}, run_dir / name / STATE_FILE)


def test_a_checkpoint_ray_never_registered_is_used(tmp_path):
    """The worker reported step 6, then was killed before Ray Train's controller registered the report."""
    write_state(tmp_path, "checkpoint_2026-01-01_00-00-01.000000", 3)
    write_state(tmp_path, "checkpoint_2026-01-01_00-00-02.000000", 6)
    registered = Registered(tmp_path / "checkpoint_2026-01-01_00-00-01.000000")
    assert _resume_state(registered, str(tmp_path))["step"] == 6
    assert _resume_state(None, str(tmp_path))["step"] == 6


def test_a_cut_short_checkpoint_is_skipped_and_the_registered_one_used(tmp_path):
    write_state(tmp_path, "checkpoint_2026-01-01_00-00-01.000000", 3)
    (tmp_path / "checkpoint_2026-01-01_00-00-02.000000").mkdir()
    (tmp_path / "checkpoint_2026-01-01_00-00-02.000000" / STATE_FILE).write_bytes(b"PK\x03\x04 cut short")
    registered = Registered(tmp_path / "checkpoint_2026-01-01_00-00-01.000000")
    assert _resume_state(registered, str(tmp_path))["step"] == 3


def test_nothing_to_resume(tmp_path):
    assert _resume_state(None, str(tmp_path / "never-written")) is None
    assert _resume_state(None, str(tmp_path)) is None


class Shard:
    """What ``ray.train.get_dataset_shard`` hands a worker: ``iter_batches`` over rows in a fixed order; ``rows``
    is a row count (an ``id`` column) or a list of numpy batches."""

    def __init__(self, rows: int | list[dict[str, np.ndarray]]) -> None:
        batches = [{"id": np.arange(rows)}] if isinstance(rows, int) else rows
        self.columns = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}

    def iter_batches(self, batch_size: int, batch_format: str, drop_last: bool = False):
        assert batch_format == "numpy" and not drop_last
        for start in range(0, len(next(iter(self.columns.values()))), batch_size):
            yield {k: v[start : start + batch_size] for k, v in self.columns.items()}


def take(stream, n: int) -> list[list[int]]:
    return [next(stream)["id"].tolist() for _ in range(n)]


def test_batch_stream_resumes_at_its_position():
    """A stream rebuilt at a saved (epoch, offset) yields what the uninterrupted stream yields from there on."""
    shard = Shard(100)  # 6 batches of 16 an epoch (4 rows dropped), in windows of SHUFFLE_WINDOW batches
    whole = BatchStream(shard, 16, seed=3, rank=1)
    first = take(whole, 9)
    position = whole.position
    assert position == (1, 3)
    rest = take(whole, 10)
    assert take(BatchStream(shard, 16, 3, 1, *position), 10) == rest
    epoch0 = [i for b in first[:6] for i in b]
    assert len(set(epoch0)) == 96 and epoch0 != sorted(epoch0), "an epoch: distinct rows, shuffled"
    assert first[6:9] != first[0:3], "each epoch has an order of its own"
    assert take(BatchStream(shard, 16, 4, 1), 6) != first[:6] and take(BatchStream(shard, 16, 3, 0), 6) != first[:6]
    with pytest.raises(ValueError, match="fewer rows than one batch"):
        next(BatchStream(Shard(10), 16, 0, 0))


def test_rank_state_restores_every_random_stream(tmp_path):
    resume.seed_rank(7, 1, keep_torch=False)
    path = tmp_path / "state.pt"
    torch.save(resume.rank_state(torch.device("cpu"), (2, 5)), path)
    drawn = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    state = torch.load(path, weights_only=True)  # the checkpoint holds tensors and plain values only
    assert resume.restore_rank_state(state, torch.device("cpu")) == (2, 5)
    again = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    assert torch.equal(drawn[0], again[0]) and np.array_equal(drawn[1], again[1]) and drawn[2] == again[2]


# ------------------------------------------------------------------------------------------------ the worker procedure
class Sign(TrainTask):
    """Tell 4x4 images brighter than zero from darker ones: a tiny classifier with dropout and batch norm (a random
    stream and buffers a resume must continue) and a buffer outside the state_dict (rows seen, logged as a
    statistic). ``nan_at``: the loss of that update is NaN."""

    name = "sign"
    progress_val = ("nll", "val nll")

    def __init__(self, nan_at: int = 0) -> None:
        self.nan_at, self.begun, self.ended = nan_at, [], []

    def build_model(self) -> nn.Module:
        config = ClassifierConfig(image_size=4, in_channels=1, num_classes=2, channels=4, stages=1, dropout=0.2)
        model = ImageClassifier(config)
        model.register_buffer("rows_seen", torch.zeros(()), persistent=False)
        return model

    def prepare_batch(self, batch, device):
        return torch.from_numpy(batch["image"]).to(device), torch.from_numpy(batch["label"]).to(device)

    def loss(self, model, batch):
        images, labels = batch
        model.rows_seen += len(images)
        loss = F.cross_entropy(model(images), labels)
        if len(self.begun) == self.nan_at:
            loss = loss * float("nan")
        return loss, {"rows_seen": model.rows_seen.clone()}

    def evaluate(self, model, batches):
        return {"nll": float(np.mean([F.cross_entropy(model(x), y).item() for x, y in batches]))}

    def finalize(self, model, batches, out_dir):
        with open(f"{out_dir}/final.json", "w") as f:
            json.dump({"val_batches": len(batches)}, f)

    def begin_step(self, step, rank, run_dir):
        self.begun.append(step)

    def end_step(self, step, rank, run_dir):
        self.ended.append(step)


def sign_batches(rows: int, seed: int) -> list[dict[str, np.ndarray]]:
    """Numpy batches of 16 rows, as Ray Data hands them out."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, rows)
    images = (rng.normal(0, 0.5, (rows, 1, 4, 4)) + (labels - 0.5)[:, None, None, None]).astype(np.float32)
    return [{"image": images[i : i + 16], "label": labels[i : i + 16]} for i in range(0, rows, 16)]


# 64 rows in batches of 8: 10 steps cross an epoch. Checkpoints at 4, 8 and 10, log lines at 3, 6, 9 and 10.
TC = TrainConfig(steps=10, batch_size=8, lr=0.03, warmup_steps=2, checkpoint_every=4, log_every=3, val_batches=1,
                 ema_decay=0.5)  # fmt: skip


class ListSink(MetricsSink):
    def __init__(self, rows: list[tuple[int, dict]] | None = None) -> None:
        self.rows = list(rows or [])

    def log_metrics(self, metrics, step):
        self.rows.append((step, dict(metrics)))

    def last_step(self, key):
        return max((s for s, m in self.rows if key in m), default=0)

    def history(self) -> dict[tuple[str, int], float]:
        return {(k, s): v for s, m in self.rows for k, v in m.items() if not k.endswith(UNREPRODUCIBLE)}


class FakeWorker:
    """:class:`worker.WorkerContext` without Ray: rank 0 of 1 on the CPU, in-memory shards, each report kept with a
    copy of its checkpoint (Ray Train copies it to storage before ``report`` returns)."""

    rank, world, device = 0, 1, torch.device("cpu")

    def __init__(self, kept, resume_from=None) -> None:
        self.kept, self.resume_from = kept, resume_from
        self.shards = {"train": Shard(sign_batches(64, 0)), "val": Shard(sign_batches(16, 1))}
        self.reports: list[tuple[dict, object]] = []

    def prepare_model(self, model):
        return model.to(self.device)

    def latest_checkpoint(self):
        return Registered(self.resume_from) if self.resume_from is not None else None

    def dataset_shard(self, name):
        return self.shards[name]

    def report(self, metrics, directory):
        copy = None
        if directory is not None:
            copy = self.kept / f"{len(self.reports)}-step{metrics['step']}"
            shutil.copytree(directory, copy)
        self.reports.append((dict(metrics), copy))

    def checkpoints(self) -> dict[int, object]:
        return {m["step"]: d for m, d in self.reports}


@pytest.fixture
def global_state():
    """The worker sets torch's thread count and seeds the global random streams: as they were, after the test."""
    threads, rng = torch.get_num_threads(), (torch.get_rng_state(), np.random.get_state(), random.getstate())
    yield
    torch.set_num_threads(threads)
    torch.set_rng_state(rng[0])
    np.random.set_state(rng[1])
    random.setstate(rng[2])


def run_worker(tmp_path, name: str, task=None, resume_from=None, sink=None):
    (tmp_path / name / "run").mkdir(parents=True)
    fake, sink = FakeWorker(tmp_path / name, resume_from), sink or ListSink()
    worker.train(task or Sign(), TC, fake, str(tmp_path / name / "run"), sink)
    return fake, sink


def tensors(tree, prefix="") -> dict[str, torch.Tensor]:
    """Every tensor in a nested checkpoint payload, by path."""
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list | tuple) else []
    out = {prefix: tree} if isinstance(tree, torch.Tensor) else {}
    for k, v in items:
        out.update(tensors(v, f"{prefix}/{k}"))
    return out


def test_worker_checkpoints_on_schedule_and_learns(tmp_path, global_state):
    task = Sign()
    fake, sink = run_worker(tmp_path, "whole", task)
    assert [m["step"] for m, _ in fake.reports] == [4, 8, 10]
    assert all(d is not None for _, d in fake.reports)
    logged = sink.history()
    assert sorted(s for k, s in logged if k == "train/loss") == [3, 6, 9, 10]
    assert sorted(s for k, s in logged if k == "val/nll") == [4, 8, 10]
    assert logged["train/rows_seen", 6] == 8 * (4 + 5 + 6) / 3, "the window's mean of the logged values"
    metrics, final = fake.reports[-1]
    assert fake.reports[1][0]["train/loss"] == logged["train/loss", 6], "a report carries the last log line"
    assert logged["train/loss", 3] > logged["train/loss", 6] > logged["train/loss", 9], "it learns"
    assert logged["val/nll", 4] > logged["val/nll", 8] > logged["val/nll", 10] == metrics["val/nll"]
    assert json.loads((final / "final.json").read_text()) == {"val_batches": 1}
    assert not (fake.checkpoints()[8] / "final.json").exists()
    payload = torch.load(final / STATE_FILE, weights_only=True)
    assert payload["step"] == 10 and payload["metrics"]["val/nll"] == metrics["val/nll"]
    assert not torch.equal(payload["model"]["out.weight"], payload["live"]["out.weight"]), "the average is the model"
    assert task.begun == list(range(10)) and task.ended == list(range(1, 11))


def test_worker_resumes_from_a_reported_checkpoint_bitwise(tmp_path, global_state):
    """The attempt that wrote the step-4 checkpoint crashed after logging step 6: the resumed attempt reports and
    logs from there on exactly what the uninterrupted run does, and does not log step 6 again."""
    whole, whole_sink = run_worker(tmp_path, "whole")
    before = [(s, m) for s, m in whole_sink.rows if s <= 6]
    resumed, sink = run_worker(tmp_path, "resumed", resume_from=whole.checkpoints()[4], sink=ListSink(before))
    assert [m["step"] for m, _ in resumed.reports] == [8, 10]
    for (a, _), (b, _) in zip(whole.reports[1:], resumed.reports, strict=True):
        kept = [{k: v for k, v in m.items() if k not in UNREPRODUCIBLE} for m in (a, b)]
        assert kept[0] == kept[1], "the metric window (step 6's line in the report at 8) travels in the checkpoint"
    added = sink.rows[len(before) :]
    assert added[0] == (4, {"train/resumed_from": 4})
    assert all(s > 6 for s, _ in added[1:]), "what the crashed attempt logged is not logged again"
    assert ListSink(added[1:]).history() == {k: v for k, v in whole_sink.history().items() if k[1] > 6}
    a, b = (tensors(torch.load(r.checkpoints()[10] / STATE_FILE, weights_only=True)) for r in (whole, resumed))
    assert a.keys() == b.keys() and {"/model/out.weight", "/average/out.weight", "/buffers/rows_seen"} <= a.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


def test_worker_stops_every_rank_on_a_loss_that_is_not_finite(tmp_path, global_state):
    fake, sink = run_worker(tmp_path, "nan", Sign(nan_at=6))
    assert [m["step"] for m, _ in fake.reports] == [4], "no update, log line or checkpoint after the NaN"
    assert sorted({s for s, _ in sink.rows}) == [3, 4]
    record = json.loads((tmp_path / "nan" / "run" / NONFINITE_FILE).read_text())
    assert record["step"] == 6 and record["ranks"] == [0] and np.isnan(record["loss_rank0"])


class HeldSink(ListSink):
    """A sink that keeps what is logged until it is flushed (as the MLflow sink's queue does while its thread
    sends), and records when it delivered: what a SIGKILLed worker would lose is what was held at that moment."""

    def __init__(self, events: list) -> None:
        super().__init__()
        self.events, self.held = events, []

    def log_metrics(self, metrics, step):
        self.held.append((step, dict(metrics)))

    def flush(self, timeout_s=None):
        self.rows += self.held
        self.events += [("delivered", step) for step, _ in self.held]
        self.held = []
        return True


def test_metrics_logged_before_a_checkpoint_are_delivered_before_it_is_reported(tmp_path, global_state):
    """So a worker killed at any moment loses no metric a resume would not log again: those up to the checkpoint it
    resumes from are in the store already."""
    events: list = []

    class Reporting(FakeWorker):
        def report(self, metrics, directory):
            events.append(("report", metrics["step"]))
            super().report(metrics, directory)

    (tmp_path / "held" / "run").mkdir(parents=True)
    sink = HeldSink(events)
    worker.train(Sign(), TC, Reporting(tmp_path / "held"), str(tmp_path / "held" / "run"), sink)
    reports = [i for i, (what, _) in enumerate(events) if what == "report"]
    assert [events[i][1] for i in reports] == [4, 8, 10]
    for i in reports:
        step = events[i][1]
        delivered = {s for what, s in events[:i] if what == "delivered"}
        logged = {s for s, _ in sink.rows + sink.held if s <= step}
        assert logged <= delivered, f"the checkpoint at step {step} was reported with metrics still held"
    assert not sink.held or max(s for s, _ in sink.held) > 10
