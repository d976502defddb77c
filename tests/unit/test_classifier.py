"""Unit tests of the rejection classifier (steps/nn/classifier.py): shapes, checkpoint round trip, training."""

from __future__ import annotations

import io
import re

import pytest
import torch

from steps.nn.checkpoint import checkpoint_dict, load_model
from steps.nn.classifier import ClassifierConfig, ImageClassifier, fit_classifier

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize(("size", "channels", "stages"), [(32, 1, 3), (16, 3, 2), (8, 3, 0)])
def test_shapes(size: int, channels: int, stages: int) -> None:
    model = ImageClassifier(ClassifierConfig(size, channels, num_classes=4, channels=8, stages=stages)).eval()
    x = torch.rand(5, channels, size, size) * 2 - 1
    assert model(x).shape == (5, 4)
    prob = model.class_probability(x, torch.tensor([0, 1, 2, 3, 0]))
    assert prob.shape == (5,) and ((prob > 0) & (prob < 1)).all()
    with pytest.raises(ValueError, match=re.escape(f"expected images of shape (B, {channels}, {size}, {size})")):
        model(torch.zeros(2, channels, size + 1, size + 1))


def test_checkpoint_round_trip() -> None:
    torch.manual_seed(0)
    model = ImageClassifier(ClassifierConfig(16, 1, num_classes=3, channels=4, stages=2)).eval()
    buffer = io.BytesIO()
    torch.save(checkpoint_dict(model, val_accuracy=0.5), buffer)
    clone, payload = load_model(buffer.getvalue(), expect="classifier")
    assert payload["kind"] == "classifier" and payload["val_accuracy"] == 0.5
    assert isinstance(clone, ImageClassifier) and clone.config == model.config and not clone.training
    x = torch.rand(2, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(clone(x), model(x))


def test_fit_learns_a_separable_task_and_probabilities_follow() -> None:
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 2, (64,), generator=g)
    # Class 1 is bright, class 0 dark: trivially separable.
    images = (labels.float()[:, None, None, None] * 2 - 1) * 0.8 + 0.1 * torch.randn(64, 1, 8, 8, generator=g)
    torch.manual_seed(0)
    model = ImageClassifier(ClassifierConfig(8, 1, num_classes=2, channels=4, stages=1, dropout=0.0))
    losses = fit_classifier(model, images, labels, steps=60, batch_size=16, lr=1e-2, generator=g)
    assert losses[-1] < 0.5 * losses[0]
    assert model.class_probability(images, labels).mean() > 0.9
    assert model.class_probability(images, 1 - labels).mean() < 0.1


@pytest.mark.parametrize(
    ("field", "value"),
    [("image_size", 0), ("in_channels", 0), ("num_classes", 1), ("channels", 0), ("stages", -1), ("dropout", 1.0)],
)
def test_config_validation_names_the_field(field: str, value) -> None:
    with pytest.raises(ValueError, match=f"ClassifierConfig.{field}"):
        ClassifierConfig(**{field: value})


def test_stages_must_divide_the_image() -> None:
    with pytest.raises(ValueError, match="ClassifierConfig.stages"):
        ClassifierConfig(image_size=12, stages=3)
