"""Tiny model configurations shared by the tests (built in milliseconds, same code paths as the real sizes)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

TINY_HRNET = {
    "trunk": "hrnet_ocr",
    "hrnet_preset": None,
    "hrnet_stages": [
        {"num_modules": 1, "block": "bottleneck", "num_blocks": [1], "num_channels": [8]},
        {"num_modules": 1, "block": "basic", "num_blocks": [1, 1], "num_channels": [4, 8]},
        {"num_modules": 1, "block": "basic", "num_blocks": [1, 1, 1], "num_channels": [4, 8, 16]},
        {"num_modules": 2, "block": "basic", "num_blocks": [1, 1, 1, 1], "num_channels": [4, 8, 16, 32]},
    ],
    "hrnet_stem_channels": 8,
    "ocr_mid_channels": 16,
    "ocr_key_channels": 8,
    "attention_bottleneck_channels": 8,
    "num_labels": 5,
}
TINY_RESNET = {
    "trunk": "resnet50_deeplabv3plus",
    "resnet_layers": [1, 1, 1, 1],
    "aspp_channels": 8,
    "decoder_aspp_channels": 8,
    "decoder_fine_channels": 4,
    "segmentation_head_channels": 8,
    "attention_bottleneck_channels": 8,
    "num_labels": 5,
}


def save_tiny_model(folder: Path, config: dict[str, Any], **overrides: Any) -> Path:
    """A model of `config` (with `overrides`), randomly initialised with seed 0, saved in `folder` by save_pretrained."""
    import torch

    from hms_segmentation import HMSConfig, HMSForSemanticSegmentation

    torch.manual_seed(0)
    HMSForSemanticSegmentation(HMSConfig(**{**config, **overrides})).save_pretrained(folder)
    return folder
