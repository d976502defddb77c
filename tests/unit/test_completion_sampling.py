"""Image completion in the prior samplers: ``given`` codes forced on the first ``keep`` raster positions.

Every sampler (the naive reference, the cached PixelCNN / PixelSNAIL sampler, the transformer's KV-cached one) forces
the prefix through the one wrapper of steps/nn/prior.py. For each prior variant the cached completion equals the
naive one, the prefix is ``given``, ``keep=0`` is plain sampling, and (causality) completing a sample with its own
seeds gives it back for every ``keep``. Float64 models, so that no float32 rounding tie makes a draw flip.
"""

from __future__ import annotations

from typing import NamedTuple

import pytest
import torch
from torch import Tensor

import steps.nn.sampler as sampler_module
from steps.nn.draw import DEFAULT, SamplingControls
from steps.nn.pixelcnn import PixelCNNConfig, PixelCNNPrior
from steps.nn.prior import NaiveSampler, Prior, forcing, sample_naive
from steps.nn.sampler import CachedSampler, sample
from steps.nn.transformer import TransformerConfig, TransformerPrior, TransformerSampler

K, N, SHAPE, COND = 11, 3, (4, 3), dict(cond_num_codes=7, cond_shape=(2, 3), cond_channels=8, cond_res_blocks=1)
POSITIONS = SHAPE[0] * SHAPE[1]
SEEDS, OTHER = [11, 12, 13], [21, 22, 23]
PIXELCNN = {
    "plain": {},
    "attention": dict(attn_heads=2, attn_every=1),
    "spatial": COND,
    "class": dict(num_classes=3),
    "guided": dict(num_classes=3, class_dropout=0.1, attn_heads=2, attn_every=2, **COND),
}
TRANSFORMER = {"plain": {}, "guided": dict(num_classes=3, class_dropout=0.2, **COND)}
CASES = [f"pixelcnn-{v}" for v in PIXELCNN] + [f"transformer-{v}" for v in TRANSFORMER]


pytestmark = pytest.mark.usefixtures("one_thread")


class Case(NamedTuple):
    """A prior, its conditioning inputs for N samples, its controls (guided where it can be) and its fast sampler."""

    model: Prior
    ctx: dict
    controls: SamplingControls
    sampler: CachedSampler | TransformerSampler

    def fast(self, seeds, **completion) -> Tensor:
        return self.sampler.sample(N, **self.ctx, generator=seeds, controls=self.controls, **completion)

    def naive(self, seeds, **completion) -> Tensor:
        return sample_naive(self.model, N, **self.ctx, generator=seeds, controls=self.controls, **completion)


def make_case(name: str) -> Case:
    arch, variant = name.split("-")
    torch.manual_seed(0)
    if arch == "pixelcnn":
        model = PixelCNNPrior(PixelCNNConfig(num_codes=K, channels=16, layers=3, shape=SHAPE, **PIXELCNN[variant]))
        torch.nn.init.normal_(model.head[-1].weight)  # far from uniform: every logit difference is visible
        if model.config.num_classes:
            torch.nn.init.normal_(model.blocks[0].class_bias.weight)  # classes that matter
    else:
        config = TransformerConfig(num_codes=K, channels=16, layers=2, heads=2, shape=SHAPE, **TRANSFORMER[variant])
        model = TransformerPrior(config)
        torch.nn.init.normal_(model.head.weight, std=0.3)
        torch.nn.init.normal_(model.start.weight)
    model = model.double().eval()
    cfg, g = model.config, torch.Generator().manual_seed(1)
    labels = torch.randint(0, cfg.num_classes, (N,), generator=g) if cfg.num_classes else None
    cond = torch.randint(0, cfg.cond_num_codes, (N, *cfg.cond_shape), generator=g) if cfg.cond_num_codes else None
    controls = SamplingControls(guidance_scale=2.5) if cfg.guidable else DEFAULT
    fast = CachedSampler(model) if arch == "pixelcnn" else TransformerSampler(model)
    return Case(model, dict(labels=labels, cond=cond), controls, fast)


@pytest.fixture(params=CASES)
def prior(request) -> Case:
    return make_case(request.param)


def random_codes(seed: int = 9) -> Tensor:
    return torch.randint(0, K, (N, *SHAPE), generator=torch.Generator().manual_seed(seed))  # (N, H, W)


def prefix(codes: Tensor, keep: int) -> Tensor:
    return codes.flatten(1)[:, :keep]  # (N, keep) in raster order


@pytest.mark.parametrize("keep", [1, 4, 2 * SHAPE[1], POSITIONS - 1])
def test_cached_completion_equals_the_naive_one(prior: Case, keep: int) -> None:
    given = random_codes()  # not a sample: a prefix the prior would rarely draw
    naive = prior.naive(SEEDS, given=given, keep=keep)
    assert torch.equal(prior.fast(SEEDS, given=given, keep=keep), naive)
    assert torch.equal(prefix(naive, keep), prefix(given, keep))
    # The registry's interface for priors without a fast sampler, and the cached sampler's module function.
    args = dict(**prior.ctx, generator=SEEDS, controls=prior.controls, given=given, keep=keep)
    assert torch.equal(NaiveSampler(prior.model).sample(N, **args), naive)
    if isinstance(prior.sampler, CachedSampler):
        assert torch.equal(sample(prior.model, N, **args), naive)


