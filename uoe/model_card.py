"""Fill the model-card template (`model_cards/uoe_causal_lm.md`) with a training run's real figures.

The card's YAML front matter carries the Hub metadata (`library_name`, `pipeline_tag`, tags, metrics, the
architecture as `base_config` and, for training data that is a Hub dataset, `datasets` and a `model-index` entry
with the validation perplexity);
the body is rendered by Jinja2 from the template. Not imported by the model code, so checkpoints do not
carry it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.utils import validate_repo_id

from .configuration_uoe import UoEConfig

# In a source checkout the template sits next to the package; pass `template_path` elsewhere.
DEFAULT_TEMPLATE = Path(__file__).resolve().parents[1] / "model_cards" / "uoe_causal_lm.md"

BASE_CONFIG_FIELDS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "head_dim",
    "attention_top_k",
    "intermediate_size",
    "num_mlp_experts",
    "mlp_top_k",
    "layer_attention_top_k",
    "layer_mlp_top_k",
    "num_shared_attention_groups",
    "num_shared_mlp_experts",
    "mlp_chain_length",
    "mlp_type",
    "routing_patch_size",
    "gate_mode",
    "router_score_func",
    "router_aux_loss_coef",
    "max_position_embeddings",
    "num_layer_groups",
    "router_balance_loss",
    "norm_placement",
)

# Figures the template reads; `write_model_card` refuses to render a card with any of them missing.
REQUIRED_RESULTS = (
    "validation_perplexity",
    "unigram_perplexity",
    "validation_token_loss",
    "train_loss",
    "num_parameters",
    "active_flops_per_token",
    "dense_flops_per_token",
    "global_step",
    "train_tokens",
    "train_tokens_per_second",
    "train_runtime_s",
    "block_size",
    "world_size",
    "global_batch_size",
    "tokenizer_vocab_size",
    "hardware",
)


def base_config(config: UoEConfig) -> dict[str, Any]:
    """The architecture fields worth showing on a card, as plain YAML-safe values."""
    return {name: getattr(config, name) for name in BASE_CONFIG_FIELDS}


def check_dataset_id(dataset_id: str) -> None:
    """Raise a `ValueError` naming `dataset_id` unless it has the form of a Hub ID (`name` or `namespace/name`)."""
    try:
        validate_repo_id(dataset_id)
    except ValueError as error:
        raise ValueError(
            f"`dataset_id` must be a Hub dataset ID (`namespace/name`), got {dataset_id!r}: {error}"
        ) from error


def model_card_data(
    config: UoEConfig,
    results: Mapping[str, Any],
    *,
    model_name: str,
    dataset_id: str | None = None,
    base_model: str | None = None,
    license: str = "apache-2.0",
    tags: tuple[str, ...] = (),
) -> ModelCardData:
    """Hub metadata of a UoE causal LM card.

    `dataset_id` is the Hub ID of the training data. With it, the metadata lists it under `datasets` and carries
    the validation perplexity as a `model-index` result; without it (local text files) both are left out, as
    transformers' `Trainer` does, since each must name a dataset on the Hub.
    """
    eval_results = None
    if dataset_id is not None:
        check_dataset_id(dataset_id)
        eval_results = [
            EvalResult(
                task_type="text-generation",
                task_name="Causal language modeling",
                dataset_type=dataset_id,
                dataset_name=dataset_id,
                dataset_split="validation",
                metric_type="perplexity",
                metric_name="Validation perplexity",
                metric_value=round(float(results["validation_perplexity"]), 3),
            )
        ]
    return ModelCardData(
        library_name="transformers",
        pipeline_tag="text-generation",
        license=license,
        tags=["uoe", "union-of-experts", "mixture-of-experts", "causal-lm", "text-generation", *tags],
        datasets=None if dataset_id is None else [dataset_id],
        metrics=["perplexity"],
        base_model=base_model,
        model_name=model_name,
        eval_results=eval_results,
        base_config=base_config(config),
    )


def write_model_card(
    output_dir: str | Path,
    config: UoEConfig,
    results: Mapping[str, Any],
    *,
    model_name: str,
    dataset_description: str,
    dataset_id: str | None = None,
    model_id: str | None = None,
    base_model: str | None = None,
    command: str = "",
    sample: str = "",
    sample_prompt: str = "",
    template_path: str | Path | None = None,
) -> ModelCard:
    """Render the template with `results` (see `REQUIRED_RESULTS`) and save it as `output_dir/README.md`.

    `dataset_description` describes the training data in the card's text; `dataset_id` is its Hub ID, only for
    data that is a Hub dataset (see `model_card_data`)."""
    missing = [key for key in REQUIRED_RESULTS if key not in results]
    if missing:
        raise ValueError(f"`results` lacks the figures {missing} that the model card shows.")
    template_path = Path(template_path or DEFAULT_TEMPLATE)
    if not template_path.is_file():
        raise FileNotFoundError(f"Model-card template not found at {template_path}; pass `template_path`.")
    card = ModelCard.from_template(
        model_card_data(config, results, model_name=model_name, dataset_id=dataset_id, base_model=base_model),
        template_path=str(template_path),
        model_name=model_name,
        model_id=model_id or model_name,
        dataset_description=dataset_description,
        config=config,
        base_config=base_config(config),
        results=dict(results),
        command=command,
        sample=sample,
        sample_prompt=sample_prompt,
    )
    card.save(Path(output_dir) / "README.md")
    return card
