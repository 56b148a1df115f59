"""Configuration of Hierarchical Multi-Scale Attention (HMSA) segmentation models."""

from __future__ import annotations

import copy
import math
from typing import Any

from transformers import AutoConfig, PretrainedConfig

from .label_tables import CITYSCAPES_ID2LABEL, IGNORE_INDEX
from .tiled_inference import check_tile_size, tiling_settings

TRUNKS = ("hrnet_ocr", "resnet50_deeplabv3plus", "mobilenetv2_deeplabv3plus", "backbone_deeplabv3plus")
MOBILENET_OUTPUT_STRIDES = (8, 16, 32)
SCALE_FUSIONS = ("hierarchical", "explicit", "average", "max")
PRIMARY_LOSSES = ("rmi", "cross_entropy")


def _hrnet_stages(width: int) -> list[dict[str, Any]]:
    """HRNetV2 stage table for base width ``width`` (the layout of HRNetV2-W18/W32/W48 used for segmentation)."""
    return [
        {"num_modules": 1, "block": "bottleneck", "num_blocks": [4], "num_channels": [64]},
        {"num_modules": 1, "block": "basic", "num_blocks": [4, 4], "num_channels": [width, 2 * width]},
        {"num_modules": 4, "block": "basic", "num_blocks": [4, 4, 4], "num_channels": [width, 2 * width, 4 * width]},
        {
            "num_modules": 3,
            "block": "basic",
            "num_blocks": [4, 4, 4, 4],
            "num_channels": [width, 2 * width, 4 * width, 8 * width],
        },
    ]


HRNET_PRESETS: dict[str, list[dict[str, Any]]] = {
    "w18": _hrnet_stages(18),
    "w32": _hrnet_stages(32),
    "w48": _hrnet_stages(48),
}
"""HRNetV2 stage specs by preset name. W48 + OCR(512/256) is the configuration of NVIDIA's released checkpoints."""

OCR_PRESET_CHANNELS: dict[str, tuple[int, int]] = {"w18": (256, 128), "w32": (512, 256), "w48": (512, 256)}
"""OCR (mid, key) channels customary for each HRNet width."""

HRNET_BLOCK_TYPES = ("basic", "bottleneck")

MODEL_PRESETS: dict[str, dict[str, Any]] = {
    # NVIDIA's released Cityscapes / Mapillary model
    "hrnet_w48_ocr": {"trunk": "hrnet_ocr", "hrnet_preset": "w48", "ocr_mid_channels": 512, "ocr_key_channels": 256},
    "hrnet_w32_ocr": {"trunk": "hrnet_ocr", "hrnet_preset": "w32", "ocr_mid_channels": 512, "ocr_key_channels": 256},
    "hrnet_w18_ocr": {"trunk": "hrnet_ocr", "hrnet_preset": "w18", "ocr_mid_channels": 256, "ocr_key_channels": 128},
    # the paper's ablation trunk
    "resnet50_deeplabv3plus": {"trunk": "resnet50_deeplabv3plus"},
    # the small-budget trunk: MobileNetV2 (output stride 16) with a slim DeepLabV3+ decoder
    "mobilenetv2_deeplabv3plus": {
        "trunk": "mobilenetv2_deeplabv3plus",
        "mobilenet_width_multiplier": 1.0,
        "mobilenet_output_stride": 16,
        "aspp_channels": 128,
        "aspp_dilations": [6, 12, 18],
        "decoder_aspp_channels": 128,
        "segmentation_head_channels": 128,
        "attention_bottleneck_channels": 64,
    },
    # a small HRNet-OCR for CPUs and tests: one module per stage, one or two blocks per branch
    "hrnet_small_ocr": {
        "trunk": "hrnet_ocr",
        "hrnet_preset": None,
        "hrnet_stages": [
            {"num_modules": 1, "block": "bottleneck", "num_blocks": [1], "num_channels": [32]},
            {"num_modules": 1, "block": "basic", "num_blocks": [2, 2], "num_channels": [16, 32]},
            {"num_modules": 1, "block": "basic", "num_blocks": [2, 2, 2], "num_channels": [16, 32, 64]},
            {"num_modules": 1, "block": "basic", "num_blocks": [2, 2, 2, 2], "num_channels": [16, 32, 64, 128]},
        ],
        "hrnet_stem_channels": 32,
        "ocr_mid_channels": 64,
        "ocr_key_channels": 32,
        "attention_bottleneck_channels": 64,
    },
}
"""Named model configurations for `HMSConfig.from_preset`."""

