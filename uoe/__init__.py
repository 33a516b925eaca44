"""Union of Experts (UoE) as a native Hugging Face Transformers model."""

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageClassification,
)
from transformers.utils import is_vision_available

from .callbacks import UoERouterStatsCallback
from .configuration_uoe import UoEConfig
from .flops import FlopsEstimate, estimate_flops_per_token
from .modeling_uoe import UoECacheLayer, UoEForCausalLM, UoEModel, UoEPreTrainedModel
from .modeling_uoe_vision import UoEForImageClassification, UoEImageClassifierOutput, UoEVisionModel

# The image processor needs Pillow (transformers' "vision" extra); the models do not.
if is_vision_available():
    from .image_processing_uoe import UoEImageProcessor

__version__ = "0.1.0"

AutoConfig.register(UoEConfig.model_type, UoEConfig, exist_ok=True)
AutoModel.register(UoEConfig, UoEModel, exist_ok=True)
AutoModelForCausalLM.register(UoEConfig, UoEForCausalLM, exist_ok=True)
AutoModelForImageClassification.register(UoEConfig, UoEForImageClassification, exist_ok=True)

# `save_pretrained` then writes `auto_map` and copies the code files, so checkpoints load with
# `trust_remote_code=True` where this package is not installed.
UoEConfig.register_for_auto_class()
UoEModel.register_for_auto_class("AutoModel")
UoEForCausalLM.register_for_auto_class("AutoModelForCausalLM")
UoEForImageClassification.register_for_auto_class("AutoModelForImageClassification")

__all__ = [
    "FlopsEstimate",
    "UoECacheLayer",
    "UoEConfig",
    "UoEForCausalLM",
    "UoEForImageClassification",
    "UoEImageClassifierOutput",
    "UoEModel",
    "UoEPreTrainedModel",
    "UoERouterStatsCallback",
    "UoEVisionModel",
    "estimate_flops_per_token",
]

if is_vision_available():
    AutoImageProcessor.register(UoEConfig, image_processor_classes={"pil": UoEImageProcessor}, exist_ok=True)
    UoEImageProcessor.register_for_auto_class("AutoImageProcessor")
    __all__ += ["UoEImageProcessor"]
