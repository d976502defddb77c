"""Weight averaging (train.ema_decay): the average follows the warm-up rule, leaves buffers alone, and round-trips."""

from __future__ import annotations

import torch
from torch import nn

from steps.nn.averaging import WeightAverage


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))


def test_the_average_follows_the_warmup_then_the_decay():
    model = small_model()
    start = {k: p.detach().clone() for k, p in model.named_parameters()}
    average = WeightAverage(model, decay=0.9)
    expected = dict(start)
    for step in (1, 2, 50):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        average.update(model, step)
        decay = min(0.9, (1 + step) / (10 + step))  # early weights fade fast, then the configured decay
        live = dict(model.named_parameters())
        expected = {k: decay * expected[k] + (1 - decay) * live[k].detach() for k in expected}
    for k, v in expected.items():
        torch.testing.assert_close(average.params[k], v)
    assert not torch.equal(average.params["0.weight"], model[0].weight)


def test_the_averaged_copy_keeps_the_live_buffers_and_leaves_the_live_model_alone():
    model = small_model()
    average = WeightAverage(model, decay=0.5)
    model.train()
    model(torch.randn(8, 3))  # moves the batch-norm statistics
    with torch.no_grad():
        model[0].weight.mul_(3.0)
    live_weight = model[0].weight.detach().clone()
    averaged = average.model(model)
    assert torch.equal(averaged[0].weight, average.params["0.weight"])
    assert torch.equal(averaged[1].running_mean, model[1].running_mean)  # buffers are not averaged
    assert torch.equal(model[0].weight, live_weight)


def test_state_round_trip():
    model = small_model()
    average = WeightAverage(model, decay=0.99)
    with torch.no_grad():
        model[0].weight.add_(1.0)
    average.update(model, 1)
    other = WeightAverage(small_model(), decay=0.99)
    other.load_state_dict(average.state_dict())
    for k in average.params:
        assert torch.equal(other.params[k], average.params[k])
