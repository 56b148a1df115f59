"""Hierarchical Multi-Scale Attention for semantic segmentation (Tao, Sapra, Catanzaro 2020, arXiv 2005.10821).

A segmentation network predicts, at every scale it sees, class logits and one attention map. Scales are fused from the
highest to the lowest: each lower scale's attention decides per pixel how much of its own prediction replaces the
running (higher-scale) one. Training uses two scales; inference chains any list. The rule lives in
`hierarchical_scale_fusion`; trunks and heads know nothing of scales.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import SemanticSegmenterOutput

from .backbone_hrnet import HMSHRNetBackbone
from .backbone_mobilenet import HMSMobileNetV2Backbone
from .backbone_resnet import HMSDilatedResNetBackbone
from .backbone_transformers import HMSTransformersBackbone
from .configuration_hms import HMSConfig, validate_scales
from .head_deeplabv3plus import HMSDeepLabV3PlusHead
from .head_ocr import HMSConvNormReLU, HMSObjectContextHead
from .rmi_loss import RMILoss
from .scale_fusion_baselines import explicit_scale_attention_fusion, pooled_scale_fusion
from .tiled_inference import segment_in_tiles, settings_without_effect, tiling_settings

PROCESSOR_ONLY_INPUTS = ("pixel_mask", "original_sizes")
"""Keys of `HMSImageProcessor`'s output that `forward` accepts and ignores, so that `model(**inputs)` works."""


def resize_as(tensor: torch.Tensor, reference: torch.Tensor, align_corners: bool) -> torch.Tensor:
    """Bilinearly resize `tensor` (batch, channels, h, w) to the spatial size of `reference`."""
    if tensor.shape[-2:] == reference.shape[-2:]:
        return tensor
    return F.interpolate(tensor, size=reference.shape[-2:], mode="bilinear", align_corners=align_corners)


def hierarchical_scale_fusion(
    scale_outputs: Iterable[tuple[float, tuple[torch.Tensor, ...], torch.Tensor]],
    align_corners: bool = False,
    may_overwrite_inputs: bool = False,
) -> tuple[torch.Tensor, ...]:
    """
    The attention chain of HMSA: fuse per-scale predictions, visiting scales from the highest to the lowest.

    The highest scale's prediction starts the running fusion. Each following (lower) scale `s` with prediction `p_s`
    and attention `a_s` (in [0, 1], at the resolution of `p_s`) then gates it:

    - `s >= 1`: `fused = a_s * p_s + (1 - a_s) * down(fused)`, at the resolution of `p_s`;
    - `s < 1`: `fused = up(a_s * p_s) + (1 - up(a_s)) * fused`, at the resolution of `fused`. The product is
      resized, not its two factors.

    So the lowest scale has the last word where its attention is high, and higher scales fill in the rest, exactly
    as NVIDIA's reference defines it. `scale_outputs` may be a generator: only the running fusion and the current
    scale are held in memory, and each step writes its result over a map it no longer needs where autograd allows.

    Args:
        scale_outputs: `(scale, predictions, attention)` in descending scale order. `predictions` is a tuple of
            tensors (batch, channels, h_s, w_s) fused alike (e.g. class logits and auxiliary logits); `attention`
            is (batch, 1, h_s, w_s).
        align_corners: `align_corners` of the bilinear resizes.
        may_overwrite_inputs: The caller keeps no reference to the predictions, so under `torch.no_grad()` a step
            may write its result over the running fusion even where that is still the first scale's prediction
            (one full-resolution map fewer at inference).

    Returns:
        The fused predictions, one tensor per entry of `predictions`.
    """
    fused: tuple[torch.Tensor, ...] | None = None
    previous_scale = math.inf
    for scale, predictions, attention in scale_outputs:
        if scale >= previous_scale:
            raise ValueError(f"scale_outputs must come in strictly descending scale order, got {scale} after {previous_scale}")
        previous_scale = scale
        if fused is None:
            fused = predictions
        elif scale >= 1.0:
            fused = tuple(
                _blend_towards(running, prediction, attention, align_corners, may_overwrite_inputs)
                for prediction, running in zip(predictions, fused)
            )
        else:
            keep_running = 1 - resize_as(attention, fused[0], align_corners)
            # the resized product is a new map: accumulate into it (autograd needs neither of its old values)
            fused = tuple(
                resize_as(attention * prediction, running, align_corners).addcmul_(keep_running, running)
                for prediction, running in zip(predictions, fused)
            )
    if fused is None:
        raise ValueError("scale_outputs is empty: at least one scale is needed")
    return fused


