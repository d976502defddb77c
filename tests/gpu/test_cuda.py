"""The CUDA paths, on a machine with a GPU (`python -m pytest -m gpu tests/gpu`; the default run deselects them).

What the CPU suite cannot see: bf16 autocast training with the quantiser kept in fp32, bf16 encoding, the cached
sampler on the GPU eager and replayed from CUDA graphs, and the collectives of the training loop on NCCL (a one-rank
group: every call runs for real).

The CUDA-graph sampler must return exactly the eager sampler's codes (a replay runs the eager kernels on the same
buffers), in float32 too; in float64 both also equal the naive sampler's (a full forward pass per position, other
kernels, rounding far below any draw boundary).
"""

from __future__ import annotations

import os

import pytest
import torch

from steps.nn.draw import SamplingControls
from steps.nn.sampler import CachedSampler

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
        assert q.restart_count() >= 0 and q.usage.sum() > 0
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
    graphs = CachedSampler(model)  # on CUDA: graphs by default
    assert graphs.cuda_graphs
    assert torch.equal(graphs.sample(4, labels.to(CUDA), generator=seeds), cached)


# ------------------------------------------------------------------------------------------------ CUDA graphs
TOP = dict(num_codes=64, shape=(8, 8), channels=32, layers=4, attn_heads=4, attn_every=2, num_classes=3)
BOTTOM = dict(
    num_codes=64,
    shape=(8, 8),
    channels=32,
    layers=4,
    kernel_size=3,
    num_classes=3,
    cond_num_codes=64,
    cond_shape=(4, 4),
    cond_channels=16,
    cond_res_blocks=1,
)


def prior(level: str, dtype: torch.dtype = torch.float64, seed: int = 0, **overrides):
    from steps.nn.pixelcnn import PixelCNNConfig, PixelCNNPrior

    torch.manual_seed(seed)
    model = PixelCNNPrior(PixelCNNConfig(**{**(TOP if level == "top" else BOTTOM), **overrides})).eval()
    torch.nn.init.normal_(model.head[-1].weight)  # far from uniform: every logit difference is visible
    return model.to(dtype).to(CUDA)


def inputs(model, batch: int, seed: int) -> dict:
    cfg, g = model.config, torch.Generator().manual_seed(seed)
    labels = torch.randint(0, cfg.num_classes, (batch,), generator=g) if cfg.num_classes else None
    cond = torch.randint(0, cfg.cond_num_codes, (batch, *cfg.cond_shape), generator=g) if cfg.cond_num_codes else None
    return {k: v.to(CUDA) for k, v in dict(labels=labels, cond=cond).items() if v is not None}


# top: attention (both ways to attend) + classes; bottom: spatial conditioning + classes.
@pytest.mark.parametrize(("level", "attention"), [("top", "sdpa"), ("top", "bmm"), ("bottom", "auto")])
@pytest.mark.parametrize("batch", [1, 5])
def test_cuda_graphs_equal_eager_and_naive_in_float64(level: str, attention: str, batch: int):
    from steps.nn.prior import sample_naive

    model = prior(level)
    graphs = CachedSampler(model, cuda_graphs=True, attention=attention)
    eager = CachedSampler(model, cuda_graphs=False, attention=attention)
    ctx, seeds = inputs(model, batch, seed=1), list(range(batch))
    codes = graphs.sample(batch, **ctx, generator=seeds)
    assert graphs.captures == 1 and graphs.capture_seconds > 0
    assert torch.equal(codes, eager.sample(batch, **ctx, generator=seeds))
    assert torch.equal(codes, sample_naive(model, batch, **ctx, generator=seeds))
    assert graphs.cache_bytes == eager.cache_bytes
    # The same configuration again: a replay (no new capture) on new inputs gives what eager gives for them.
    ctx2, seeds2 = inputs(model, batch, seed=2), [100 + s for s in seeds]
    again = graphs.sample(batch, **ctx2, generator=seeds2)
    assert graphs.captures == 1
    assert torch.equal(again, eager.sample(batch, **ctx2, generator=seeds2))
    assert torch.equal(again, sample_naive(model, batch, **ctx2, generator=seeds2))
    assert not torch.equal(again, codes)
    assert torch.equal(codes, eager.sample(batch, **ctx, generator=seeds)), "a replay must not touch earlier results"


