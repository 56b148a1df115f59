"""Object-Contextual Representations head (OCR; Yuan, Chen, Wang 2020), the decoder of HMSA's HRNet-OCR model."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class HMSConvNormReLU(nn.Sequential):
    """Convolution, BatchNorm, ReLU as one named unit (`conv`, `norm`)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, eps: float, bias: bool = False,
                 dilation: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, padding=dilation * (kernel_size // 2), dilation=dilation, bias=bias
        )
        self.norm = nn.BatchNorm2d(out_channels, eps=eps)
        self.activation = nn.ReLU()


class HMSObjectContextBlock(nn.Module):
    """
    Pixel-to-object attention: each pixel (query) attends over the per-class object representations (keys/values),
    and the attended context is projected back to the pixel width.

    Inputs: `pixel_features` (batch, channels, height, width), `object_features` (batch, channels, num_labels, 1).
    Output: (batch, channels, height, width).
    """

    def __init__(self, channels: int, key_channels: int, eps: float):
        super().__init__()
        self.key_channels = key_channels
        self.query_projection = nn.Sequential(
            HMSConvNormReLU(channels, key_channels, 1, eps), HMSConvNormReLU(key_channels, key_channels, 1, eps)
        )
        self.key_projection = nn.Sequential(
            HMSConvNormReLU(channels, key_channels, 1, eps), HMSConvNormReLU(key_channels, key_channels, 1, eps)
        )
        self.value_projection = HMSConvNormReLU(channels, key_channels, 1, eps)
        self.output_projection = HMSConvNormReLU(key_channels, channels, 1, eps)

    def forward(self, pixel_features: torch.Tensor, object_features: torch.Tensor) -> torch.Tensor:
        batch_size, _, height, width = pixel_features.shape
        query = self.query_projection(pixel_features).flatten(2).transpose(1, 2)  # (batch, pixels, key)
        key = self.key_projection(object_features).flatten(2)  # (batch, key, classes)
        value = self.value_projection(object_features).flatten(2).transpose(1, 2)  # (batch, classes, key)
        similarity = torch.matmul(query, key) * self.key_channels**-0.5
        context = torch.matmul(similarity.softmax(dim=-1), value)  # (batch, pixels, key)
        context = context.transpose(1, 2).reshape(batch_size, self.key_channels, height, width)
        return self.output_projection(context)


class HMSObjectContextHead(nn.Module):
    """
    OCR decoder on the HRNet features: a soft-region (auxiliary) classifier gives class maps, which pool pixel
    features into one representation per class; each pixel is then augmented with its attended object context.

    Input `features`: (batch, in_channels, height, width) at stride 4.
    Returns `logits` (batch, num_labels, height, width), `auxiliary_logits` (same shape; the soft-region
    prediction) and `attention_features` (batch, mid_channels, height, width), the input of the scale-attention head.
    """

    def __init__(self, in_channels: int, mid_channels: int, key_channels: int, num_labels: int, dropout: float, eps: float):
        super().__init__()
        self.pixel_projection = HMSConvNormReLU(in_channels, mid_channels, 3, eps, bias=True)
        self.soft_region_head = nn.Sequential(
            HMSConvNormReLU(in_channels, in_channels, 1, eps, bias=True),
            nn.Conv2d(in_channels, num_labels, kernel_size=1, bias=True),
        )
        self.object_context = HMSObjectContextBlock(mid_channels, key_channels, eps)
        self.context_fusion = HMSConvNormReLU(2 * mid_channels, mid_channels, 1, eps)
        self.context_dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(mid_channels, num_labels, kernel_size=1, bias=True)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pixel_features = self.pixel_projection(features)
        auxiliary_logits = self.soft_region_head(features)
        # Object regions: softmax over the pixels of each class map, then a weighted sum of pixel features.
        region_weights = F.softmax(auxiliary_logits.flatten(2), dim=2)  # (batch, classes, pixels)
        object_features = torch.matmul(region_weights, pixel_features.flatten(2).transpose(1, 2))
        object_features = object_features.transpose(1, 2).unsqueeze(3)  # (batch, channels, classes, 1)
        context = self.object_context(pixel_features, object_features)
        attention_features = self.context_dropout(self.context_fusion(torch.cat([context, pixel_features], dim=1)))
        logits = self.classifier(attention_features)
        return logits, auxiliary_logits, attention_features
