"""MobileNetV2 trunk (Sandler et al. 2018) for the DeepLabV3+ decoder: the small-budget trunk of HMSA.

Module names follow torchvision's `mobilenet_v2` (`features.<i>` with `conv.<j>` inside each inverted residual), so
an ImageNet state dict in torchvision's key layout loads as it is; its last 1x1 convolution (`features.18`, 1280
channels) and `classifier` are not part of the trunk: DeepLabV3+ reads the 320-channel features before them.
"""

from __future__ import annotations

import torch
from torch import nn

from .residual_blocks import HMSCheckpointedBlock

# (expansion t, output channels c, repeats n, first stride s) of MobileNetV2's inverted-residual stages
MOBILENET_V2_STAGES: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
LOW_LEVEL_BLOCK = 3
"""Index in `features` of the last stride-4 block: its output feeds the DeepLabV3+ decoder's fine branch."""


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round a scaled channel count to a multiple of `divisor`, never more than 10% below `value` (MobileNet's rule)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


class HMSConvBNReLU6(nn.Sequential):
    """Convolution, BatchNorm, ReLU6 as children `0`, `1`, `2` (torchvision's `Conv2dNormActivation` layout)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, eps: float, stride: int = 1,
                 groups: int = 1, dilation: int = 1):
        padding = (kernel_size - 1) // 2 * dilation
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation=dilation, groups=groups,
                      bias=False),
            nn.BatchNorm2d(out_channels, eps=eps),
            nn.ReLU6(),
        )


class HMSInvertedResidual(HMSCheckpointedBlock):
    """
    Expand (1x1, unless the expansion is 1), depthwise 3x3 (carrying the stride or dilation), project (1x1, linear);
    residual when the input and output shapes agree. Input (batch, in_channels, h, w), output (batch,
    out_channels, h / stride, w / stride).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int, dilation: int, eps: float):
        super().__init__()
        hidden = in_channels * expansion
        self.use_residual = stride == 1 and in_channels == out_channels
        layers: list[nn.Module] = [] if expansion == 1 else [HMSConvBNReLU6(in_channels, hidden, 1, eps)]
        layers += [
            HMSConvBNReLU6(hidden, hidden, 3, eps, stride=stride, groups=hidden, dilation=dilation),
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels, eps=eps),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        out = self.conv(hidden_states)
        return hidden_states + out if self.use_residual else out


class HMSMobileNetV2Backbone(nn.Module):
    """
    MobileNetV2 with its width multiplier, whose strides beyond `output_stride` become dilations (as DeepLab does).

    Input `pixel_values`: (batch, 3, height, width). Returns `low_level_features` (batch, low_level_channels, H/4,
    W/4) from block 3 and `high_level_features` (batch, out_channels, H/output_stride, W/output_stride) from the last
    inverted residual (320 channels at width 1.0).
    """

    def __init__(self, width_multiplier: float, output_stride: int, eps: float):
        super().__init__()
        in_channels = make_divisible(32 * width_multiplier)
        blocks: list[nn.Module] = [HMSConvBNReLU6(3, in_channels, 3, eps, stride=2)]
        current_stride, dilation = 2, 1
        for expansion, channels, repeats, first_stride in MOBILENET_V2_STAGES:
            out_channels = make_divisible(channels * width_multiplier)
            for index in range(repeats):
                stride = first_stride if index == 0 else 1
                if stride > 1 and current_stride >= output_stride:
                    dilation, stride = dilation * stride, 1  # keep the resolution, widen the receptive field instead
                current_stride *= stride
                blocks.append(HMSInvertedResidual(in_channels, out_channels, stride, expansion, dilation, eps))
                in_channels = out_channels
            if len(blocks) == LOW_LEVEL_BLOCK + 1:
                self.low_level_channels = out_channels
        self.features = nn.Sequential(*blocks)
        self.out_channels = in_channels

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        low_level_features = self.features[: LOW_LEVEL_BLOCK + 1](pixel_values)
        high_level_features = self.features[LOW_LEVEL_BLOCK + 1 :](low_level_features)
        return low_level_features, high_level_features
