"""The EMA vector quantiser: lookup, gradients, EMA arithmetic, restarts, k-means init, fp32 under autocast."""

import math

import pytest
import torch

from steps.nn.quantize import EMAQuantizerConfig, VectorQuantizerEMA


def as_map(vectors: torch.Tensor) -> torch.Tensor:
    """(N, D) rows -> (1, D, 1, N) feature map, so row i is spatial position i."""
    return vectors.t()[None, :, None, :].contiguous()


def make(k=4, d=2, **kw) -> VectorQuantizerEMA:
    q = VectorQuantizerEMA(EMAQuantizerConfig(codebook_size=k, dim=d, **kw))
    q.embedding.copy_(torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [5.0, 5.0]])[:k, :d])
    return q


def test_nearest_code_and_lookup():
    q = make().eval()
    x = torch.tensor([[0.1, -0.1], [0.9, 0.2], [0.2, 0.8], [4.0, 6.0], [0.6, 0.1]])
    out = q(as_map(x))
    assert out.codes.flatten().tolist() == [0, 1, 2, 3, 1]
    assert torch.equal(out.quantized, q.lookup(out.codes))
    assert out.commit_loss.item() == pytest.approx(0.25 * ((x - q.embedding[[0, 1, 2, 3, 1]]) ** 2).mean().item())


def test_eval_mode_leaves_codebook_alone():
    q = make().eval()
    before = q.embedding.clone()
    q(as_map(torch.randn(50, 2)))
    assert torch.equal(q.embedding, before)


def test_straight_through_gradient_is_identity():
    q = make().train()
    x = torch.randn(1, 2, 3, 3, requires_grad=True)
    out = q(x)
    weights = torch.randn_like(out.quantized)
    (out.quantized * weights).sum().backward()
    torch.testing.assert_close(x.grad, weights)


def test_one_ema_update_matches_hand_computation():
    k, d, decay, eps = 4, 2, 0.9, 1e-3
    q = make(k, d, decay=decay, eps=eps, restart_after=0).train()
    x = torch.tensor([[0.2, 0.0], [-0.2, 0.2], [1.2, 0.0], [0.8, 0.4], [1.0, -0.1]])  # codes 0, 0, 1, 1, 1
    q(as_map(x))
    # By hand: counts n = [2, 3, 0, 0]; with per-code bias correction 1 - decay^1 the corrected averages equal the
    # batch statistics. Laplace: n_i' = (n_i + eps) / (N + K eps) * N with N = 5. Unseen codes keep their vectors.
    n_total = 5.0
    smooth = [(n + eps) / (n_total + k * eps) * n_total for n in (2.0, 3.0)]
    expect = torch.tensor(
        [
            [0.0 / smooth[0], 0.2 / smooth[0]],
            [3.0 / smooth[1], 0.3 / smooth[1]],
            [0.0, 1.0],
            [5.0, 5.0],
        ]
    )
    torch.testing.assert_close(q.embedding, expect, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(q.ema_count, torch.tensor([2.0, 3.0, 0.0, 0.0]) * (1 - decay))
    assert q.ema_steps.tolist() == [1, 1, 1, 1]


def test_second_update_is_bias_corrected_average():
    decay, eps = 0.5, 1e-6
    q = make(decay=decay, eps=eps, restart_after=0).train()
    a = torch.tensor([[0.4, 0.0]])  # -> code 0 (nearest of [0,0] and [1,0]? 0.4 is closer to 0)
    b = torch.tensor([[0.2, 0.0], [0.2, 0.0]])  # -> code 0 again
    q(as_map(a))
    q(as_map(b))
    # Raw EMA after two steps: count = d(1-d)*1 + (1-d)*2, sum = d(1-d)*0.4 + (1-d)*0.4; correction 1 - d^2.
    corr = 1 - decay**2
    count_hat = (decay * (1 - decay) * 1 + (1 - decay) * 2) / corr
    sum_hat = (decay * (1 - decay) * 0.4 + (1 - decay) * 0.4) / corr
    smoothed = (count_hat + eps) / (count_hat + 4 * eps) * count_hat
    assert q.embedding[0, 0].item() == pytest.approx(sum_hat / smoothed, rel=1e-5)


def test_dead_code_restart_reseeds_exactly_the_dead_codes():
    torch.manual_seed(0)
    q = make(restart_after=3).train()
    x = torch.tensor([[0.1, 0.0], [0.9, 0.1], [0.0, 0.1], [1.1, -0.1]])  # only codes 0 and 1 are ever chosen
    for _ in range(2):
        q(as_map(x))
    assert int(q.restarts) == 0
    alive_before = q.embedding[:2].clone()
    q(as_map(x))  # third update without codes 2 and 3: both restart
    assert int(q.restarts) == 2
    # The re-seeded codes are encoder outputs from this batch; the live codes followed the EMA untouched.
    for i in (2, 3):
        assert any(torch.equal(q.embedding[i], row) for row in x), f"code {i} not re-seeded from the batch"
        assert q.ema_count[i] == 0 and q.ema_steps[i] == 0 and q.unused_for[i] == 0
    torch.testing.assert_close(q.embedding[:2], alive_before, atol=0.02, rtol=0)
    assert q.ema_steps[:2].tolist() == [3, 3]


def test_restart_disabled_keeps_dead_codes():
    q = make(restart_after=0).train()
    for _ in range(30):
        q(as_map(torch.tensor([[0.1, 0.0], [0.9, 0.1]])))
    assert int(q.restarts) == 0
    assert q.embedding[3].tolist() == [5.0, 5.0]


def test_kmeans_init_finds_clusters():
    torch.manual_seed(0)
    centres = torch.tensor([[-4.0, -4.0], [-4.0, 4.0], [4.0, -4.0], [4.0, 4.0]])
    x = (centres[:, None, :] + 0.1 * torch.randn(4, 50, 2)).reshape(-1, 2)
    q = VectorQuantizerEMA(EMAQuantizerConfig(codebook_size=4, dim=2, kmeans_init=True, kmeans_iters=20)).train()
    assert not bool(q.initialized)
    q(as_map(x))
    assert bool(q.initialized)
    found = sorted(q.embedding.round().tolist())
    assert found == sorted(centres.tolist())


def test_runs_in_fp32_under_autocast():
    q = make().train()
    x = torch.randn(2, 2, 4, 4).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = q(x)
    assert out.quantized.dtype == torch.float32
    assert q.embedding.dtype == torch.float32 and q.ema_sum.dtype == torch.float32


def test_perplexity_and_usage():
    q = make().eval()
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [5.0, 5.0]]).repeat(3, 1)
    out = q(as_map(x))
    assert out.perplexity.item() == pytest.approx(4.0, rel=1e-5)
    assert q.usage_fraction() == 1.0 and q.dead_codes() == 0
    assert q.usage_perplexity() == pytest.approx(4.0)
    q.reset_usage()
    q(as_map(x[:2]))
    assert q.usage_fraction() == 0.5 and q.dead_codes() == 2
    assert q.usage_perplexity() == pytest.approx(math.exp(math.log(2)))


def test_bad_input_and_config():
    q = make()
    with pytest.raises(ValueError, match=r"\(B, 2, H, W\)"):
        q(torch.randn(1, 3, 2, 2))
    with pytest.raises(ValueError, match="code values"):
        q.lookup(torch.tensor([[[4]]]))
    with pytest.raises(ValueError, match="codebook_size"):
        EMAQuantizerConfig(codebook_size=40000)
    with pytest.raises(ValueError, match="decay"):
        EMAQuantizerConfig(decay=1.0)
