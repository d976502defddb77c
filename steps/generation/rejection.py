"""Classifier-based rejection sampling (VQ-VAE-2, Razavi et al. 2019, section 4).

The paper trades diversity for quality: draw class-conditional samples and keep those a pretrained classifier
assigns a high enough probability of the class they were drawn for. Here each sample is redrawn (attempt 1, 2, ...)
until the classifier gives its label at least ``threshold``, for at most ``max_attempts`` attempts; a sample that
never passes keeps its most likely attempt and is marked not accepted. The classifier scores the uint8 pixels that
are written, so what is kept is what a reader of the PNGs would score.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from steps.generation.generator import ImageGenerator, sample_seed
from steps.io.pixels import chw, to_float, to_uint8
from steps.nn.draw import DEFAULT, SamplingControls


@dataclass(frozen=True)
class Rejection:
    """The classifier (a loaded model) and the rule."""

    classifier: torch.nn.Module
    threshold: float
    max_attempts: int

    def class_prob(self, pixels: np.ndarray, labels: Sequence[int], device: torch.device) -> np.ndarray:
        """Classifier probability (n,) of each sample's label, on uint8 pixels (n, S, S) or (n, S, S, 3)."""
        x = to_float(chw(pixels)).to(device)  # (n, C, S, S)
        labels_t = torch.as_tensor(list(labels), device=device)
        return self.classifier.class_probability(x, labels_t).cpu().numpy().astype(np.float64)


def draw_accepted(
    generator: ImageGenerator,
    rule: Rejection,
    indices: Sequence[int],
    labels: Sequence[int],
    seed: int,
    controls: SamplingControls = DEFAULT,
) -> tuple[np.ndarray, dict[str, torch.Tensor], dict[str, Any]]:
    """Draw the samples at global ``indices`` (with their ``labels``) until each passes ``rule``.

    Returns:
        uint8 pixels (n, S, S) or (n, S, S, 3), codes per level, and per sample ``seed``, ``attempt``,
        ``class_prob``, ``accepted`` (numpy arrays) plus ``draws``, the number of samples drawn in all.
    """
    n = len(indices)
    info = {"seed": np.zeros(n, np.int64), "attempt": np.zeros(n, np.int32), "class_prob": np.full(n, -1.0)}
    pixels, codes, draws = None, {}, 0
    pending = np.arange(n)
    for attempt in range(rule.max_attempts):
        seeds = [sample_seed(seed, indices[j], attempt) for j in pending]
        wanted = [labels[j] for j in pending]
        images, drawn = generator.draw(seeds, wanted, controls)
        px = to_uint8(images)
        prob = rule.class_prob(px, wanted, generator.device)
        draws += len(pending)
        if pixels is None:  # the first attempt covers every sample
            pixels, codes = px.copy(), {lv: c.clone() for lv, c in drawn.items()}
        better = prob > info["class_prob"][pending]  # keep each sample's most likely draw so far
        slots = pending[better]
        pixels[slots] = px[better]
        for lv, c in drawn.items():
            codes[lv][torch.from_numpy(slots).to(c.device)] = c[torch.from_numpy(better).to(c.device)]
        info["seed"][slots] = np.asarray(seeds, dtype=np.int64)[better]
        info["attempt"][slots], info["class_prob"][slots] = attempt, prob[better]
        pending = pending[prob < rule.threshold]
        if not len(pending):
            break
    info["accepted"] = info["class_prob"] >= rule.threshold
    info["draws"] = draws
    return pixels, codes, info
