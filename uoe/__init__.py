"""Union of Experts (UoE) as a native Hugging Face Transformers model."""

import os

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    PreTrainedModel,
)
from transformers.utils import is_vision_available

from .callbacks import UoERouterStatsCallback
from .configuration_mowst import MowstConfig
from .configuration_uoe import UoEConfig
from .flops import FlopsEstimate, estimate_flops_per_token
from .merging import MergePlan, collect_expert_statistics, compress_experts, drop_experts, merge_experts
from .modeling_mowst import MowstForImageClassification, MowstImageClassifierOutput
from .modeling_uoe import (
    UoECacheLayer,
    UoEForCausalLM,
    UoEForQuestionAnswering,
    UoEForSequenceClassification,
    UoEForTokenClassification,
    UoEModel,
    UoEPreTrainedModel,
)
from .modeling_uoe_vision import UoEForImageClassification, UoEImageClassifierOutput, UoEVisionModel
from .selective_attention import ALL_SELECTIVE_ATTENTION_FUNCTIONS, SelectiveAttentionInterface
from .sparsify import SparsifyReport, retention_report, sparsify

# The image processor needs Pillow (transformers' "vision" extra); the models do not.
if is_vision_available():
    from .image_processing_uoe import UoEImageProcessor

__version__ = "0.1.0"


class UoEBaseModelSelector:
    """`AutoModel`'s entry for `UoEConfig`, which both model families share: the base model of the config's family,
    `UoEModel` (the decoder) for a causal config and `UoEVisionModel` (the image encoder) for a bidirectional one.

    transformers picks among several base models of one config only by the class names in `config.architectures`,
    which name the head (`UoEForImageClassification`), so it would build the decoder for an image checkpoint.
    """

    config_class = UoEConfig

    @staticmethod
    def model_class(config: UoEConfig) -> type[PreTrainedModel]:
        return UoEModel if config.is_causal else UoEVisionModel

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, *model_args, config: UoEConfig, **kwargs
    ) -> PreTrainedModel:
        return cls.model_class(config).from_pretrained(
            pretrained_model_name_or_path, *model_args, config=config, **kwargs
        )

    @classmethod
    def _from_config(cls, config: UoEConfig, **kwargs) -> PreTrainedModel:
        return cls.model_class(config)._from_config(config, **kwargs)


AutoConfig.register(UoEConfig.model_type, UoEConfig, exist_ok=True)
AutoModel.register(UoEConfig, UoEBaseModelSelector, exist_ok=True)
AutoModelForCausalLM.register(UoEConfig, UoEForCausalLM, exist_ok=True)
AutoModelForImageClassification.register(UoEConfig, UoEForImageClassification, exist_ok=True)
AutoModelForSequenceClassification.register(UoEConfig, UoEForSequenceClassification, exist_ok=True)
AutoModelForTokenClassification.register(UoEConfig, UoEForTokenClassification, exist_ok=True)
AutoModelForQuestionAnswering.register(UoEConfig, UoEForQuestionAnswering, exist_ok=True)
AutoConfig.register(MowstConfig.model_type, MowstConfig, exist_ok=True)
AutoModelForImageClassification.register(MowstConfig, MowstForImageClassification, exist_ok=True)

# `save_pretrained` then writes `auto_map` and copies the code files, so checkpoints load with
# `trust_remote_code=True` where this package is not installed.
UoEConfig.register_for_auto_class()
UoEModel.register_for_auto_class("AutoModel")
UoEVisionModel.register_for_auto_class("AutoModel")
UoEForCausalLM.register_for_auto_class("AutoModelForCausalLM")
UoEForImageClassification.register_for_auto_class("AutoModelForImageClassification")
UoEForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")
UoEForTokenClassification.register_for_auto_class("AutoModelForTokenClassification")
UoEForQuestionAnswering.register_for_auto_class("AutoModelForQuestionAnswering")
MowstConfig.register_for_auto_class()
MowstForImageClassification.register_for_auto_class("AutoModelForImageClassification")

__all__ = [
    "ALL_SELECTIVE_ATTENTION_FUNCTIONS",
    "FlopsEstimate",
    "SelectiveAttentionInterface",
    "MergePlan",
    "MowstConfig",
    "MowstForImageClassification",
    "MowstImageClassifierOutput",
    "UoECacheLayer",
    "UoEConfig",
    "UoEForCausalLM",
    "UoEForImageClassification",
    "UoEForQuestionAnswering",
    "UoEForSequenceClassification",
    "UoEForTokenClassification",
    "UoEImageClassifierOutput",
    "UoEModel",
    "UoEPreTrainedModel",
    "UoERouterStatsCallback",
    "SparsifyReport",
    "UoEVisionModel",
    "DistillationTrainer",
    "collect_expert_statistics",
    "compress_experts",
    "distillation_loss",
    "drop_experts",
    "estimate_flops_per_token",
    "merge_experts",
    "retention_report",
    "sparsify",
]

if is_vision_available():
    AutoImageProcessor.register(UoEConfig, image_processor_classes={"pil": UoEImageProcessor}, exist_ok=True)
    UoEImageProcessor.register_for_auto_class("AutoImageProcessor")
    __all__ += ["UoEImageProcessor"]

# `uoe.distillation` imports `transformers.Trainer` (and through it accelerate): loaded on first use only.
_LAZY_ATTRIBUTES = {"DistillationTrainer": "distillation", "distillation_loss": "distillation"}


def __getattr__(name: str):
    if name in _LAZY_ATTRIBUTES:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY_ATTRIBUTES[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# Pipelines try `AutoVideoProcessor` for every image model (through `transformers.models.auto.video_processing_auto`,
# which, unlike `transformers.AutoVideoProcessor`, works without torchvision). It turns the image processor's `auto_map`
# entry `image_processing_uoe.UoEImageProcessor` into a remote `image_processing_uoe.UoEVideoProcessor` and, finding no
# local video processor for `UoEConfig`, asks whether to run custom code when `trust_remote_code` is unset. Registering
# an empty set of video processors says that the local code is complete: UoE has none, and the lookup fails without
# asking (pipelines then go on without a video processor).
if is_vision_available():
    from transformers.models.auto.video_processing_auto import AutoVideoProcessor

    AutoVideoProcessor.register(UoEConfig, video_processor_classes={}, exist_ok=True)