def test_keep_everything_returns_given_and_keep_nothing_is_plain_sampling(prior: Case) -> None:
    given = random_codes()
    assert torch.equal(prior.fast(SEEDS, given=given, keep=POSITIONS), given)
    assert torch.equal(prior.naive(SEEDS, given=given, keep=POSITIONS), given)
    plain = prior.fast(SEEDS)
    assert torch.equal(prior.fast(SEEDS, given=given, keep=0), plain)  # given with keep=0 has no effect
    assert torch.equal(prior.naive(SEEDS, keep=0), plain)
    # Forcing draws the uniforms of every position: the streams advance as far as without it.
    forced_gens, plain_gens = ([torch.Generator().manual_seed(s) for s in SEEDS] for _ in range(2))
    prior.fast(forced_gens, given=given, keep=5)
    prior.fast(plain_gens)
    for a, b in zip(forced_gens, plain_gens, strict=True):
        assert torch.equal(a.get_state(), b.get_state())
    # keep=0 takes no randomness of its own, from the global generator either.
    torch.manual_seed(3)
    global_plain, after_plain = prior.fast(None), torch.rand(2)
    torch.manual_seed(3)
    global_keep0, after_keep0 = prior.fast(None, given=given, keep=0), torch.rand(2)
    assert torch.equal(global_keep0, global_plain) and torch.equal(after_keep0, after_plain)


def test_completing_a_sample_with_its_own_seeds_reproduces_it(prior: Case) -> None:
    drawn = prior.fast(SEEDS)
    for keep in range(POSITIONS + 1):
        assert torch.equal(prior.fast(SEEDS, given=drawn, keep=keep), drawn), keep
    for keep in (1, SHAPE[1]):
        assert torch.equal(prior.naive(SEEDS, given=drawn, keep=keep), drawn), keep


def test_other_seeds_keep_the_prefix_and_redraw_the_rest(prior: Case) -> None:
    drawn = prior.fast(SEEDS)
    keep = SHAPE[1]  # the first row
    other = prior.fast(OTHER, given=drawn, keep=keep)
    assert torch.equal(prefix(other, keep), prefix(drawn, keep))
    assert not torch.equal(other.flatten(1)[:, keep:], drawn.flatten(1)[:, keep:])
    assert torch.equal(other, prior.naive(OTHER, given=drawn, keep=keep))


def test_forcing_takes_the_prefix_in_every_stream_and_leaves_the_rest_to_the_pick() -> None:
    asked: list[int] = []

    def pick(i: int, logits: Tensor) -> Tensor:
        asked.append(i)
        return torch.full((logits.shape[0],), -1)

    given = random_codes()  # (N, H, W)
    assert forcing(pick, given, 0, streams=2, device=torch.device("cpu")) is pick  # plain sampling untouched
    forced = forcing(pick, given, 4, streams=2, device=torch.device("cpu"))
    logits = torch.zeros(2 * N, K)  # a guided batch: the conditional stream, then the unconditional one
    for i in range(POSITIONS):
        codes = forced(i, logits)
        r, c = divmod(i, SHAPE[1])
        assert codes.tolist() == (given[:, r, c].tolist() * 2 if i < 4 else [-1] * 2 * N)
    assert asked == list(range(4, POSITIONS))


def test_a_completion_runs_eagerly_on_the_graph_path(monkeypatch) -> None:
    def no_capture(*args) -> None:
        raise AssertionError("a completion must not capture CUDA graphs")

    monkeypatch.setattr(sampler_module, "GraphSequence", no_capture)
    case = make_case("pixelcnn-guided")
    case.sampler.cuda_graphs = True  # the constructor only allows it on a CUDA device
    given = random_codes()
    assert torch.equal(case.fast(SEEDS, given=given, keep=5), case.naive(SEEDS, given=given, keep=5))
    assert case.sampler.captures == 0 and case.sampler.cuda_graphs


BAD = [
    (dict(keep=-1), r"keep must be an int in \[0, 12\]"),
    (dict(keep=POSITIONS + 1), r"keep must be an int in \[0, 12\].*got 13"),
    (dict(keep=True, given=random_codes()), r"keep must be an int.*got True"),
    (dict(keep=2.0, given=random_codes()), r"keep must be an int.*got 2.0"),
    (dict(keep=3), "given is required when keep > 0"),
    (dict(keep=3, given=random_codes()[:2]), r"given must have shape \(3, 4, 3\), got \(2, 4, 3\)"),
    (dict(keep=3, given=random_codes().view(N, 3, 4)), r"given must have shape \(3, 4, 3\), got \(3, 3, 4\)"),
    (dict(keep=3, given=random_codes().flatten(1)), r"given must have shape \(3, 4, 3\)"),
    (dict(keep=3, given=random_codes().double()), "given must be an integer tensor"),
    (dict(keep=3, given=random_codes() > 5), "given must be an integer tensor"),
    (dict(keep=3, given=random_codes().tolist()), "given must be a Tensor"),
    (dict(keep=3, given=random_codes().fill_(K)), r"given values must be in \[0, 11\), got \[11, 11\]"),
    (dict(keep=3, given=random_codes() - 1), r"given values must be in \[0, 11\)"),
    (dict(keep=0, given=random_codes()[:1]), r"given must have shape"),  # checked whenever passed
]


@pytest.mark.parametrize("name", ["naive", "cached", "module", "transformer"])
@pytest.mark.parametrize(("bad", "message"), BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_bad_keep_and_given_are_refused(name: str, bad: dict, message: str) -> None:
    case = make_case("transformer-plain" if name == "transformer" else "pixelcnn-plain")
    draw = {
        "naive": lambda **kw: sample_naive(case.model, N, **kw),
        "cached": lambda **kw: case.sampler.sample(N, **kw),
        "module": lambda **kw: sample(case.model, N, **kw),
        "transformer": lambda **kw: case.sampler.sample(N, **kw),
    }[name]
    with pytest.raises(ValueError, match=message):
        draw(generator=SEEDS, **bad)
