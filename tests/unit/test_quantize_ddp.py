"""Two gloo processes train one VQ-VAE-2 under DDP on different data: their codebooks must stay bit-identical,
also through dead-code restarts and k-means initialisation. With sync switched off the same run diverges, which
shows the test can fail."""

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from steps.nn.vqvae import VQVAE2, VQVAE2Config

STEPS = 6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out_dir: str, sync: bool) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        torch.set_num_threads(1)
        torch.manual_seed(0)  # same initial weights on both ranks, as DDP requires
        cfg = VQVAE2Config(
            channels=16,
            res_channels=8,
            res_blocks=1,
            quantizer={"kind": "ema", "codebook_size": 64, "dim": 8, "restart_after": 2, "kmeans_init": True},
        )
        model = VQVAE2(cfg)
        for q in model.quantizers.values():
            q.sync = sync
        # broadcast_buffers=False: the quantizer's own all-reduce, not DDP, must keep the codebooks equal.
        ddp = DistributedDataParallel(model, broadcast_buffers=False)
        opt = torch.optim.Adam(ddp.parameters(), lr=1e-3)
        data = torch.Generator().manual_seed(100 + rank)  # different data per rank
        for _ in range(STEPS):
            x = torch.rand(4, 3, 32, 32, generator=data) * 2 - 1
            loss = ddp(x).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        state = {k: v for k, v in model.state_dict().items() if k.startswith("quantizers.")}
        state["restarts"] = torch.stack([q.restarts for q in model.quantizers.values()])
        torch.save(state, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _run(tmp_path, sync: bool) -> tuple[dict, dict]:
    mp.spawn(_worker, args=(_free_port(), str(tmp_path), sync), nprocs=2, join=True)
    return tuple(torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))


@pytest.mark.timeout(300)
def test_codebooks_identical_across_ranks_through_restarts(tmp_path):
    a, b = _run(tmp_path, sync=True)
    assert (a["restarts"] > 0).all(), "the run must exercise dead-code restarts on both levels"
    assert torch.equal(a["restarts"], b["restarts"])
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs between ranks"


@pytest.mark.timeout(300)
def test_codebooks_diverge_without_sync(tmp_path):
    a, b = _run(tmp_path, sync=False)
    assert not torch.equal(a["quantizers.bottom.embedding"], b["quantizers.bottom.embedding"])
