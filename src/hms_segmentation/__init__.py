"""hms-segmentation: Hierarchical Multi-Scale Attention for semantic segmentation, the transformers way."""

from transformers import AutoConfig, AutoModelForSemanticSegmentation

from .configuration_hms import MODEL_PRESETS, HMSConfig
from .modeling_hms import (
    HMSForSemanticSegmentation,
    HMSPreTrainedModel,
    HMSScaleAttentionHead,
    HMSSemanticSegmenterOutput,
    hierarchical_scale_fusion,
)
from .rmi_loss import RMILoss

__version__ = "0.1.0"

# After `import hms_segmentation`, the Auto classes resolve `model_type="hms"`.
AutoConfig.register("hms", HMSConfig, exist_ok=True)
AutoModelForSemanticSegmentation.register(HMSConfig, HMSForSemanticSegmentation, exist_ok=True)

__all__ = [
    "MODEL_PRESETS",
    "HMSConfig",
    "HMSForSemanticSegmentation",
    "HMSPreTrainedModel",
    "HMSScaleAttentionHead",
    "HMSSemanticSegmenterOutput",
    "RMILoss",
    "hierarchical_scale_fusion",
]
