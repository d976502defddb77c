"""Weight averaging for training (``TrainConfig.ema_decay`` in steps/training/task.py): an exponential moving average of
a
model's floating-point parameters, Polyak style, which samples better than the last iterate of a short, noisy run."""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import nn


class WeightAverage:
    """The exponential moving average of a model's floating-point parameters (``TrainConfig.ema_decay``).

    Buffers (batch-norm statistics, EMA codebooks) are not averaged: :meth:`model` takes them from the live model.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.params = {k: p.detach().clone() for k, p in model.named_parameters() if p.is_floating_point()}

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """Fold in the weights after update ``step`` (1-based)."""
        decay = min(self.decay, (1 + step) / (10 + step))
        live = dict(model.named_parameters())
        torch._foreach_lerp_(list(self.params.values()), [live[k].detach() for k in self.params], 1 - decay)

    def model(self, live: nn.Module) -> nn.Module:
        """A copy of ``live`` holding the averaged weights (and ``live``'s buffers)."""
        averaged = copy.deepcopy(live)
        with torch.no_grad():
            for k, p in averaged.named_parameters():
                if k in self.params:
                    p.copy_(self.params[k])
        return averaged

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.cpu() for k, v in self.params.items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        for k, v in self.params.items():
            v.copy_(state[k])
