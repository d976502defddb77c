"""EfficientNet-Lite0 feature space: the shipped weights load strictly and give sane, deterministic features."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from steps.nn.features import FEATURE_DIM, EfficientNetLite0, FeatureExtractor, default_weights_path


@pytest.fixture(scope="module")
def extractor() -> FeatureExtractor:
    return FeatureExtractor()


def test_state_dict_loads_strictly_with_matching_shapes():
    state = torch.load(default_weights_path(), map_location="cpu", weights_only=True)
    net = EfficientNetLite0()
    ours = net.state_dict()
    assert set(ours) == set(state)
    assert all(ours[k].shape == v.shape for k, v in state.items())
    net.load_state_dict(state, strict=True)
    assert sum(p.numel() for p in net.parameters()) == pytest.approx(4.65e6, rel=0.01)  # Lite0: 4.65 M parameters


def test_features_are_deterministic_and_non_degenerate(extractor):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 1, 32, 32, generator=g) * 2 - 1
    f = extractor(x)
    assert f.shape == (4, FEATURE_DIM) and f.dtype == torch.float32
    assert torch.equal(f, extractor(x))
    assert (f >= 0).all() and (f <= 6).all()  # pooled ReLU6 activations
    assert (f.std(dim=0) > 0).sum() > FEATURE_DIM // 4  # different images give different features
    assert torch.allclose(extractor(x.expand(-1, 3, -1, -1)), f)  # grey = the same grey in three channels


def test_folded_batch_norm_gives_the_same_features(extractor):
    x = torch.rand(2, 3, 40, 40) * 2 - 1
    plain = FeatureExtractor(fold=False)
    assert torch.allclose(plain(x), extractor(x), atol=1e-4, rtol=1e-4)


def test_classifies_a_photo_plausibly(extractor):
    """scikit-learn's bundled photo of a Chinese temple: top-5 must hold one of the temple-like ImageNet classes."""
    from sklearn.datasets import load_sample_image

    photo = load_sample_image("china.jpg")[:, 80:507]  # (427, 427, 3) uint8, a centre crop
    x = torch.from_numpy(np.ascontiguousarray(photo)).permute(2, 0, 1)[None].float() / 127.5 - 1
    top5 = extractor.logits(x).topk(5).indices[0].tolist()
    temple_like = {442, 483, 663, 698, 832}  # bell cote, castle, monastery, palace, stupa
    assert temple_like & set(top5), top5


def test_rejects_bad_shapes(extractor):
    with pytest.raises(ValueError, match="expected images"):
        extractor(torch.zeros(2, 2, 32, 32))
