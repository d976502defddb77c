"""Drawing images from trained models: the heart of the sample step, usable anywhere a model can be loaded.

For a VQ-VAE-2 each image draws a top code map from the top prior, then each finer level's map from its prior
conditioned on the codes of the level above, down to the bottom, then decodes them all to pixels (Razavi et al. 2019,
section 3.2); a one-level VQ-VAE has only the top prior, and the VAE baseline decodes N(0, temperature^2 I) draws
with no prior at all. Codes come from each prior's sampler in the registry (the cached samplers of the PixelCNN and
the transformer), with temperature, top-k, top-p and classifier-free guidance.

Completion. Given the codes of existing images, ``keep_rows`` of their image rows are kept: at every level the code
rows wholly inside them (:func:`kept_rows`) are forced in raster order and the rest drawn after them, exactly as the
priors would continue those codes (they are causal), so a completion is a sample with the kept codes forced.

Seeds. Each image draws all its randomness (top codes, then bottom codes, or the VAE latent) from its own CPU
generator seeded with its seed, so an image depends only on its seed and label: not on the batch it is drawn in, the
device (up to float rounding) or the order of work. The sample step gives image ``i`` the seed
:func:`sample_seed` ``(seed, i, attempt)``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from steps.artifacts.autoencoder import Autoencoder
from steps.artifacts.priors import Priors
from steps.nn import registry
from steps.nn.draw import DEFAULT, SamplingControls


def sample_seed(seed: int, index: int, attempt: int = 0) -> int:
    """The generator seed of attempt ``attempt`` of sample ``index``: a fixed hash (never Python's salted ``hash``).

    Below 2**63, so it fits an int64 column; ``torch.Generator().manual_seed(...)`` on it reproduces the sample.
    """
    digest = hashlib.sha256(f"vqvae2-sample/{seed}/{index}/{attempt}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def check_keep_rows(keep_rows: Any, size: int | None) -> int:
    """``keep_rows`` as an int: image rows to keep, in [0, size] (any >= 0 while the image side is not known).

    Raises:
        ValueError: anything else (a bool, a float, out of range), naming ``keep_rows``.
    """
    top = keep_rows if size is None else size
    if isinstance(keep_rows, bool) or not isinstance(keep_rows, (int, np.integer)) or not 0 <= keep_rows <= top:
        span = ">= 0" if size is None else f"in [0, {size}]"
        raise ValueError(f"keep_rows must be an integer {span} (image rows to keep), got {keep_rows!r}")
    return int(keep_rows)


def kept_rows(scale: int, keep_rows: int) -> int:
    """Code rows of a level whose codes each span ``scale`` image rows that lie wholly inside the first ``keep_rows``
    image rows."""
    return keep_rows // scale


class ImageGenerator:
    """An autoencoder and its priors, loaded once on ``device``, drawing images from per-image seeds.

    Args:
        autoencoder: the train_vqvae output.
        priors: the train_prior output, checked against ``autoencoder`` by the caller
            (:func:`steps.artifacts.compat.check_compatible`); None for a model without codes, or to only encode and
            decode with a VQ model (then :meth:`draw` refuses).
        device: where the models run; random streams stay on the CPU.
    """

    def __init__(self, autoencoder: Autoencoder, priors: Priors | None, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.model = autoencoder.load(self.device)
        self.levels = autoencoder.levels
        self.drawable = priors is not None or not self.levels
        levels = self.levels if priors is not None else ()
        models = {lv: priors.load(lv, self.device) for lv in levels}
        self.samplers = {lv: registry.sampler(model) for lv, model in models.items()}
        self.num_classes = {lv: priors.num_classes(lv) for lv in levels}
        self.guidable = [lv for lv, model in models.items() if model.config.guidable]  # trained with class_dropout
        self.cache_bytes = dict.fromkeys(self.levels, 0)  # the largest sampler caches so far, per level

    def check(self, controls: SamplingControls) -> None:
        """Raise ValueError if these models cannot draw with ``controls`` (guidance without a guidable prior)."""
        if not self.drawable:
            raise ValueError("this generator has no priors: it encodes and decodes only (load a train_prior output)")
        controls.check_guidance(bool(self.guidable))

    @torch.no_grad()
    def draw(
        self,
        seeds: Sequence[int],
        labels: Sequence[int] | None = None,
        controls: SamplingControls = DEFAULT,
        given: Mapping[str, torch.Tensor] | None = None,
        keep_rows: int = 0,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Images (n, C, S, S) in [-1, 1] and code maps per level (n, H, W) for ``seeds`` (and ``labels``, one per
        image, for class-conditional priors; levels whose prior is unconditional ignore them).

        Guidance (``controls.guidance_scale`` other than 1) applies at the levels whose prior was trained with
        ``class_dropout``; with no such level it is an error.

        Completion: with ``given`` (code maps per level, (n, H, W) each, as ``encode`` makes them) and ``keep_rows``
        image rows (0 <= keep_rows <= S), each level keeps its code rows inside those rows and draws the rest.

        Raises:
            ValueError: guidance without a guidable prior, ``keep_rows`` outside the image or without ``given``,
                ``given`` without every level.
        """
        self.check(controls)
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds]  # each level continues these streams
        if not self.levels:
            if keep_rows or given is not None:
                raise ValueError("a model without codes cannot complete images (keep_rows needs a VQ model)")
            shape = self.model.config.latent_shape
            z = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(self.device)  # (n, *latent)
            return self.model.decode(z * controls.temperature), {}
        keep = self._kept_positions(keep_rows, given, len(gens))
        labels_t = torch.as_tensor(list(labels), device=self.device) if labels is not None else None
        codes: dict[str, torch.Tensor] = {}
        cond = None
        for lv in self.levels:
            sampler = self.samplers[lv]
            lab = labels_t if self.num_classes[lv] else None
            forced = given[lv].to(self.device) if keep[lv] else None
            codes[lv] = sampler.sample(
                len(gens), lab, cond, generator=gens, controls=controls.at_level(lv in self.guidable),
                given=forced, keep=keep[lv],
            )  # fmt: skip
            self.cache_bytes[lv] = max(self.cache_bytes[lv], sampler.cache_bytes)
            cond = codes[lv]  # (n, H, W)
        return self.model.decode_codes(*codes.values()), codes

    def _kept_positions(self, keep_rows: int, given: Mapping[str, torch.Tensor] | None, n: int) -> dict[str, int]:
        """Raster positions each level keeps (its kept code rows times its width)."""
        config = self.model.config
        keep_rows = check_keep_rows(keep_rows, config.image_size)
        if keep_rows and given is None:
            raise ValueError(f"keep_rows={keep_rows} needs the codes of the images to complete")
        if given is not None and set(given) != set(self.levels):
            raise ValueError(
                f"the codes to complete must have exactly the levels {list(self.levels)}, got {sorted(given)}"
            )
        keep = {}
        for lv in self.levels:
            height, width = config.shapes[lv]
            if given is not None and tuple(given[lv].shape) != (n, height, width):
                raise ValueError(
                    f"{lv} codes to complete must have shape ({n}, {height}, {width}), got {tuple(given[lv].shape)}"
                )
            keep[lv] = kept_rows(config.scale(lv), keep_rows) * width
        return keep