def hierarchical_scale_weights(attentions: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """
    Per pixel, the weight of each scale's prediction in the result of `hierarchical_scale_fusion` (they sum to one).

    The chain lets the lowest scale decide where its attention `a_1` is high; the next scale gets `(1 - a_1) * a_2`,
    and so on; the highest scale gets what is left, `prod(1 - a_i)` (its own attention is never read). The chain
    resizes the gated products rather than the maps, so on a grid finer than the lowest scale's this is a close
    reading, not a bit-exact one.

    Args:
        attentions: One map per scale in ascending scale order, all of one size (`torch.Tensor`s or numpy arrays).

    Returns:
        One weight map per scale, in the same order.
    """
    if not attentions:
        raise ValueError("attentions is empty: at least one scale is needed")
    remaining = attentions[0] * 0 + 1  # ones of the maps' type, shape and device
    weights = []
    for attention in attentions[:-1]:
        weights.append(remaining * attention)
        remaining = remaining * (1 - attention)
    weights.append(remaining)
    return weights


def attentions_at_size(
    attentions: Sequence[torch.Tensor], size: tuple[int, int], align_corners: bool = False
) -> list[torch.Tensor]:
    """
    The attention maps of a call with `output_attentions=True`, each `(batch, 1, h_s, w_s)`, resized bilinearly to
    `size` as float32 `(batch, height, width)` maps in [0, 1]: maps of one size, as `hierarchical_scale_weights`
    takes them and as pictures show them.
    """
    return [F.interpolate(attention.float(), size=tuple(size), mode="bilinear", align_corners=align_corners)[:, 0]
            .clamp(0, 1) for attention in attentions]


def average_with_mirrored(
    model: nn.Module, pixel_values: torch.Tensor, logits: torch.Tensor, **forward_kwargs: Any
) -> torch.Tensor:
    """
    The reference's flip test-time augmentation: `logits`, the model's `(batch, num_labels, H, W)` output for
    `pixel_values`, averaged with the output for the mirrored images, mirrored back. `forward_kwargs` (`scales`,
    tiling) go to the mirrored call, which returns logits only (and so, compiled, reuses the graph of a first call
    made with `output_attentions=False`).
    """
    mirrored = model(pixel_values.flip(-1), **{**forward_kwargs, "output_attentions": False}).logits
    return (logits + mirrored.flip(-1)) / 2


def _blend_towards(
    running: torch.Tensor, prediction: torch.Tensor, attention: torch.Tensor, align_corners: bool, may_overwrite: bool
) -> torch.Tensor:
    """`attention * prediction + (1 - attention) * down(running)` in one pass (`torch.lerp`), written over
    `down(running)` when that is a new map (or `may_overwrite`) and autograd will not need it (lerp saves it for the
    attention's gradient)."""
    start = resize_as(running, prediction, align_corners)
    overwrite = may_overwrite or start is not running
    if overwrite and not (torch.is_grad_enabled() and any(t.requires_grad for t in (start, prediction, attention))):
        return start.lerp_(prediction, attention)
    return torch.lerp(start, prediction, attention)


def _scaled_size(size: tuple[int, int], scale: float) -> tuple[int, int]:
    """(height, width) of an input of `size` after `resize_to_scale` by `scale`."""
    return (math.floor(size[0] * scale), math.floor(size[1] * scale)) if scale != 1.0 else tuple(size)


def resize_to_scale(pixel_values: torch.Tensor, scale: float, align_corners: bool) -> torch.Tensor:
    """
    Resize (batch, channels, height, width) by `scale` to (floor(height * scale), floor(width * scale)), the size
    `F.interpolate(..., scale_factor=scale, recompute_scale_factor=True)` gives in the reference.
    """
    if scale == 1.0:
        return pixel_values
    height, width = pixel_values.shape[-2:]
    size = _scaled_size((height, width), scale)
    if min(size) < 1:
        raise ValueError(
            f"scale {scale} turns the input of size {height}x{width} into {size[0]}x{size[1]} pixels; "
            "use a larger input or drop that scale"
        )
    return F.interpolate(pixel_values, size=size, mode="bilinear", align_corners=align_corners)


@dataclass
class HMSSemanticSegmenterOutput(SemanticSegmenterOutput):
    """
    Output of [`HMSForSemanticSegmentation`].

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*, returned when `labels` is provided):
            The HMSA objective: primary loss on the fused logits, plus the weighted OCR auxiliary loss and
            per-scale supervision.
        logits (`torch.FloatTensor` of shape `(batch_size, num_labels, height, width)`):
            Fused class logits at the input resolution.
        hidden_states (`tuple(torch.FloatTensor)`, *optional*, returned when `output_hidden_states=True`):
            One per scale (ascending, as `scales`): the trunk's output features at that scale.
        attentions (`tuple(torch.FloatTensor)`, *optional*, returned when `output_attentions=True`):
            One per scale (ascending, as `scales`): the scale-attention map `(batch_size, 1, h_s, w_s)` in [0, 1]
            at that scale's input resolution (a scale above 1 run as tiles: the lower resolution at which the
            attention chain consumes it, see `tile_pixel_budget` of the forward).
        auxiliary_logits (`torch.FloatTensor` of shape `(batch_size, num_labels, height, width)`, *optional*):
            OCR's auxiliary (soft-region) logits fused with the same attention; `None` for trunks without one.
        scale_logits (`tuple(torch.FloatTensor)`, *optional*, returned when `output_attentions=True`):
            One per scale (ascending, as `scales`): that scale's own class logits at its input resolution (a scale
            above 1 run as tiles: at the resolution of its attention map).
        scales (`tuple(float)`, *optional*, returned with `attentions`, `scale_logits` or `hidden_states`):
            The scales of this call, ascending.
        loss_terms (`dict[str, torch.FloatTensor]`, *optional*, returned when `labels` is provided):
            The unweighted parts of `loss`: `"main"`, `"auxiliary"` (OCR trunk), `"scale_<s>"` for each scale.
    """

    auxiliary_logits: torch.FloatTensor | None = None
    scale_logits: tuple[torch.FloatTensor, ...] | None = None
    scales: tuple[float, ...] | None = None
    loss_terms: dict[str, torch.FloatTensor] | None = None


class HMSScaleAttentionHead(nn.Module):
    """
    Predicts, from the decoder features at one scale, how much that scale's prediction should be trusted per pixel.

    Input: (batch, in_channels, h, w). Output: (batch, 1, h, w) in (0, 1).
    """

    def __init__(self, in_channels: int, bottleneck_channels: int, inner_3x3: bool, dropout: float, eps: float):
        super().__init__()
        self.bottleneck = HMSConvNormReLU(in_channels, bottleneck_channels, 3, eps)
        self.inner = HMSConvNormReLU(bottleneck_channels, bottleneck_channels, 3, eps) if inner_3x3 else nn.Identity()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.projection = nn.Conv2d(bottleneck_channels, 1, kernel_size=1, bias=False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.projection(self.dropout(self.inner(self.bottleneck(features)))))


class HMSPreTrainedModel(PreTrainedModel):
    config: HMSConfig
    config_class = HMSConfig
    base_model_prefix = "hms"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["HMSHRNetModule", "HMSBottleneck", "HMSBasicBlock", "HMSInvertedResidual"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """PyTorch's default init for every conv and BatchNorm: what the reference keeps for its heads."""
        if isinstance(module, nn.Conv2d):
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if module.bias is not None:
                bound = 1 / math.sqrt(module.weight[0].numel())
                init.uniform_(module.bias, -bound, bound)
        elif isinstance(module, nn.BatchNorm2d):
            init.ones_(module.weight)
            init.zeros_(module.bias)
            init.zeros_(module.running_mean)
            init.ones_(module.running_var)
            init.zeros_(module.num_batches_tracked)

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """
        The reference's initialisation: heads keep PyTorch's default (the reference leaves `OPTIONS.INIT_DECODER`
        off), HRNet convs ~ N(0, 0.001), torchvision's init for the ResNet trunk, Kaiming-normal for the DeepLabV3+
        classifier. The trunk rules run per container, after the per-module defaults; transformers' guarded init
        functions leave tensors loaded from a checkpoint untouched.
        """
        super().initialize_weights()
        for module in self.modules():
            if isinstance(module, HMSHRNetBackbone):
                for conv in _convolutions(module):
                    init.normal_(conv.weight, std=0.001)
            elif isinstance(module, (HMSDilatedResNetBackbone, HMSMobileNetV2Backbone)):
                for conv in _convolutions(module):
                    init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, HMSDeepLabV3PlusHead):
                for conv in _convolutions(module.classifier):
                    init.kaiming_normal_(conv.weight)


def _convolutions(module: nn.Module) -> Iterator[nn.Conv2d]:
    return (sub for sub in module.modules() if isinstance(sub, nn.Conv2d))


class HMSForSemanticSegmentation(HMSPreTrainedModel):
    """
    HMSA segmentation model: a trunk + decoder (`backbone`, `decode_head`) run at several scales, a
    `scale_attention_head` per scale, and the hierarchical attention chain fusing them.

    In training mode it runs `config.training_scales` (or the `scales` of the call); in eval mode it chains over
    `scales` or `config.inference_scales`. Any list of positive scales is accepted; the fused logits always have the
    input's resolution.
    """

    # The loss is a mean over the batch's pixels (RMI is no sum over items that `num_items_in_batch` could normalise):
    # `Trainer` must divide it by the gradient-accumulation steps. Left to its default, it would see `**kwargs` in
    # `forward`, take the loss as normalised by `num_items_in_batch`, and sum the micro-batches' gradients instead.
    accepts_loss_kwargs = False

    def __init__(self, config: HMSConfig):
        super().__init__(config)
        eps = config.batch_norm_eps
        if config.trunk == "hrnet_ocr":
            self.backbone = HMSHRNetBackbone(config.hrnet_stages, config.hrnet_stem_channels, eps, config.align_corners)
            self.decode_head = HMSObjectContextHead(
                self.backbone.out_channels,
                config.ocr_mid_channels,
                config.ocr_key_channels,
                config.num_labels,
                config.ocr_dropout,
                eps,
            )
            attention_in_channels = config.ocr_mid_channels
        else:
            self.backbone = self._build_deeplab_trunk(config)
            self.decode_head = HMSDeepLabV3PlusHead(
                self.backbone.low_level_channels,
                self.backbone.out_channels,
                config.aspp_channels,
                config.aspp_dilations,
                config.decoder_aspp_channels,
                config.decoder_fine_channels,
                config.segmentation_head_channels,
                config.num_labels,
                eps,
                config.align_corners,
            )
            attention_in_channels = self.decode_head.out_channels
        self.scale_attention_head = HMSScaleAttentionHead(
            attention_in_channels,
            config.attention_bottleneck_channels,
            config.attention_inner_3x3,
            config.attention_dropout,
            eps,
        )
        self.post_init()

    @staticmethod
    def _build_deeplab_trunk(
        config: HMSConfig,
    ) -> HMSDilatedResNetBackbone | HMSMobileNetV2Backbone | HMSTransformersBackbone:
        """The trunk under the DeepLabV3+ decoder: each returns (stride-4 features, deep features)."""
        if config.trunk == "resnet50_deeplabv3plus":
            return HMSDilatedResNetBackbone(config.resnet_layers, config.batch_norm_eps)
        if config.trunk == "mobilenetv2_deeplabv3plus":
            return HMSMobileNetV2Backbone(
                config.mobilenet_width_multiplier, config.mobilenet_output_stride, config.batch_norm_eps
            )
        if config.use_pretrained_backbone:
            trunk = HMSTransformersBackbone(config.backbone_config, pretrained=config.backbone)
            config.use_pretrained_backbone = False  # the weights now live in this model's checkpoints
            return trunk
        return HMSTransformersBackbone(config.backbone_config)

    def segment_single_scale(
        self, pixel_values: torch.Tensor, keep_auxiliary: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """
        One forward of trunk, decoder and attention head on `pixel_values` (batch, 3, h, w), with no scaling.

        Returns `logits` (batch, num_labels, h, w), `auxiliary_logits` (same; `None` for trunks without them or
        with `keep_auxiliary=False`, which skips their resize), `attention` (batch, 1, h, w) and the trunk's output
        features, all outputs resized to the input's (h, w).
        """
        if self.config.trunk == "hrnet_ocr":
            features = self.backbone(pixel_values)
            logits, auxiliary_logits, attention_features = self.decode_head(features)
        else:
            low_level_features, features = self.backbone(pixel_values)
            logits, auxiliary_logits, attention_features = self.decode_head(low_level_features, features)
        attention = self.scale_attention_head(attention_features)
        logits = resize_as(logits, pixel_values, self.config.align_corners)
        attention = resize_as(attention, pixel_values, self.config.align_corners)
        if auxiliary_logits is not None:
            auxiliary_logits = (
                resize_as(auxiliary_logits, pixel_values, self.config.align_corners) if keep_auxiliary else None
            )
        return logits, auxiliary_logits, attention, features

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        scales: list[float] | tuple[float, ...] | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        tile_pixel_budget: int | None = None,
        tile_size: int | tuple[int, int] | None = None,
        tile_overlap: int | None = None,
        output_auxiliary_logits: bool | None = None,
        **kwargs,
    ) -> HMSSemanticSegmenterOutput | tuple:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, 3, height, width)`):
                Normalised images (see [`HMSImageProcessor`]).
            labels (`torch.LongTensor` of shape `(batch_size, height, width)`, *optional*):
                Ground-truth class indices, `config.ignore_index` for pixels to skip. When given, `loss` is computed
                on the scales of this call (in eval mode too).
            scales (`list[float]`, *optional*):
                Scales to run and fuse, any order, each positive. Defaults to `config.training_scales` in training
                mode and `config.inference_scales` in eval mode.
            output_attentions (`bool`, *optional*):
                Return each scale's attention map and logits, at that scale's resolution; a scale above 1 that runs as
                tiles returns them at the reduced resolution it was blended at (see `tile_pixel_budget`).
            output_hidden_states (`bool`, *optional*):
                Return each scale's trunk features. Not available for a scale that runs as tiles (a `ValueError` says
                so before anything runs): raise `tile_pixel_budget` or leave tiling off to get them.
            return_dict (`bool`, *optional*):
                Return an [`HMSSemanticSegmenterOutput`] (the default), or with `False` the plain tuple of its
                non-`None` fields in field order (`loss`, `logits`, `hidden_states`, `attentions`, `auxiliary_logits`,
                `scale_logits`, `scales`, `loss_terms`): its `to_tuple()`.
            tile_pixel_budget (`int`, *optional*):
                Tiled inference (eval mode only; training mode never tiles): a scale whose resized input has more than
                this many pixels per image runs as overlapping tiles whose logits, auxiliary logits and attention are
                blended with a smooth window (see `segment_in_tiles`); the attention chain then goes on as usual.
                A tiled scale above 1 is blended directly at the resolution where the chain consumes it (the next
                lower scale >= 1 that keeps its own resolution, else the input's; the input's for the `scale_fusion`
                baselines), so peak memory follows the tile size, not that scale's size. With a single tile that is
                exactly the untiled result; without a scale in [1, s) below a tiled scale `s`, the steps of scales
                below 1 then run at the input's resolution rather than at scale `s`'s (a small approximation).
                Defaults to `config.tile_pixel_budget` (`None`: never tile). Must be at least one tile's pixels.
            tile_size (`int` or `(int, int)`, *optional*):
                Tile side or (height, width) in pixels of the resized input; defaults to `config.tile_size`.
            tile_overlap (`int`, *optional*):
                Pixels shared by neighbouring tiles; defaults to `config.tile_overlap`.
            output_auxiliary_logits (`bool`, *optional*):
                Fuse and return the OCR trunk's auxiliary logits without `labels` too (with `labels` they are always
                fused: the auxiliary loss needs them). Defaults to `config.output_auxiliary_logits`.
            kwargs:
                Only the image processor's `pixel_mask` and `original_sizes` (ignored, so that `model(**inputs)`
                works); any other keyword is refused with a `TypeError`.
        """
        unknown = sorted(set(kwargs) - set(PROCESSOR_ONLY_INPUTS))
        if unknown:  # a misspelt `scale=` or `output_attention=` would otherwise run with the defaults, silently
            raise TypeError(
                f"HMSForSemanticSegmentation.forward() got unexpected keyword arguments {unknown}; it takes "
                "pixel_values, labels, scales, output_attentions, output_hidden_states, return_dict, "
                "tile_pixel_budget, tile_size, tile_overlap, output_auxiliary_logits "
                f"(and ignores {', '.join(PROCESSOR_ONLY_INPUTS)})"
            )
        if pixel_values.dim() != 4 or pixel_values.shape[1] != 3:
            raise ValueError(
                f"pixel_values must have shape (batch_size, 3, height, width), got {tuple(pixel_values.shape)}"
            )
        if not pixel_values.is_floating_point():
            # the cast below would take raw 0..255 image bytes for normalised values and answer with garbage
            raise ValueError(
                f"pixel_values must be a floating-point tensor of normalised images (see HMSImageProcessor), got dtype "
                f"{pixel_values.dtype}: normalise 8-bit images first (ImageNet mean/std after scaling to [0, 1])"
            )
        # as transformers' vision models: the input follows the weights (a model cast to half, e.g. by the Trainer's
        # --fp16_full_eval / --bf16_full_eval, gets float32 pixels from its image processor)
        pixel_values = pixel_values.to(self.dtype)
        if scales is None:
            scales = self.config.training_scales if self.training else self.config.inference_scales
        scales = sorted(validate_scales(scales), reverse=True)
        output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if labels is not None:
            _check_labels(labels, pixel_values, self.config.num_labels, self.config.ignore_index)
        if output_auxiliary_logits is None:
            output_auxiliary_logits = self.config.output_auxiliary_logits
        segment = functools.partial(
            self.segment_single_scale, keep_auxiliary=output_auxiliary_logits or labels is not None
        )
        keep_scale_logits = output_attentions or (labels is not None and self.config.supervised_scale_weight > 0)
        unused = [] if self.training else settings_without_effect(
            tile_pixel_budget, self.config.tile_pixel_budget, tile_size, tile_overlap
        )
        if unused:
            raise ValueError(f"{unused[0]} has no effect: tiling is off (tile_pixel_budget is None in the call and "
                             "in config); pass tile_pixel_budget, the pixels above which a scale runs as tiles")
        tiling = None if self.training else tiling_settings(
            self.config.tile_pixel_budget if tile_pixel_budget is None else tile_pixel_budget,
            self.config.tile_size if tile_size is None else tile_size,
            self.config.tile_overlap if tile_overlap is None else tile_overlap,
        )
        tiled_scales = set() if tiling is None else {
            scale for scale in scales if tiling.applies_to(*_scaled_size(pixel_values.shape[-2:], scale))
        }
        if tiled_scales and output_hidden_states:
            raise ValueError(
                f"output_hidden_states is not available for scales run as tiles ({sorted(tiled_scales)} exceed "
                f"tile_pixel_budget={tiling.pixel_budget:,} pixels); raise tile_pixel_budget or pass "
                "output_hidden_states=False"
            )
        tiled_output_sizes = {
            scale: _tiled_output_size(scale, scales, tiled_scales, pixel_values.shape[-2:], self.config.scale_fusion)
            for scale in tiled_scales
        }

        scale_logits: dict[float, torch.Tensor] = {}
        scale_attentions: dict[float, torch.Tensor] = {}
        scale_features: dict[float, torch.Tensor] = {}

        def run_scales() -> Iterator[tuple[float, tuple[torch.Tensor, ...], torch.Tensor]]:
            for scale in scales:
                scaled_pixel_values = resize_to_scale(pixel_values, scale, self.config.align_corners)
                if scale in tiled_scales:
                    logits, auxiliary_logits, attention = segment_in_tiles(
                        segment,
                        scaled_pixel_values,
                        tiling.tile_size,
                        tiling.tile_overlap,
                        output_size=tiled_output_sizes[scale],
                        align_corners=self.config.align_corners,
                    )
                    features = None
                else:
                    logits, auxiliary_logits, attention, features = segment(scaled_pixel_values)
                del scaled_pixel_values
                if keep_scale_logits:
                    scale_logits[scale] = logits
                if output_attentions:
                    scale_attentions[scale] = attention
                if output_hidden_states:
                    scale_features[scale] = features
                predictions = (logits,) if auxiliary_logits is None else (logits, auxiliary_logits)
                yield scale, predictions, attention

        if self.config.scale_fusion == "hierarchical":
            fused = hierarchical_scale_fusion(
                run_scales(), self.config.align_corners, may_overwrite_inputs=not keep_scale_logits
            )
        elif self.config.scale_fusion == "explicit":
            fused = explicit_scale_attention_fusion(run_scales(), pixel_values.shape[-2:], self.config.align_corners)
        else:
            fused = pooled_scale_fusion(
                run_scales(), pixel_values.shape[-2:], self.config.scale_fusion, self.config.align_corners
            )
        # The reference's output has the resolution of scale 1.0; without 1.0 in the list we still answer at the input's.
        fused = tuple(resize_as(prediction, pixel_values, self.config.align_corners) for prediction in fused)
        logits = fused[0]
        auxiliary_logits = fused[1] if len(fused) > 1 else None

        loss, loss_terms = None, None
        if labels is not None:
            loss, loss_terms = self.compute_loss(logits, auxiliary_logits, scale_logits, labels)

        ascending = tuple(sorted(scales))
        attentions = tuple(scale_attentions[s] for s in ascending) if output_attentions else None
        hidden_states = tuple(scale_features[s] for s in ascending) if output_hidden_states else None
        per_scale_logits = tuple(scale_logits[s] for s in ascending) if output_attentions else None
        output = HMSSemanticSegmenterOutput(
            loss=loss,
            logits=logits,
            hidden_states=hidden_states,
            attentions=attentions,
            auxiliary_logits=auxiliary_logits,
            scale_logits=per_scale_logits,
            scales=ascending if (output_attentions or output_hidden_states) else None,
            loss_terms=loss_terms,
        )
        # the plain tuple holds what the output object holds, in its field order (transformers' `to_tuple()` rule)
        return output if return_dict else output.to_tuple()

    def compute_loss(
        self,
        logits: torch.Tensor,
        auxiliary_logits: torch.Tensor | None,
        scale_logits: dict[float, torch.Tensor],
        labels: torch.Tensor,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """
        The HMSA objective of the reference recipe:
        `primary(fused) + ocr_aux_weight * L(fused auxiliary) + supervised_scale_weight * sum_s L(resized p_s)`.

        `primary` is RMI (sigmoid BCE + region mutual information) or cross-entropy; the auxiliary term uses RMI only
        with `config.ocr_aux_rmi`, the per-scale terms never do. Every prediction is resized to the labels' size.
        """
        config = self.config
        criterion = self._criterion()
        labels = labels.long()  # cross-entropy wants int64; uint8/int32 label maps are common
        # The sum over the labelled pixels divided by their count is the mean (bit for bit on CPU), except that a
        # batch whose pixels are all ignored gives 0 instead of 0 / 0 = NaN, which would stop or skip the step.
        labelled_pixels = (labels != config.ignore_index).sum().clamp(min=1) if criterion is None else None

        def term(prediction: torch.Tensor, use_rmi: bool) -> torch.Tensor:
            prediction = prediction if prediction.shape[-2:] == labels.shape[-2:] else F.interpolate(
                prediction, size=labels.shape[-2:], mode="bilinear", align_corners=config.align_corners
            )
            if criterion is None:
                total = F.cross_entropy(prediction.float(), labels, ignore_index=config.ignore_index, reduction="sum")
                return total / labelled_pixels
            return criterion(prediction, labels, do_rmi=use_rmi)

        terms = {"main": term(logits, use_rmi=True)}
        loss = terms["main"]
        if auxiliary_logits is not None and config.ocr_aux_weight > 0:
            terms["auxiliary"] = term(auxiliary_logits, use_rmi=config.ocr_aux_rmi)
            loss = config.ocr_aux_weight * terms["auxiliary"] + loss
        if config.supervised_scale_weight > 0:
            for scale in sorted(scale_logits):
                terms[f"scale_{scale}"] = term(scale_logits[scale], use_rmi=False)
                loss = loss + config.supervised_scale_weight * terms[f"scale_{scale}"]
        return loss, terms

    def _criterion(self) -> RMILoss | None:
        config = self.config
        if config.primary_loss != "rmi":
            return None
        return RMILoss(
            num_classes=config.num_labels,
            ignore_index=config.ignore_index,
            rmi_radius=config.rmi_radius,
            rmi_pool_way=config.rmi_pool_way,
            rmi_pool_size=config.rmi_pool_size,
            rmi_pool_stride=config.rmi_pool_stride,
            loss_weight_lambda=config.rmi_loss_weight_lambda,
            lambda_way=config.rmi_lambda_way,
        )


def _tiled_output_size(
    scale: float, scales: list[float], tiled_scales: set[float], size: tuple[int, int], scale_fusion: str
) -> tuple[int, int]:
    """
    (height, width) at which a tiled `scale` (input of `size`) blends its maps: where the fusion first consumes them.

    A scale <= 1 keeps its own size. Above 1, the hierarchical chain only uses a scale after `down(fused)` to the
    next lower scale >= 1, so the maps go straight to the size of the next lower scale >= 1 that keeps its own size
    (1.0 itself, or a scale that is not tiled; a tiled one in between is itself reduced further); with none, to the
    input's size, where the chain's answer ends. The baselines fuse every scale at the input's size.
    """
    if scale <= 1.0:
        return _scaled_size(size, scale)
    if scale_fusion == "hierarchical":
        for lower in sorted((s for s in scales if 1.0 <= s < scale), reverse=True):
            if lower == 1.0 or lower not in tiled_scales:
                return _scaled_size(size, lower)
    return tuple(size)


def _check_labels(labels: torch.Tensor, pixel_values: torch.Tensor, num_labels: int, ignore_index: int) -> None:
    if labels.dim() != 3 or labels.shape[0] != pixel_values.shape[0]:
        raise ValueError(
            f"labels must have shape (batch_size, height, width) with batch_size {pixel_values.shape[0]}, "
            f"got {tuple(labels.shape)}"
        )
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must hold integer class indices, got dtype {labels.dtype}")
    # RMI would silently ignore such pixels and cross-entropy fail inside its kernel (a device-side assert on GPUs);
    # usually raw dataset ids (Cityscapes labelIds 0..33) fed to a model of training ids, or a wrong num_labels
    outside = (labels != ignore_index) & ((labels < 0) | (labels >= num_labels))
    if torch.compiler.is_compiling():
        # `if outside.any()` would split the compiled graph at a data-dependent branch; the assertion stays in it
        torch._assert_async(
            ~outside.any(),
            f"labels must be class ids in [0, {num_labels}) (num_labels) or ignore_index {ignore_index}: are they raw "
            "dataset ids rather than training ids, or is num_labels not the dataset's?",
        )
        return
    if outside.any():
        found = torch.unique(labels[outside]).tolist()
        raise ValueError(
            f"labels must be class ids in [0, {num_labels}) (num_labels) or ignore_index {ignore_index}, found "
            f"{found[:10]}{' ...' if len(found) > 10 else ''}: are they raw dataset ids rather than training ids, or "
            "is num_labels not the dataset's?"
        )
