"""Any number of levels through the generator, and image completion: a three-level VQ-VAE-2 with class-conditional
priors (random weights: what is tested is the plumbing and its exactness, not image quality)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline import Generator
from steps.artifacts.autoencoder import Autoencoder
from steps.artifacts.compat import check_compatible
from steps.artifacts.priors import Priors
from steps.core.step import MissingInputError
from steps.generation.generator import sample_seed
from steps.nn.draw import SamplingControls
from steps.nn.pixelcnn import PixelCNNConfig
from steps.nn.transformer import TransformerConfig

LEVELS = ("top", "middle", "bottom")
SHAPES = {"top": (4, 4), "middle": (8, 8), "bottom": (16, 16)}  # factors [2, 2, 2] at 32 px


def prior(level: str, kind: str = "pixelcnn"):
    above = LEVELS[LEVELS.index(level) - 1] if level != "top" else None
    common = {"num_codes": 32, "shape": SHAPES[level], "channels": 16, "layers": 2, "dropout": 0.0, "num_classes": 3,
              "class_dropout": 0.2, "cond_num_codes": 32 if above else 0, "cond_channels": 8, "cond_res_blocks": 1,
              "cond_shape": SHAPES[above] if above else (0, 0)}  # fmt: skip
    if kind == "transformer":
        return TransformerConfig(heads=2, **common)
    return PixelCNNConfig(attn_heads=2 if level == "top" else 0, **common)


@pytest.fixture(scope="module", params=["pixelcnn", "transformer"])
def gen(request, tmp_path_factory, artifacts) -> Generator:
    root = tmp_path_factory.mktemp("levels")
    vq = artifacts.autoencoder(root / "vq", artifacts.small_vqvae2(factors=(2, 2, 2)))
    digest = Autoencoder.open(vq).digest
    priors = artifacts.priors(root / "priors", digest, **{lv: prior(lv, request.param) for lv in LEVELS})
    return Generator.from_artifacts(vq, priors, device="cpu", batch_size=3)  # batches split the calls below


def test_three_levels_from_checkpoint_to_images(gen):
    assert gen.autoencoder.levels == LEVELS and gen.autoencoder.shapes == SHAPES
    images = gen.generate(5, seed=1)
    assert images.shape == (5, 1, 32, 32) and images.dtype == torch.uint8
    codes = gen.encode(images)
    assert {lv: tuple(c.shape[1:]) for lv, c in codes.items()} == SHAPES
    assert torch.equal(gen.decode(codes), gen.decode({lv: c.numpy() for lv, c in codes.items()}))
    _, drawn = gen.draw([sample_seed(1, i) for i in range(5)], [i % 3 for i in range(5)])
    assert list(drawn) == list(LEVELS)


@pytest.mark.parametrize("keep_rows", [2, 8, 13, 24])
def test_a_completion_keeps_the_codes_of_the_kept_rows_and_draws_the_rest(gen, keep_rows):
    images = gen.generate(4, seed=2)
    codes = gen.encode(images)
    seeds, labels = [sample_seed(9, i) for i in range(4)], [0, 1, 2, 0]
    filled, got = gen.draw(seeds, labels, given=codes, keep_rows=keep_rows)
    for lv, (height, _) in SHAPES.items():
        kept = keep_rows // (32 // height)  # code rows wholly inside the kept image rows
        assert torch.equal(got[lv][:, :kept], codes[lv][:, :kept]), lv
    _, new = gen.draw(seeds, labels)  # the same seeds without completion: the rest of the bottom level differs
    assert not torch.equal(got["bottom"], new["bottom"])
    api = gen.complete(images, keep_rows=keep_rows, seed=9, labels=labels)  # one completion per image
    assert torch.equal(api, filled)


def test_completing_a_sample_with_its_own_seeds_gives_it_back(gen):
    """The priors are causal: a sample's own codes, forced up to any row, leave what follows as it was drawn."""
    seeds, labels = [sample_seed(4, i) for i in range(3)], [2, 0, 1]
    controls = SamplingControls(temperature=0.9, top_p=0.9, guidance_scale=1.5)
    images, codes = gen.draw(seeds, labels, controls)
    for keep_rows in (0, 5, 16, 31, 32):
        again, recodes = gen.draw(seeds, labels, controls, given=codes, keep_rows=keep_rows)
        assert torch.equal(again, images) and all(torch.equal(recodes[lv], codes[lv]) for lv in LEVELS), keep_rows


