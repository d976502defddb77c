"""The CUDA paths, on a machine with a GPU (`python -m pytest -m gpu tests/gpu`; the default run deselects them).

What the CPU suite cannot see: bf16 autocast training with the quantiser kept in fp32, bf16 encoding, the cached
sampler on the GPU, and the collectives of the training loop on NCCL (a one-rank group: every call runs for real).
"""

from __future__ import annotations

import os

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
CUDA = torch.device("cuda")


def digits_like(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Smooth random images in [-1, 1] (blurred noise): structure a VQ-VAE can learn within a few steps."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, size // 4, size // 4, generator=g)
    return (torch.nn.functional.interpolate(x, size=size, mode="bilinear") * 2 - 1).to(CUDA)


def test_bf16_autocast_training_keeps_the_quantiser_in_fp32():
    from steps.nn.vqvae import VQVAE2, VQVAE2Config

    torch.manual_seed(0)
    model = VQVAE2(VQVAE2Config(image_size=32, in_channels=1, channels=64, quantizer={"codebook_size": 128})).to(CUDA)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = digits_like(64)
    losses = []
    for _ in range(60):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(x)
        assert torch.isfinite(out.loss)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        losses.append(out.recon_loss.item())
    assert losses[-1] < 0.5 * losses[0], losses[::10]
    for q in model.quantizers.values():
        assert q.embedding.dtype == q.ema_sum.dtype == q.ema_count.dtype == torch.float32
        assert int(q.restarts) >= 0 and q.usage.sum() > 0
    # Encoding under bf16 (what the encode step does on a GPU) picks the fp32 codes almost everywhere.
    model.eval()
    with torch.no_grad():
        fp32 = model.encode(x).codes
        with torch.autocast("cuda", dtype=torch.bfloat16):
            bf16 = model.encode(x).codes
    for a, b in zip(fp32, bf16, strict=True):
        assert (a == b).float().mean().item() > 0.9


def test_cached_sampler_on_cuda_equals_naive_and_cpu():
    from steps.nn.pixelcnn import PixelCNNConfig, PixelCNNPrior
    from steps.nn.prior import sample_naive
    from steps.nn.sampler import sample

    torch.manual_seed(0)
    config = PixelCNNConfig(
        num_codes=64, shape=(8, 8), channels=32, layers=4, attn_heads=4, attn_every=2, num_classes=3, dropout=0.0
    )
    model = PixelCNNPrior(config).double().eval()
    torch.nn.init.normal_(model.head[-1].weight)
    labels = torch.tensor([0, 1, 2, 1])
    seeds = [3, 4, 5, 6]
    cpu = sample(model, 4, labels, generator=seeds)
    model = model.to(CUDA)
    cached = sample(model, 4, labels.to(CUDA), generator=seeds)
    naive = sample_naive(model, 4, labels.to(CUDA), generator=seeds)
    assert torch.equal(cached, naive)
    assert torch.equal(cached.cpu(), cpu), "per-sample CPU generators: the same draws on any device"


def test_training_collectives_on_nccl(tmp_path):
    """One-rank NCCL group: the quantiser's all-reduce (sync is on whenever a group exists) and the replica check's
    all-gather run on NCCL with the dtypes the training loop uses."""
    import torch.distributed as dist

    from steps.nn.vqvae import VQVAE2, VQVAE2Config
    from steps.training import _check_replicas, _nonfinite_ranks

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
    try:
        torch.manual_seed(0)
        model = VQVAE2(VQVAE2Config(image_size=32, in_channels=1, channels=32, quantizer={"codebook_size": 64})).to(
            CUDA
        )
        ddp = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = ddp(digits_like(16))
        out.loss.backward()
        assert _nonfinite_ranks(out.loss, 1) == [] and _nonfinite_ranks(out.loss * float("nan"), 1) == [0]
        _check_replicas(ddp, step=1)  # all_gather of float64 checksums on NCCL
    finally:
        dist.destroy_process_group()