@pytest.mark.parametrize(
    "controls", [dict(top_k=5), dict(top_p=0.8, temperature=0.7), dict(top_k=12, top_p=0.9, temperature=1.5)]
)
def test_cuda_graphs_with_top_k_and_top_p(controls: dict):
    from steps.nn.prior import sample_naive

    model = prior("top")
    graphs = CachedSampler(model, cuda_graphs=True)
    for seed in (1, 2):  # capture, then replay
        ctx, seeds = inputs(model, 3, seed), [10 * seed, 10 * seed + 1, 10 * seed + 2]
        codes = graphs.sample(3, **ctx, generator=seeds, controls=SamplingControls(**controls))
        assert torch.equal(
            codes,
            CachedSampler(model, cuda_graphs=False).sample(
                3, **ctx, generator=seeds, controls=SamplingControls(**controls)
            ),
        )
        assert torch.equal(codes, sample_naive(model, 3, **ctx, generator=seeds, controls=SamplingControls(**controls)))
    assert graphs.captures == 1


def test_cuda_graphs_replay_the_eager_kernels_in_float32():
    """float32, the default-size top prior's layers on a 16x16 map: graph codes equal eager codes bit for bit."""
    model = prior("top", torch.float32, channels=128, layers=10, kernel_size=5, shape=(16, 16), num_codes=512)
    torch.nn.init.normal_(model.head[-1].weight, std=0.05)  # as bench/gpu.py: many near-ties between codes
    for attention in ("sdpa", "bmm"):
        graphs = CachedSampler(model, attention=attention)
        eager = CachedSampler(model, cuda_graphs=False, attention=attention)
        for batch in (1, 16):
            for seed in (1, 2):
                ctx, seeds = inputs(model, batch, seed), [1000 * seed + i for i in range(batch)]
                codes = graphs.sample(batch, **ctx, generator=seeds)
                assert torch.equal(codes, eager.sample(batch, **ctx, generator=seeds)), (attention, batch, seed)
        assert graphs.captures == 2
    # Teacher forcing (always eager) still matches the forward pass on the GPU, with TF32 off (as on the CPU).
    codes = torch.randint(0, 512, (2, 16, 16), device=CUDA)
    ctx = inputs(model, 2, seed=3)
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.no_grad():
            full = model(codes, **ctx)
        assert (eager.logits(codes, **ctx) - full).abs().max().item() < 1e-4
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32


def test_cuda_graph_configurations_are_kept_and_dropped():
    model = prior("bottom")
    graphs = CachedSampler(model, max_graphs=2)
    eager = CachedSampler(model, cuda_graphs=False)
    ctx = inputs(model, 2, seed=1)
    for controls, captures in [
        ({}, 1),
        (dict(temperature=0.5), 2),
        ({}, 2),  # kept
        (dict(top_k=3), 3),  # drops temperature=0.5, the least recently used
        ({}, 3),
        (dict(temperature=0.5), 4),  # captured again
    ]:
        codes = graphs.sample(2, **ctx, generator=[5, 6], controls=SamplingControls(**controls))
        assert graphs.captures == captures
        assert torch.equal(codes, eager.sample(2, **ctx, generator=[5, 6], controls=SamplingControls(**controls)))
    graphs.clear_graphs()
    assert torch.equal(graphs.sample(2, **ctx, generator=[5, 6]), eager.sample(2, **ctx, generator=[5, 6]))
    assert graphs.captures == 5


def test_training_collectives_on_nccl(tmp_path):
    """One-rank NCCL group: the quantiser's all-reduce (sync is on whenever a group exists) and the replica check's
    all-gather run on NCCL with the dtypes the training loop uses."""
    import torch.distributed as dist

    from steps.nn.vqvae import VQVAE2, VQVAE2Config
    from steps.training.worker import check_replicas, nonfinite_ranks

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
        assert nonfinite_ranks(out.loss, 1) == [] and nonfinite_ranks(out.loss * float("nan"), 1) == [0]
        check_replicas(ddp, step=1)  # all_gather of float64 checksums on NCCL
    finally:
        dist.destroy_process_group()
