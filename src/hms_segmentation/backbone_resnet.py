"""Dilated ResNet-50 trunk (output stride 8), the trunk of HMSA's DeepLabV3+ ablation model.

Module names follow torchvision's ResNet (`conv1`, `bn1`, `layer1`..`layer4`, `downsample.0/1`), so an ImageNet state
dict in torchvision's key layout loads as it is (minus the classifier `fc`).
"""

from __future__ import annotations

import torch
from torch import nn

from .residual_blocks import make_residual_layer


class HMSDilatedResNetBackbone(nn.Module):
    """
    ResNet v1.5 with the strides of `layer3` and `layer4` replaced by dilations 2 and 4 (output stride 8).

    Input `pixel_values`: (batch, 3, height, width). Returns `low_level_features` (batch, 256, H/4, W/4) from
    `layer1` and `high_level_features` (batch, 2048, H/8, W/8) from `layer4`.
    """

    def __init__(self, layers: list[int], eps: float):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64, eps=eps)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = make_residual_layer("bottleneck", 64, 64, layers[0], eps)
        self.layer2 = make_residual_layer("bottleneck", 256, 128, layers[1], eps, stride=2)
        self.layer3 = make_residual_layer("bottleneck", 512, 256, layers[2], eps, dilation=2)
        self.layer4 = make_residual_layer("bottleneck", 1024, 512, layers[3], eps, dilation=4)
        self.low_level_channels = 256
        self.out_channels = 2048

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.maxpool(self.relu(self.bn1(self.conv1(pixel_values))))
        low_level_features = self.layer1(hidden)
        high_level_features = self.layer4(self.layer3(self.layer2(low_level_features)))
        return low_level_features, high_level_features