RESNET50_LAYERS = (3, 4, 6, 3)


class HMSConfig(PretrainedConfig):
    r"""
    Configuration of [`HMSForSemanticSegmentation`]: a segmentation trunk (HRNetV2 + OCR, or a dilated ResNet-50 +
    DeepLabV3+) with a scale-attention head, trained on two scales and chained over any list of scales at inference
    (Tao, Sapra, Catanzaro 2020, "Hierarchical Multi-Scale Attention for Semantic Segmentation").

    The defaults give the record-setting configuration: HRNetV2-W48 + OCR with the reference's Cityscapes recipe.

    Args:
        trunk (`str`, *optional*):
            `"hrnet_ocr"` (HRNetV2 + object-contextual representations, the default), `"resnet50_deeplabv3plus"`
            (dilated ResNet-50 with output stride 8 + DeepLabV3+ decoder, the paper's ablation trunk),
            `"mobilenetv2_deeplabv3plus"` (MobileNetV2 + DeepLabV3+, for small budgets) or
            `"backbone_deeplabv3plus"` (any transformers backbone + DeepLabV3+; chosen automatically when
            `backbone_config` or `backbone` is given).
        backbone_config (`PretrainedConfig` or `dict`, *optional*):
            Config of a transformers backbone (`ResNetConfig`, `ConvNextConfig`, ...), as UperNet and Mask2Former
            take it. DeepLabV3+ reads its first returned feature map (should be stride 4) and its last (deepest);
            when `out_features` names fewer than two stages, the first and the last stage are requested.
        backbone (`str`, *optional*):
            Hub id or local folder of a transformers backbone (e.g. `"microsoft/resnet-50"`): where its pretrained
            weights come from, and its config becomes `backbone_config` unless that is given too (a saved model
            keeps both).
        use_pretrained_backbone (`bool`, *optional*, defaults to `False`):
            Load `backbone`'s pretrained weights when the model is built. Models store it as `False` once built,
            since their checkpoints then hold those weights.
        backbone_kwargs (`dict`, *optional*):
            Extra arguments for the backbone config loaded from `backbone` (e.g. `{"out_features": [...]}`).
        mobilenet_width_multiplier (`float`, *optional*, defaults to 1.0):
            Channel width multiplier of the MobileNetV2 trunk (0.35 ... 1.4 in the MobileNetV2 paper).
        mobilenet_output_stride (`int`, *optional*, defaults to 16):
            Output stride of the MobileNetV2 trunk (8, 16 or 32): later strides become dilations.
        hrnet_preset (`str`, *optional*, defaults to `"w48"`):
            One of `"w18"`, `"w32"`, `"w48"`; fills `hrnet_stages` when that is not given. With `hrnet_stages` given,
            it becomes the name of the preset whose stages they equal, or `None` when they equal none (custom widths
            are then never described as HRNetV2-W48).
        hrnet_stages (`list[dict]`, *optional*):
            Four stage specs, each `{"num_modules", "block" ("basic"/"bottleneck"), "num_blocks", "num_channels"}`
            with one entry per branch in `num_blocks` / `num_channels`. Stage 1 has a single branch.
        hrnet_stem_channels (`int`, *optional*, defaults to 64):
            Channels of the two stride-2 stem convolutions.
        ocr_mid_channels (`int`, *optional*, defaults to 512):
            Width of the OCR pixel representation (also the input of the scale-attention head).
        ocr_key_channels (`int`, *optional*, defaults to 256):
            Width of the OCR query/key/value projections.
        ocr_dropout (`float`, *optional*, defaults to 0.05):
            Dropout2d after the OCR fusion convolution.
        resnet_layers (`list[int]`, *optional*, defaults to `[3, 4, 6, 3]`):
            Bottleneck blocks per ResNet stage (ResNet-50).
        aspp_channels (`int`, *optional*, defaults to 256):
            Channels of each of the five ASPP branches.
        aspp_dilations (`list[int]`, *optional*, defaults to `[12, 24, 36]`):
            Dilations of the three 3x3 ASPP branches (the usual 6/12/18, doubled for output stride 8).
        decoder_aspp_channels (`int`, *optional*, defaults to 256):
            Output channels of the 1x1 projection of the ASPP features in the DeepLabV3+ decoder.
        decoder_fine_channels (`int`, *optional*, defaults to 48):
            Output channels of the 1x1 projection of the stride-4 features in the DeepLabV3+ decoder.
        segmentation_head_channels (`int`, *optional*, defaults to 256):
            Width of the two 3x3 convolutions of the DeepLabV3+ classifier (`MODEL.SEGATTN_BOT_CH`).
        attention_bottleneck_channels (`int`, *optional*, defaults to 256):
            Width of the scale-attention head (`MODEL.SEGATTN_BOT_CH`).
        attention_inner_3x3 (`bool`, *optional*, defaults to `True`):
            Whether the scale-attention head has its second 3x3 convolution (`MODEL.MSCALE_INNER_3x3`).
        attention_dropout (`float`, *optional*, defaults to 0.0):
            Dropout before the attention head's last 1x1 convolution (the reference's `MSCALE_DROPOUT` uses 0.5).
        align_corners (`bool`, *optional*, defaults to `False`):
            `align_corners` of every bilinear resize (`MODEL.ALIGN_CORNERS`).
        training_scales (`list[float]`, *optional*, defaults to `[0.5, 1.0]`):
            Scales seen in training mode; the lowest scale's attention gates the next.
        inference_scales (`list[float]`, *optional*, defaults to `[0.5, 1.0, 2.0]`):
            Scales chained in eval mode when the call gives none.
        scale_fusion (`str`, *optional*, defaults to `"hierarchical"`):
            How per-scale predictions are fused: `"hierarchical"` (HMSA's attention chain), or the baselines HMSA is
            compared against, which fuse all scales at once and so train on all of them: `"explicit"` (a softmax over
            the scales of each scale's attention score, Chen et al. 2016), `"average"`, `"max"`.
        output_auxiliary_logits (`bool`, *optional*, defaults to `False`):
            Whether a call without `labels` also fuses and returns the OCR trunk's auxiliary logits. They only serve
            the auxiliary loss, so by default inference skips their resizes and fusion (half of the chain's work on
            the OCR trunk, and half of its full-resolution maps); calls with `labels` always fuse them.
        primary_loss (`str`, *optional*, defaults to `"rmi"`):
            `"rmi"` (sigmoid BCE + region mutual information, NVIDIA's variant) or `"cross_entropy"`.
        ocr_aux_weight (`float`, *optional*, defaults to 0.4):
            Weight of the loss on the attention-fused OCR auxiliary prediction (`LOSS.OCR_ALPHA`).
        ocr_aux_rmi (`bool`, *optional*, defaults to `False`):
            Whether that auxiliary loss uses RMI (`LOSS.OCR_AUX_RMI`).
        supervised_scale_weight (`float`, *optional*, defaults to 0.05):
            Weight of the loss (RMI off) on each scale's own prediction (`LOSS.SUPERVISED_MSCALE_WT`).
        ignore_index (`int`, *optional*, defaults to 255):
            Label value skipped by the losses.
        rmi_radius, rmi_pool_way, rmi_pool_size, rmi_pool_stride, rmi_loss_weight_lambda, rmi_lambda_way:
            Settings of the RMI loss (see [`RMILoss`]); the defaults are the reference's.
        batch_norm_eps (`float`, *optional*, defaults to 1e-5):
            Epsilon of every BatchNorm layer.
        tile_pixel_budget (`int`, *optional*):
            Tiled inference: in eval mode, a scale whose resized input has more than this many pixels (height * width,
            per image) runs as overlapping tiles of `tile_size`, blended with a smooth window, so that its memory
            depends on the tile size rather than the image size (see `tiled_inference.py`). `None` (the default)
            never tiles, as the reference. Must be at least one tile's pixels. Training mode never tiles.
        tile_size (`int` or `list[int]`, *optional*, defaults to 1024):
            Tile side, or `[height, width]`, in pixels of the resized input. Multiples of 32 keep the tiles on the
            HRNet trunk's stride grid.
        tile_overlap (`int`, *optional*, defaults to 256):
            Pixels shared by neighbouring tiles (`tile_size - tile_overlap` is the stride), smaller than `tile_size`.
    """

    model_type = "hms"
    sub_configs = {"backbone_config": AutoConfig}
    # the Trainer's evaluation keeps only the logits, whatever output_attentions / output_hidden_states say
    keys_to_ignore_at_inference = [
        "auxiliary_logits", "scale_logits", "attentions", "hidden_states", "loss_terms", "scales"
    ]

    def __init__(
        self,
        trunk: str | None = None,
        backbone_config: PretrainedConfig | dict[str, Any] | None = None,
        backbone: str | None = None,
        use_pretrained_backbone: bool = False,
        backbone_kwargs: dict[str, Any] | None = None,
        mobilenet_width_multiplier: float = 1.0,
        mobilenet_output_stride: int = 16,
        hrnet_preset: str | None = "w48",
        hrnet_stages: list[dict[str, Any]] | None = None,
        hrnet_stem_channels: int = 64,
        ocr_mid_channels: int = 512,
        ocr_key_channels: int = 256,
        ocr_dropout: float = 0.05,
        resnet_layers: list[int] | tuple[int, ...] = RESNET50_LAYERS,
        aspp_channels: int = 256,
        aspp_dilations: list[int] | tuple[int, ...] = (12, 24, 36),
        decoder_aspp_channels: int = 256,
        decoder_fine_channels: int = 48,
        segmentation_head_channels: int = 256,
        attention_bottleneck_channels: int = 256,
        attention_inner_3x3: bool = True,
        attention_dropout: float = 0.0,
        align_corners: bool = False,
        training_scales: list[float] | tuple[float, ...] = (0.5, 1.0),
        inference_scales: list[float] | tuple[float, ...] = (0.5, 1.0, 2.0),
        scale_fusion: str = "hierarchical",
        output_auxiliary_logits: bool = False,
        primary_loss: str = "rmi",
        ocr_aux_weight: float = 0.4,
        ocr_aux_rmi: bool = False,
        supervised_scale_weight: float = 0.05,
        ignore_index: int = IGNORE_INDEX,
        rmi_radius: int = 3,
        rmi_pool_way: int = 1,
        rmi_pool_size: int = 4,
        rmi_pool_stride: int = 4,
        rmi_loss_weight_lambda: float = 0.5,
        rmi_lambda_way: int = 1,
        batch_norm_eps: float = 1e-5,
        tile_pixel_budget: int | None = None,
        tile_size: int | list[int] | tuple[int, int] = 1024,
        tile_overlap: int = 256,
        **kwargs: Any,
    ) -> None:
        if "id2label" not in kwargs and "num_labels" not in kwargs:
            kwargs["id2label"] = dict(CITYSCAPES_ID2LABEL)
        super().__init__(**kwargs)

        if trunk is None:
            trunk = "backbone_deeplabv3plus" if (backbone_config is not None or backbone is not None) else "hrnet_ocr"
        if trunk not in TRUNKS:
            raise ValueError(f"trunk must be one of {TRUNKS}, got {trunk!r}")
        self.backbone_config = _resolve_backbone_config(trunk, backbone_config, backbone, backbone_kwargs)
        self.backbone = backbone
        self.use_pretrained_backbone = bool(use_pretrained_backbone)
        if self.use_pretrained_backbone and backbone is None:
            raise ValueError("use_pretrained_backbone=True needs `backbone` (a Hub id or local folder of weights)")
        self.backbone_kwargs = dict(backbone_kwargs or {})
        if isinstance(mobilenet_width_multiplier, bool) or not (
            isinstance(mobilenet_width_multiplier, (int, float)) and 0 < mobilenet_width_multiplier <= 4
        ):
            raise ValueError(f"mobilenet_width_multiplier must be a number in (0, 4], got {mobilenet_width_multiplier!r}")
        self.mobilenet_width_multiplier = float(mobilenet_width_multiplier)
        if mobilenet_output_stride not in MOBILENET_OUTPUT_STRIDES:
            raise ValueError(
                f"mobilenet_output_stride must be one of {MOBILENET_OUTPUT_STRIDES}, got {mobilenet_output_stride!r}"
            )
        self.mobilenet_output_stride = int(mobilenet_output_stride)
        if hrnet_preset is not None and hrnet_preset not in HRNET_PRESETS:
            raise ValueError(f"hrnet_preset must be one of {sorted(HRNET_PRESETS)} or None, got {hrnet_preset!r}")
        if hrnet_stages is None:
            if hrnet_preset is None:
                raise ValueError(f"hrnet_preset=None needs hrnet_stages (or name one of {sorted(HRNET_PRESETS)})")
            hrnet_stages = copy.deepcopy(HRNET_PRESETS[hrnet_preset])
        else:
            hrnet_stages = _validated_hrnet_stages(hrnet_stages)
            # the stages are what gets built: the name follows them, as the default "w48" would otherwise stay on
            # custom widths (and the model card would call them HRNetV2-W48)
            hrnet_preset = next((name for name, stages in HRNET_PRESETS.items() if stages == hrnet_stages), None)
        if primary_loss not in PRIMARY_LOSSES:
            raise ValueError(f"primary_loss must be one of {PRIMARY_LOSSES}, got {primary_loss!r}")

        self.trunk = trunk
        self.hrnet_preset = hrnet_preset
        self.hrnet_stages = hrnet_stages
        self.hrnet_stem_channels = _positive_int("hrnet_stem_channels", hrnet_stem_channels)
        self.ocr_mid_channels = _positive_int("ocr_mid_channels", ocr_mid_channels)
        self.ocr_key_channels = _positive_int("ocr_key_channels", ocr_key_channels)
        self.ocr_dropout = _probability("ocr_dropout", ocr_dropout)
        self.resnet_layers = [_positive_int("resnet_layers", n) for n in resnet_layers]
        if len(self.resnet_layers) != 4:
            raise ValueError(f"resnet_layers must list 4 stage depths, got {list(resnet_layers)}")
        self.aspp_channels = _positive_int("aspp_channels", aspp_channels)
        self.aspp_dilations = [_positive_int("aspp_dilations", d) for d in aspp_dilations]
        self.decoder_aspp_channels = _positive_int("decoder_aspp_channels", decoder_aspp_channels)
        self.decoder_fine_channels = _positive_int("decoder_fine_channels", decoder_fine_channels)
        self.segmentation_head_channels = _positive_int("segmentation_head_channels", segmentation_head_channels)
        self.attention_bottleneck_channels = _positive_int("attention_bottleneck_channels", attention_bottleneck_channels)
        self.attention_inner_3x3 = bool(attention_inner_3x3)
        self.attention_dropout = _probability("attention_dropout", attention_dropout)
        self.align_corners = bool(align_corners)
        self.training_scales = validate_scales(training_scales, "training_scales")
        self.inference_scales = validate_scales(inference_scales, "inference_scales")
        if scale_fusion not in SCALE_FUSIONS:
            raise ValueError(f"scale_fusion must be one of {SCALE_FUSIONS}, got {scale_fusion!r}")
        self.scale_fusion = scale_fusion
        self.output_auxiliary_logits = bool(output_auxiliary_logits)
        self.primary_loss = primary_loss
        self.ocr_aux_weight = _non_negative("ocr_aux_weight", ocr_aux_weight)
        self.ocr_aux_rmi = bool(ocr_aux_rmi)
        self.supervised_scale_weight = _non_negative("supervised_scale_weight", supervised_scale_weight)
        self.ignore_index = int(ignore_index)
        if not 1 <= int(rmi_radius) <= 10:
            raise ValueError(f"rmi_radius must be in 1..10, got {rmi_radius}")
        if rmi_pool_way not in (0, 1, 2):
            raise ValueError(f"rmi_pool_way must be 0 (max), 1 (avg) or 2 (bilinear resize), got {rmi_pool_way}")
        if rmi_pool_size != rmi_pool_stride:
            raise ValueError(f"rmi_pool_size must equal rmi_pool_stride, got {rmi_pool_size} and {rmi_pool_stride}")
        self.rmi_radius = int(rmi_radius)
        self.rmi_pool_way = int(rmi_pool_way)
        self.rmi_pool_size = _positive_int("rmi_pool_size", rmi_pool_size)
        self.rmi_pool_stride = _positive_int("rmi_pool_stride", rmi_pool_stride)
        self.rmi_loss_weight_lambda = _non_negative("rmi_loss_weight_lambda", rmi_loss_weight_lambda)
        if rmi_lambda_way not in (0, 1):
            raise ValueError(f"rmi_lambda_way must be 0 or 1, got {rmi_lambda_way}")
        self.rmi_lambda_way = int(rmi_lambda_way)
        if not 0 < batch_norm_eps < 1:
            raise ValueError(f"batch_norm_eps must be in (0, 1), got {batch_norm_eps}")
        self.batch_norm_eps = float(batch_norm_eps)
        tiling_settings(tile_pixel_budget, tile_size, tile_overlap)  # raises naming the field
        tile_height, tile_width = check_tile_size(tile_size)
        self.tile_pixel_budget = tile_pixel_budget
        self.tile_size = tile_height if tile_height == tile_width else [tile_height, tile_width]
        self.tile_overlap = int(tile_overlap)

    @classmethod
    def from_preset(cls, name: str, **kwargs: Any) -> HMSConfig:
        """A config from `MODEL_PRESETS` (e.g. `"hrnet_w48_ocr"`, `"hrnet_small_ocr"`); `kwargs` override its values."""
        if name not in MODEL_PRESETS:
            raise ValueError(f"preset must be one of {sorted(MODEL_PRESETS)}, got {name!r}")
        return cls(**{**copy.deepcopy(MODEL_PRESETS[name]), **kwargs})

    @property
    def hrnet_output_channels(self) -> int:
        """Channels of the concatenated HRNet branches fed to OCR (`high_level_ch` in the reference)."""
        return sum(self.hrnet_stages[-1]["num_channels"])


