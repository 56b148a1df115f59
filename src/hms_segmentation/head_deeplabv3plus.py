"""DeepLabV3+ decoder (Chen et al. 2018) in the layout of NVIDIA's `MscaleV3Plus`."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .head_ocr import HMSConvNormReLU
from .residual_blocks import normalises_across_processes


class HMSAtrousSpatialPyramidPooling(nn.Module):
    """
    ASPP: image pooling, a 1x1 branch and dilated 3x3 branches, concatenated in that order (no projection after).

    Input: (batch, in_channels, height, width). Output: (batch, (2 + len(dilations)) * channels, height, width).
    """

    def __init__(self, in_channels: int, channels: int, dilations: list[int], eps: float, align_corners: bool):
        super().__init__()
        self.align_corners = align_corners
        self.image_pooling = HMSConvNormReLU(in_channels, channels, 1, eps)
        self.branches = nn.ModuleList(
            [HMSConvNormReLU(in_channels, channels, 1, eps)]
            + [HMSConvNormReLU(in_channels, channels, 3, eps, dilation=d) for d in dilations]
        )
        self.out_channels = (2 + len(dilations)) * channels

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        norm = self.image_pooling.norm
        if norm.training and features.shape[0] == 1 and not normalises_across_processes(norm):
            # BatchNorm over the pooled (batch, channels, 1, 1) map has one value per channel: no batch statistics
            raise ValueError(
                "the DeepLabV3+ decoder needs batch_size >= 2 in training mode (its image-pooling branch normalises "
                "one pooled value per image with BatchNorm), got batch_size 1; train with a batch of at least 2, "
                "with SyncBatchNorm over several GPUs (--sync_bn), or with the BatchNorm layers in eval mode (frozen "
                "statistics)"
            )
        pooled = self.image_pooling(features.mean(dim=(2, 3), keepdim=True))
        pooled = F.interpolate(pooled, size=features.shape[-2:], mode="bilinear", align_corners=self.align_corners)
        return torch.cat([pooled] + [branch(features) for branch in self.branches], dim=1)


class HMSDeepLabV3PlusHead(nn.Module):
    """
    DeepLabV3+ decoder: ASPP on the stride-8 features, projected (1x1) and resized to the stride-4 features, which
    are projected to `fine_channels`; the concatenation [fine, aspp] feeds the classifier and the scale-attention head.

    Inputs: `low_level_features` (batch, low_channels, H/4, W/4), `high_level_features` (batch, high_channels, H/8, W/8).
    Returns `logits` (batch, num_labels, H/4, W/4), `auxiliary_logits` (`None`: this decoder has no auxiliary
    head) and `attention_features` (batch, fine_channels + aspp_projection_channels, H/4, W/4).
    """

    def __init__(
        self,
        low_level_channels: int,
        high_level_channels: int,
        aspp_channels: int,
        aspp_dilations: list[int],
        aspp_projection_channels: int,
        fine_channels: int,
        head_channels: int,
        num_labels: int,
        eps: float,
        align_corners: bool,
    ):
        super().__init__()
        self.align_corners = align_corners
        self.aspp = HMSAtrousSpatialPyramidPooling(high_level_channels, aspp_channels, aspp_dilations, eps, align_corners)
        self.aspp_projection = nn.Conv2d(self.aspp.out_channels, aspp_projection_channels, kernel_size=1, bias=False)
        self.fine_projection = nn.Conv2d(low_level_channels, fine_channels, kernel_size=1, bias=False)
        self.out_channels = fine_channels + aspp_projection_channels
        self.classifier = nn.Sequential(
            HMSConvNormReLU(self.out_channels, head_channels, 3, eps),
            HMSConvNormReLU(head_channels, head_channels, 3, eps),
            nn.Conv2d(head_channels, num_labels, kernel_size=1, bias=False),
        )

    def forward(
        self, low_level_features: torch.Tensor, high_level_features: torch.Tensor
    ) -> tuple[torch.Tensor, None, torch.Tensor]:
        aspp = self.aspp_projection(self.aspp(high_level_features))
        aspp = F.interpolate(aspp, size=low_level_features.shape[-2:], mode="bilinear", align_corners=self.align_corners)
        features = torch.cat([self.fine_projection(low_level_features), aspp], dim=1)
        return self.classifier(features), None, features