def test_complete_api_layout_and_extremes(gen):
    images = gen.generate(2, seed=3)
    out = gen.complete(images, keep_rows=16, n=3, seed=5, labels=[1, 2])
    assert out.shape == (6, 1, 32, 32)
    seeds = [sample_seed(5, i) for i in range(6)]
    repeated = {lv: c.repeat_interleave(3, dim=0) for lv, c in gen.encode(images).items()}
    assert torch.equal(out, gen.draw(seeds, [1, 1, 1, 2, 2, 2], given=repeated, keep_rows=16)[0])
    assert len({bytes(img.numpy()) for img in out[:3]}) > 1, "three completions of one image differ"
    assert torch.equal(gen.complete(images, keep_rows=32, labels=1), gen.decode(gen.encode(images)))
    assert torch.equal(gen.complete(images, keep_rows=0, seed=3), gen.generate(2, seed=3))


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"keep_rows": 33}, r"keep_rows must be an integer in \[0, 32\] \(image rows to keep\), got 33"),
        ({"keep_rows": -1}, r"keep_rows must be an integer in \[0, 32\] \(image rows to keep\), got -1"),
        ({"keep_rows": 2.5}, r"keep_rows must be an integer in \[0, 32\] \(image rows to keep\), got 2.5"),
        ({"keep_rows": 4, "n": 0}, "n must be an int"),
        ({"keep_rows": 4, "labels": [0]}, r"labels must be one class for all images or one per image \(2\)"),
        ({"keep_rows": 4, "labels": 7}, r"labels must be in \[0, 3\)"),
        ({"keep_rows": 4, "temperature": 0}, "temperature"),
    ],
)
def test_bad_completions_name_the_field(gen, kwargs, message):
    with pytest.raises(ValueError, match=message):
        gen.complete(gen.generate(2, seed=0), **kwargs)


def test_images_of_another_size_or_channel_count_are_refused(gen):
    with pytest.raises(ValueError, match=r"images must be uint8 \(N, 1, 32, 32\)"):
        gen.complete(np.zeros((1, 3, 32, 32), np.uint8), keep_rows=4)
    with pytest.raises(ValueError, match=r"images must be uint8 \(N, 1, 32, 32\)"):
        gen.complete(np.zeros((1, 1, 64, 64), np.uint8), keep_rows=4)
    with pytest.raises(ValueError, match="the levels"):
        gen.draw([1], [0], given={"top": torch.zeros(1, 4, 4, dtype=torch.long)}, keep_rows=4)
    with pytest.raises(ValueError, match=r"middle codes to complete must have shape \(1, 8, 8\)"):
        given = {lv: torch.zeros(1, *SHAPES[lv], dtype=torch.long) for lv in LEVELS}
        gen.draw([1], [0], given={**given, "middle": torch.zeros(1, 4, 4, dtype=torch.long)}, keep_rows=4)
    with pytest.raises(ValueError, match="needs the codes of the images"):
        gen.draw([1], [0], keep_rows=4)


def test_priors_of_two_levels_do_not_fit_a_three_level_model(tmp_path, artifacts):
    vq = artifacts.autoencoder(tmp_path / "vq", artifacts.small_vqvae2(factors=(2, 2, 2)))
    digest = Autoencoder.open(vq).digest
    two = artifacts.priors(tmp_path / "p", digest, top=prior("top"), bottom=prior("middle"))
    with pytest.raises((ValueError, MissingInputError), match="middle"):
        check_compatible(Autoencoder.open(vq), priors=Priors.open(two))