def _resolve_backbone_config(
    trunk: str, backbone_config: PretrainedConfig | dict[str, Any] | None, backbone: str | None,
    backbone_kwargs: dict[str, Any] | None,
) -> PretrainedConfig | None:
    """The transformers backbone config of `trunk="backbone_deeplabv3plus"`, asking for its first and last stages."""
    if trunk != "backbone_deeplabv3plus":
        if backbone_config is not None or backbone is not None:
            raise ValueError(f"backbone_config / backbone need trunk='backbone_deeplabv3plus', got trunk={trunk!r}")
        return None
    if backbone_config is None and backbone is None:
        raise ValueError("trunk='backbone_deeplabv3plus' needs backbone_config or backbone")
    if backbone_config is None:
        backbone_config = AutoConfig.from_pretrained(backbone, **(backbone_kwargs or {}))
    elif isinstance(backbone_config, dict):
        if "model_type" not in backbone_config:
            raise ValueError(f"backbone_config as a dict needs a 'model_type', got keys {sorted(backbone_config)}")
        backbone_config = AutoConfig.for_model(**backbone_config)
    else:
        # a copy in its saved (JSON) form: the caller's object is left as it was, and tuple-valued defaults such as
        # ConvNextConfig's hidden_sizes become the lists that the backbone classes concatenate to
        backbone_config = type(backbone_config).from_dict(backbone_config.to_dict())
    stage_names = getattr(backbone_config, "stage_names", None)
    if not stage_names:
        raise ValueError(
            f"backbone_config must be a transformers backbone config (with stage_names / out_features), "
            f"got {type(backbone_config).__name__}"
        )
    if len(getattr(backbone_config, "out_features", None) or []) < 2:
        backbone_config.out_features = [stage_names[1], stage_names[-1]]  # the stride-4 stage and the deepest
    return backbone_config


