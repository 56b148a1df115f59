"""Any transformers backbone (`AutoBackbone`: ResNet, ConvNeXt, Swin, DINOv2, ...) as a trunk for DeepLabV3+."""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoBackbone, PretrainedConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_BACKBONE_MAPPING


class HMSTransformersBackbone(nn.Module):
    """
    Wraps `AutoBackbone` so that it answers like the other DeepLabV3+ trunks: the first feature map it returns is the
    decoder's fine (stride-4) input, the last one its deep input. `HMSConfig` asks the backbone for its first and
    deepest stages when `out_features` names fewer than two.

    Input `pixel_values`: (batch, 3, height, width). Returns `low_level_features` (batch, low_level_channels, h1, w1)
    and `high_level_features` (batch, out_channels, h2, w2).
    """

    def __init__(self, backbone_config: PretrainedConfig, pretrained: str | None = None, **pretrained_kwargs):
        super().__init__()
        if pretrained is None:
            self.encoder = AutoBackbone.from_config(backbone_config)
        else:
            # ImageNet weights from the Hub or a local folder; `backbone_config` came from the same place. The concrete
            # class, not AutoBackbone.from_pretrained: that one asks the Hub first and so fails offline and on folders.
            backbone_class = MODEL_FOR_BACKBONE_MAPPING[type(backbone_config)]
            self.encoder = backbone_class.from_pretrained(pretrained, config=backbone_config, **pretrained_kwargs)
        channels = list(self.encoder.channels)
        if len(channels) < 2:
            raise ValueError(
                f"backbone_config.out_features must name at least two stages (fine and deep), got "
                f"{backbone_config.out_features}"
            )
        self.low_level_channels = channels[0]
        self.out_channels = channels[-1]

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feature_maps = self.encoder(pixel_values, return_dict=True).feature_maps
        return feature_maps[0], feature_maps[-1]
