"""Union of Experts (UoE) as a native Hugging Face Transformers model."""

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageClassification,
)

from .callbacks import UoERouterStatsCallback
from .configuration_uoe import UoEConfig
from .flops import FlopsEstimate, estimate_flops_per_token
from .image_processing_uoe import UoEImageProcessor
from .modeling_uoe import UoECacheLayer, UoEForCausalLM, UoEModel, UoEPreTrainedModel
from .modeling_uoe_vision import UoEForImageClassification, UoEImageClassifierOutput, UoEVisionModel

__version__ = "0.1.0"

AutoConfig.register(UoEConfig.model_type, UoEConfig, exist_ok=True)
AutoModel.register(UoEConfig, UoEModel, exist_ok=True)
AutoModelForCausalLM.register(UoEConfig, UoEForCausalLM, exist_ok=True)
AutoModelForImageClassification.register(UoEConfig, UoEForImageClassification, exist_ok=True)
AutoImageProcessor.register(UoEConfig, image_processor_classes={"pil": UoEImageProcessor}, exist_ok=True)

# `save_pretrained` then writes `auto_map` and copies the code files, so checkpoints load with
# `trust_remote_code=True` where this package is not installed.
UoEConfig.register_for_auto_class()
UoEModel.register_for_auto_class("AutoModel")
UoEForCausalLM.register_for_auto_class("AutoModelForCausalLM")
UoEForImageClassification.register_for_auto_class("AutoModelForImageClassification")
UoEImageProcessor.register_for_auto_class("AutoImageProcessor")

__all__ = [
    "FlopsEstimate",
    "UoECacheLayer",
    "UoEConfig",
    "UoEForCausalLM",
    "UoEForImageClassification",
    "UoEImageClassifierOutput",
    "UoEImageProcessor",
    "UoEModel",
    "UoEPreTrainedModel",
    "UoERouterStatsCallback",
    "UoEVisionModel",
    "estimate_flops_per_token",
]