def validate_scales(scales: Any, name: str = "scales") -> list[float]:
    """Return ``scales`` as a list of floats, or raise a ``ValueError`` naming ``name`` if any is not positive."""
    if isinstance(scales, (int, float)):
        scales = [scales]
    try:
        values = [float(s) for s in scales]
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a list of positive numbers, got {scales!r}") from None
    if not values or any(not (s > 0) or s == float("inf") for s in values):
        raise ValueError(f"{name} must be a non-empty list of positive, finite numbers, got {scales!r}")
    if len(set(values)) != len(values):
        raise ValueError(f"{name} must not repeat a scale, got {scales!r}")
    return values


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _non_negative(name: str, value: Any) -> float:
    # an infinite weight makes every loss inf or NaN from the first step
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
        raise ValueError(f"{name} must be a non-negative, finite number, got {value!r}")
    return float(value)


def _probability(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")
    return float(value)


def _validated_hrnet_stages(stages: Any) -> list[dict[str, Any]]:
    if not isinstance(stages, (list, tuple)) or len(stages) != 4:
        raise ValueError(f"hrnet_stages must be a list of 4 stage specs, got {stages!r}")
    validated = []
    for index, stage in enumerate(stages, start=1):
        where = f"hrnet_stages[{index - 1}] (stage {index})"
        if not isinstance(stage, dict):
            raise ValueError(f"{where} must be a dict, got {stage!r}")
        missing = {"num_modules", "block", "num_blocks", "num_channels"} - set(stage)
        if missing:
            raise ValueError(f"{where} lacks the keys {sorted(missing)}")
        if stage["block"] not in HRNET_BLOCK_TYPES:
            raise ValueError(f"{where}: block must be one of {HRNET_BLOCK_TYPES}, got {stage['block']!r}")
        num_blocks = [_positive_int(f"{where} num_blocks", n) for n in stage["num_blocks"]]
        num_channels = [_positive_int(f"{where} num_channels", n) for n in stage["num_channels"]]
        expected_branches = 1 if index == 1 else index
        if len(num_blocks) != expected_branches or len(num_channels) != expected_branches:
            raise ValueError(
                f"{where} must have {expected_branches} branch(es) in num_blocks and num_channels, "
                f"got {num_blocks} and {num_channels}"
            )
        validated.append(
            {
                "num_modules": _positive_int(f"{where} num_modules", stage["num_modules"]),
                "block": stage["block"],
                "num_blocks": num_blocks,
                "num_channels": num_channels,
            }
        )
    return validated
