"""hms-segmentation: Hierarchical Multi-Scale Attention for semantic segmentation, the transformers way."""

from transformers import AutoConfig, AutoImageProcessor, AutoModelForSemanticSegmentation
from transformers.models.auto.video_processing_auto import AutoVideoProcessor

from .configuration_hms import MODEL_PRESETS, HMSConfig
from .image_processing_hms import HMSImageProcessor
from .modeling_hms import (
    HMSForSemanticSegmentation,
    HMSPreTrainedModel,
    HMSScaleAttentionHead,
    HMSSemanticSegmenterOutput,
    hierarchical_scale_fusion,
    hierarchical_scale_weights,
)
from .rmi_loss import RMILoss

__version__ = "0.1.0"

# After `import hms_segmentation`, the Auto classes resolve `model_type="hms"`.
AutoConfig.register("hms", HMSConfig, exist_ok=True)
AutoModelForSemanticSegmentation.register(HMSConfig, HMSForSemanticSegmentation, exist_ok=True)
AutoImageProcessor.register(HMSConfig, image_processor_classes={"pil": HMSImageProcessor}, exist_ok=True)
# HMS has no video processor. Saying so keeps `pipeline(...)` from guessing one from our image processor's `auto_map`
# and prompting the user to run remote code for it (imported from its module: the top-level name is a placeholder
# that refuses to work without torchvision, while pipelines use the real one).
AutoVideoProcessor.register(HMSConfig, video_processor_classes={}, exist_ok=True)
# `save_pretrained` then also writes our flat modules next to the weights, with an `auto_map`, so that
# `trust_remote_code=True` loads a saved folder (or Hub repo) where this package is not installed.
HMSConfig.register_for_auto_class("AutoConfig")
HMSForSemanticSegmentation.register_for_auto_class("AutoModelForSemanticSegmentation")
HMSImageProcessor.register_for_auto_class("AutoImageProcessor")

__all__ = [
    "MODEL_PRESETS",
    "HMSConfig",
    "HMSForSemanticSegmentation",
    "HMSImageProcessor",
    "HMSPreTrainedModel",
    "HMSScaleAttentionHead",
    "HMSSemanticSegmenterOutput",
    "RMILoss",
    "hierarchical_scale_fusion",
    "hierarchical_scale_weights",
]
