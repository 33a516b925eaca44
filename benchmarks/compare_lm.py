#!/usr/bin/env python
"""UoE against transformers' own language models on the same data, budget and seeds (issue 6, LM half).

    .venv/bin/python benchmarks/compare_lm.py --quick     # tiny models, a few minutes on 2 CPU cores
    .venv/bin/python benchmarks/compare_lm.py --from_json benchmarks/results/compare_lm.json  # re-report
    .venv/bin/python benchmarks/compare_lm.py             # the full CPU comparison (15 minutes on 2 idle cores)

Models: dense `LlamaForCausalLM`, `MixtralForCausalLM` (top-2), `DeepseekV3ForCausalLM`, `Qwen3MoeForCausalLM`
and `UoEForCausalLM` with `gate_mode="union"` and `"weighted"`. Every model is built from a config (nothing comes
from a hub) and trained from scratch by the same loop below.

Same for every model: the data (the Shakespeare corpus of `uoe.data`, the last two works held out for validation),
one byte-level BPE tokenizer trained once on the training text, fixed blocks of `seq_len` tokens, the batch order
of a seed, the initialisation seed, AdamW (betas 0.9/0.95, weight decay on matrices only), linear warmup + cosine
decay, gradient clipping at 1.0, the token budget, float32, SDPA attention, `torch.get_num_threads()` threads.

Matching rule (sizes in `Setup`):
- every model has the same vocabulary, width `hidden_size`, depth, number of attention heads (no grouped-query
  attention: one key/value head per query head, as UoE's SMHA needs), sequence length and untied embeddings;
- `llama` is the dense model with `intermediate_size` equal to UoE's dense MLP width, i.e. UoE at full routing
  (`from_dense(llama)` is lossless; the analytic FLOPs of the two agree up to UoE's routers);
- UoE: SMHA selects `attention_top_k` of the heads, UoME splits the MLP into `num_experts` slices and selects
  `top_k` of them;
- `mixtral`, `qwen3_moe` and `deepseek_v3` use the same number of routed experts and top-k as UoE's MLP, and their
  per-expert width is solved so that their total parameter count equals UoE's as closely as an integer width
  allows (parameters are counted on the meta device; they are linear in the width);
- `deepseek_v3` keeps its architecture at a small scale: multi-head latent attention (query rank H/2, key/value
  rank H/4, query/key head = head_dim (no RoPE) + head_dim/2 (RoPE), value head = head_dim, DeepSeek-V3's ratios),
  one shared expert next to the routed ones, group-limited routing (4 groups, the best 2 kept, as V3's 8/4),
  sigmoid router scores normalised over the top-k with `routed_scaling_factor=1` (so, like Mixtral's, the routed
  weights sum to 1), and its first layer dense (`first_k_dense_replace=1`, V3 has 3 of 61) with the dense width;
- `qwen3_moe`: every layer sparse, `norm_topk_prob=True` (as Qwen3-30B-A3B), q/k RMSNorm as in the architecture.

Load balancing, applied the way each architecture does it: Mixtral, Qwen3-MoE and UoE add their own Switch-style
auxiliary loss (`output_router_logits=True`) with the same coefficient `aux_coef` (UoE's averages its SMHA and UoME
routers); DeepSeek-V3 uses no auxiliary loss but the aux-loss-free bias update of its paper (after each step,
`e_score_correction_bias += gamma * sign(mean load - expert load)`, gamma = 0.001), which transformers leaves to the
training code, so it is done here. Validation perplexity is exp of the token cross-entropy only.

Measured per (model, seed), each in a fresh subprocess: validation perplexity, training tokens/s (from the median
step time), and peak memory = the process's peak RSS after the run minus its RSS just before the model is built (data
loaded; the kernel's peak-RSS counter is reset at that point), i.e. what the model, its gradients, the optimizer state
and the activations add. FLOPs per token (forward, a multiply-add = 2): analytic active FLOPs
(`analytic_flops_per_token`; `uoe.estimate_flops_per_token` for UoE; causal attention averaging (L+1)/2 keys per
query; LM head included) and the FLOPs `FlopCounterMode` counts in one forward of a training batch with eager
attention counted as the full L x L score matrix. The counter sees what the code runs: the MoE baselines' experts
compute only the routed tokens, so they count ~active FLOPs; UoE's gathered path (its CPU default) computes only the
selected (token, expert) pairs, its attention over each head's compacted token lists (padded to the longest), and
o_proj as one dense product.

Results: a table on stdout, a section of `benchmarks/RESULTS.md` (other sections are kept), loss curves in
`benchmarks/compare_lm_loss.png`, raw results in `benchmarks/results/compare_lm.json`.

The frontier sweep (issue 15; section 6 below):

    .venv/bin/python benchmarks/compare_lm.py --sweep            # ~45 minutes on 2 idle CPU cores (estimate below)
    .venv/bin/python benchmarks/compare_lm.py --sweep --quick    # tiny models, in process, about a minute

Every family at three compute levels (`sweep_levels`), on the same data, tokenizer, optimizer, schedule and seeds
as above, with a budget of its own (`SWEEP_FULL`: the sizes of `FULL`, 180 steps = 368,640 tokens per run):
- `llama` by width: hidden 64 / 96 / 128, MLP 4x hidden, 4 heads;
- `mixtral`, `qwen3_moe`, `deepseek_v3` by (routed) top-k 1 / 2 / 4 of 8, their expert width matched to UoE's total
  parameters at top-2 as in the main comparison (so every level of a family has the same parameters);
- `moeut`, the MoEUT baseline of `benchmarks/moeut.py` (SwitchHead attention with 4 value/output experts per head,
  σ-MoE MLP of experts of width intermediate/16, 2 distinct layers applied twice, peri-layernorm; its number of
  MLP experts solved to match UoE's parameters), by (attention top-k, MLP top-k) = (1, 2), (2, 4), (4, 8);
- UoE by (selected heads, selected MLP slices) = (2, 2), (3, 4), (4, 6): `uoe_union` and `uoe_weighted`, and on
  the weighted one the variants of issue 15: `uoe_shared` (1 shared head and 1 shared slice + routed (1, 1),
  (2, 3), (3, 5)), `uoe_moeut` (`num_layer_groups=2`, `router_balance_loss="entropy"`, `norm_placement="peri"`) and
  `uoe_chain` (`mlp_chain_length=2`, (2, 1), (3, 2), (4, 3)); `uoe_moeut` shares its layers two by two
  (`num_layer_groups` = layers / 2), so it has fewer parameters than the others at the same FLOPs (the MoEUT
  baseline instead spends the saved parameters on more MLP experts). A variant whose fields this `UoEConfig` does not take
  (checked on its signature; its **kwargs would swallow them) is skipped with the reason in the table.
Balance: every Switch loss at the same pressure. UoE's is 1 at perfect balance (mean over its 2L blocks);
transformers' Mixtral / Qwen3-MoE `load_balancing_loss_func` (E * sum_e f_e P_e with sum_e f_e = top_k) is top_k
there, so with `Setup.normalize_aux_by_top_k` (on in the sweep, off in the main comparison to keep its results)
their loss is weighted `aux_coef / top_k` (`aux_loss_weight`). DeepSeek-V3 keeps its bias update, the MoEUT baseline
its own entropy loss (coefficients 0.01 MLP / 0.001 attention, as its public code), `uoe_moeut` UoE's entropy loss
x `aux_coef`.
Learning rate: per family, the argmin of validation perplexity over `LR_GRID` (the same grid for all) on a
60-step run (seed 0) at its middle level; recorded in the JSON (`lr_search`) and the RESULTS.md section.
Output: a table of every point (perplexity mean ± std and [min, max] over seeds, analytic active FLOPs/token,
parameters, median-step tokens/s, frontier membership), each family's frontier (the points no cheaper-or-equal point
of the family beats), the paper's claim read off the frontiers (best UoE variant vs best MoE, MoEUT included, at 5
log-spaced FLOP levels over the range both cover; each frontier linear in log FLOPs between its points and flat from
its best point to its costliest level), `benchmarks/compare_lm_frontier.png`, a RESULTS.md section and
`benchmarks/results/compare_lm_sweep.json`.
Time estimate of the full sweep (2 idle cores): 10 families x 3 levels x 2 seeds x 180 steps + 10 x 3 learning
rates x 60 steps = 12,600 training steps of 2,048 tokens. The main comparison's median steps take 0.115 s (Llama,
17,800 tokens/s) to 0.148 s (UoE); measured side by side with Llama here (fastest of 6 interleaved steps), Mixtral
and Qwen3-MoE take 0.9-1.6x Llama's step across top-k 1-4, DeepSeek-V3 1.3-1.5x, UoE 1.3-1.5x and the MoEUT
baseline (dense experts) 1.9-2.0x: on average about 1.4 x 0.115 = 0.16 s, i.e. ~34 minutes, plus ~7 s per process
(start, evaluation, FLOP count) x 90 = ~10 minutes: ~44 minutes (<= 50; the variants' chain doubles the MLP, so
`uoe_chain` may add a minute or two). Before the variants are merged (7 families) about 31 minutes. `--quick` trains
in this process (no peak RSS, no FLOP counter), 3 steps of tiny models: about a minute.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import math
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402  (benchmarks/harness.py: the RESULTS.md section writer shared by the comparisons)
import moeut  # noqa: E402  (benchmarks/moeut.py: the MoEUT baseline of the sweep)

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
SECTION_TITLE = "## LM comparison (compare_lm.py)"

MODEL_NAMES = ("llama", "mixtral", "deepseek_v3", "qwen3_moe", "uoe_union", "uoe_weighted")
MOE_BASELINES = ("mixtral", "deepseek_v3", "qwen3_moe")
MODEL_CLASSES = {
    "llama": "LlamaForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "deepseek_v3": "DeepseekV3ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "uoe_union": "UoEForCausalLM (union)",
    "uoe_weighted": "UoEForCausalLM (weighted)",
}
# transformers' default `grouped_mm` experts fail on CPU for float32 expert widths whose rows are not a multiple of
# 16 bytes (DeepSeek-V3's matched width) and are invisible to FlopCounterMode; the eager loop works for every model.
EXPERTS_IMPLEMENTATION = "eager"
DEEPSEEK_BIAS_UPDATE_SPEED = 1e-3  # gamma of DeepSeek-V3's aux-loss-free balancing


@dataclasses.dataclass
class Setup:
    """Everything shared by the models of one comparison."""

    vocab_size: int = 2048
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 512  # dense MLP width (Llama; UoE's before decomposition)
    num_experts: int = 8
    top_k: int = 2
    attention_top_k: int = 2  # UoE's SMHA heads per token
    seq_len: int = 128
    batch_size: int = 16
    max_steps: int = 500  # 6 models x 2 seeds: ~15 minutes on 2 idle CPU cores (longer when they are shared)
    learning_rate: float = 3e-3
    warmup_steps: int = 25
    weight_decay: float = 0.1
    aux_coef: float = 0.01
    eval_blocks: int = 160  # validation blocks, evenly spaced over the held-out works
    max_train_chars: int | None = None  # None: the whole training text
    # Divide Mixtral's and Qwen3-MoE's Switch loss by their top-k (it equals top_k at balance in transformers'
    # `load_balancing_loss_func`, 1 in UoE's), so that `aux_coef` is the same pressure for every model (the sweep).
    normalize_aux_by_top_k: bool = False

    @property
    def tokens(self) -> int:
        return self.max_steps * self.batch_size * self.seq_len


FULL = Setup()
QUICK = Setup(
    vocab_size=1024,
    hidden_size=64,
    num_layers=2,
    num_heads=4,
    intermediate_size=256,
    seq_len=64,
    batch_size=16,
    max_steps=120,
    warmup_steps=10,
    eval_blocks=64,
    max_train_chars=1_500_000,
)


# ---------------------------------------------------------------------------------------------------------------------
# 1. Data: the Shakespeare split, one tokenizer, token ids cached for the worker processes
# ---------------------------------------------------------------------------------------------------------------------


def prepare_data(work_dir: Path, setup: Setup) -> tuple[Path, dict[str, Any]]:
    """Write the split, train the BPE once and save the token ids; reused when the cache exists."""
    sys.path.insert(0, str(ROOT / "examples"))
    import run_clm  # noqa: PLC0415  (its tokenizer helpers; heavy import, only the parent needs it)

    from uoe.data import shakespeare_files, write_train_validation_split  # noqa: PLC0415

    cache = work_dir / f"data_v{setup.vocab_size}_c{setup.max_train_chars or 'all'}.pt"
    if cache.is_file():
        data = torch.load(cache)
        return cache, data["info"]
    start = time.perf_counter()
    train_path, validation_path = write_train_validation_split(work_dir / "text", validation_works=2)
    train_text = train_path.read_text(encoding="utf-8")[: setup.max_train_chars]
    validation_text = validation_path.read_text(encoding="utf-8")
    tokenizer = run_clm.train_bpe_tokenizer(train_text, setup.vocab_size)
    train_ids, validation_ids = run_clm.encode(tokenizer, train_text), run_clm.encode(tokenizer, validation_text)
    info = {
        "train_chars": len(train_text),
        "validation_chars": len(validation_text),
        "train_tokens": len(train_ids),
        "validation_tokens": len(validation_ids),
        "tokenizer_vocab": len(tokenizer),
        "unigram_perplexity": run_clm.unigram_perplexity(train_ids, validation_ids, setup.vocab_size),
        # write_train_validation_split holds out the last two works by file name
        "validation_works": [path.stem for path in shakespeare_files()[-2:]],
        "seconds": time.perf_counter() - start,
    }
    tokenizer.save_pretrained(work_dir / f"tokenizer_v{setup.vocab_size}")
    torch.save({"train": train_ids, "validation": validation_ids, "info": info}, cache)
    return cache, info


def validation_blocks(ids: torch.Tensor, seq_len: int, count: int) -> torch.Tensor:
    """`count` non-overlapping blocks evenly spaced over the validation text (all of them if there are fewer)."""
    blocks = ids[: len(ids) // seq_len * seq_len].view(-1, seq_len)
    index = torch.linspace(0, len(blocks) - 1, min(count, len(blocks))).round().long().unique()
    return blocks[index]


# ---------------------------------------------------------------------------------------------------------------------
# 2. Models: configs under the matching rule
# ---------------------------------------------------------------------------------------------------------------------


def _common(setup: Setup) -> dict[str, Any]:
    return dict(
        vocab_size=setup.vocab_size,
        hidden_size=setup.hidden_size,
        num_hidden_layers=setup.num_layers,
        num_attention_heads=setup.num_heads,
        max_position_embeddings=setup.seq_len,
        tie_word_embeddings=False,
        attention_dropout=0.0,
        initializer_range=0.02,
    )


def _config(name: str, setup: Setup, expert_width: int | None = None):
    """The config of `name`; `expert_width` is the MoE baselines' per-expert width (see `match_expert_width`)."""
    from transformers import DeepseekV3Config, LlamaConfig, MixtralConfig, Qwen3MoeConfig  # noqa: PLC0415

    from uoe import UoEConfig  # noqa: PLC0415

    common, heads = _common(setup), setup.num_heads
    head_dim = setup.hidden_size // heads
    moe = dict(num_experts_per_tok=setup.top_k, output_router_logits=True)
    if name == "llama":
        return LlamaConfig(**common, num_key_value_heads=heads, intermediate_size=setup.intermediate_size)
    if name == "mixtral":
        return MixtralConfig(
            **common, **moe, num_key_value_heads=heads, intermediate_size=expert_width,
            num_local_experts=setup.num_experts, router_aux_loss_coef=setup.aux_coef, router_jitter_noise=0.0,
        )  # fmt: skip
    if name == "qwen3_moe":
        return Qwen3MoeConfig(
            **common, **moe, num_key_value_heads=heads, intermediate_size=setup.intermediate_size,
            moe_intermediate_size=expert_width, num_experts=setup.num_experts, norm_topk_prob=True,
            router_aux_loss_coef=setup.aux_coef, decoder_sparse_step=1, mlp_only_layers=[],
        )  # fmt: skip
    if name == "deepseek_v3":
        return DeepseekV3Config(
            **common, num_key_value_heads=heads, intermediate_size=setup.intermediate_size,
            moe_intermediate_size=expert_width, n_routed_experts=setup.num_experts,
            num_experts_per_tok=setup.top_k, n_shared_experts=1, n_group=4, topk_group=2,
            first_k_dense_replace=1, routed_scaling_factor=1.0, norm_topk_prob=True,
            q_lora_rank=setup.hidden_size // 2, kv_lora_rank=setup.hidden_size // 4,
            qk_nope_head_dim=head_dim, qk_rope_head_dim=head_dim // 2, v_head_dim=head_dim,
        )  # fmt: skip
    if name in ("uoe_union", "uoe_weighted"):
        return UoEConfig(
            **common, attention_top_k=setup.attention_top_k, intermediate_size=setup.intermediate_size,
            num_mlp_experts=setup.num_experts, mlp_top_k=setup.top_k, gate_mode=name.removeprefix("uoe_"),
            router_aux_loss_coef=setup.aux_coef, router_z_loss_coef=0.0,
        )  # fmt: skip
    raise ValueError(f"--models: unknown model {name!r}; allowed: {', '.join(MODEL_NAMES)}.")


def model_class(config):
    import transformers  # noqa: PLC0415

    import uoe  # noqa: PLC0415

    if config.model_type == "uoe":
        return uoe.UoEForCausalLM
    if config.model_type == "moeut_baseline":
        return moeut.MoEUTForCausalLM
    return getattr(transformers, {"llama": "LlamaForCausalLM", "mixtral": "MixtralForCausalLM",
                                  "qwen3_moe": "Qwen3MoeForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM"}[config.model_type])  # fmt: skip


def instantiate(config, device: str | torch.device = "cpu"):
    if config.model_type == "moeut_baseline":  # benchmarks/moeut.py: its own SDPA attention and gathered experts
        with torch.device(device):
            return moeut.MoEUTForCausalLM(config)
    kwargs = {"attn_implementation": "sdpa"}
    if config.model_type != "llama":
        kwargs["experts_implementation"] = EXPERTS_IMPLEMENTATION
    with torch.device(device):
        return model_class(config)._from_config(config, **kwargs)


def config_from_dict(values: dict[str, Any]):
    """The config object of a `config.to_dict()` (worker processes rebuild their config from the spec)."""
    import transformers  # noqa: PLC0415

    import uoe  # noqa: PLC0415

    classes = {
        "llama": transformers.LlamaConfig, "mixtral": transformers.MixtralConfig,
        "qwen3_moe": transformers.Qwen3MoeConfig, "deepseek_v3": transformers.DeepseekV3Config,
        "uoe": uoe.UoEConfig, "moeut_baseline": moeut.MoEUTConfig,
    }  # fmt: skip
    return classes[values["model_type"]].from_dict(values)


def aux_loss_weight(config, setup: Setup) -> float:
    """The weight of `outputs.aux_loss` in the training loss.

    UoE's Switch loss is 1 at perfect balance (averaged over its 2L routed blocks); transformers' Mixtral and
    Qwen3-MoE loss (`load_balancing_loss_func`: E * sum_e f_e * P_e with f_e summing to top_k over the experts) is
    top_k there, so with `setup.normalize_aux_by_top_k` their weight is `aux_coef / top_k` and the same coefficient
    is the same pressure. The MoEUT baseline's `aux_loss` is its entropy loss already weighted by its own
    coefficients (weight 1). DeepSeek-V3 has no aux loss (its bias update balances it)."""
    kind = config.model_type
    if kind == "moeut_baseline":
        return 1.0
    if kind in ("mixtral", "qwen3_moe") and setup.normalize_aux_by_top_k:
        return setup.aux_coef / config.num_experts_per_tok
    return setup.aux_coef


def count_parameters(config) -> int:
    """Total parameters, counted on the meta device (no memory, no initialisation)."""
    return sum(p.numel() for p in instantiate(config, "meta").parameters())


def match_expert_width(name: str, setup: Setup, target: int) -> int:
    """The integer per-expert width that brings the total parameters of `name` closest to `target`."""
    at_1, at_2 = count_parameters(_config(name, setup, 1)), count_parameters(_config(name, setup, 2))
    width = max(1, round(1 + (target - at_1) / (at_2 - at_1)))  # the count is linear in the width
    return min(
        (width - 1, width, width + 1), key=lambda w: abs(count_parameters(_config(name, setup, max(1, w))) - target)
    )


def build_configs(setup: Setup, names: tuple[str, ...] = MODEL_NAMES) -> dict[str, Any]:
    """The matched config of every model in `names` (the MoE baselines matched to UoE's parameter count)."""
    target = count_parameters(_config("uoe_union", setup))
    return {
        name: _config(name, setup, match_expert_width(name, setup, target) if name in MOE_BASELINES else None)
        for name in names
    }


# ---------------------------------------------------------------------------------------------------------------------
# 3. FLOPs per token: analytic active FLOPs, and what FlopCounterMode counts
# ---------------------------------------------------------------------------------------------------------------------


def analytic_flops_per_token(config, seq_len: int, attention: str = "causal") -> float:
    """Active forward FLOPs per token (a multiply-add = 2 FLOPs; LM head included; norms, RoPE, softmax left out).

    `attention="causal"` averages (L+1)/2 keys per query (what a causal model needs, the convention of
    `uoe.estimate_flops_per_token`); `"full"` counts all L keys, as a dense kernel executes them.
    """
    from uoe import estimate_flops_per_token  # noqa: PLC0415

    if attention not in ("causal", "full"):
        raise ValueError(f"`attention` must be 'causal' or 'full', got {attention!r}.")
    context = (seq_len + 1) / 2 if attention == "causal" else seq_len
    hidden, layers, kind = config.hidden_size, config.num_hidden_layers, config.model_type
    if kind == "moeut_baseline":
        return moeut.analytic_flops_per_token(config, seq_len, attention)
    if kind == "uoe":
        estimate = estimate_flops_per_token(config, seq_len)
        # uoe.flops is linear in the causal context; rescale its score FLOPs for the "full" convention
        return estimate.active + estimate.breakdown["attention_scores"] * (context / ((seq_len + 1) / 2) - 1)

    heads = config.num_attention_heads
    if kind == "deepseek_v3":  # multi-head latent attention, keys/values expanded per token as transformers does
        qk_head = config.qk_nope_head_dim + config.qk_rope_head_dim
        q_rank, kv_rank, v_head = config.q_lora_rank, config.kv_lora_rank, config.v_head_dim
        query = 2 * hidden * heads * qk_head if q_rank is None else 2 * hidden * q_rank + 2 * q_rank * heads * qk_head
        key_value = 2 * hidden * (kv_rank + config.qk_rope_head_dim) + 2 * kv_rank * heads * (
            config.qk_nope_head_dim + v_head
        )
        attention_flops = query + key_value + 2 * heads * v_head * hidden + 2 * heads * (qk_head + v_head) * context
    else:
        head_dim = getattr(config, "head_dim", None) or hidden // heads
        kv_heads = config.num_key_value_heads
        projections = 2 * hidden * head_dim * (2 * heads + 2 * kv_heads)  # q and o, k and v
        attention_flops = projections + 2 * 2 * heads * head_dim * context

    def swiglu(width: int) -> float:
        return 3 * 2 * hidden * width

    if kind == "llama":
        mlp = [swiglu(config.intermediate_size)] * layers
    elif kind == "mixtral":
        routed = 2 * hidden * config.num_local_experts + config.num_experts_per_tok * swiglu(config.intermediate_size)
        mlp = [routed] * layers
    elif kind == "qwen3_moe":
        routed = 2 * hidden * config.num_experts + config.num_experts_per_tok * swiglu(config.moe_intermediate_size)
        sparse = [
            i not in config.mlp_only_layers and config.num_experts > 0 and (i + 1) % config.decoder_sparse_step == 0
            for i in range(layers)
        ]
        mlp = [routed if s else swiglu(config.intermediate_size) for s in sparse]
    elif kind == "deepseek_v3":
        experts = config.num_experts_per_tok + config.n_shared_experts
        routed = 2 * hidden * config.n_routed_experts + experts * swiglu(config.moe_intermediate_size)
        mlp = [swiglu(config.intermediate_size) if i < config.first_k_dense_replace else routed for i in range(layers)]
    else:
        raise ValueError(f"no analytic FLOPs for model_type {kind!r}")
    return layers * attention_flops + sum(mlp) + 2 * hidden * config.vocab_size


def counted_flops_per_token(model, input_ids: torch.Tensor) -> float:
    """FLOPs that `torch.utils.flop_counter.FlopCounterMode` counts in one forward, per token: what the model's
    code executes (`harness.counted_forward_flops`); matrix products and attention, so norms, softmax and RoPE are
    not in it (nor in the analytic figure)."""
    return harness.counted_forward_flops(model, lambda: model(input_ids=input_ids)) / input_ids.numel()


# ---------------------------------------------------------------------------------------------------------------------
# 4. One (model, seed) run, in its own process
# ---------------------------------------------------------------------------------------------------------------------


def _status_mb(field: str) -> float | None:
    status = Path("/proc/self/status")
    if not status.is_file():
        return None
    line = next((line for line in status.read_text().splitlines() if line.startswith(field + ":")), None)
    return int(line.split()[1]) / 1024 if line else None  # the kernel reports kB


def start_memory_measurement() -> tuple[float, bool]:
    """RSS now, and whether the process's peak RSS could be reset to it (Linux `clear_refs`), so that the peak read
    after the run is the run's own and not a transient of the imports. Without the reset the baseline is the peak so
    far (`ru_maxrss`), which can only under-state the run's memory."""
    gc.collect()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # "5": reset the peak RSS (VmHWM) to the current RSS
        return _status_mb("VmRSS"), True
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, False  # KiB on Linux


def peak_rss_mb() -> float:
    return _status_mb("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class DeepseekBiasBalancer:
    """DeepSeek-V3's aux-loss-free load balancing: count each router's top-k choices during a step, then nudge its
    `e_score_correction_bias` towards the under-loaded experts (`bias += gamma * sign(mean load - load)`)."""

    def __init__(self, model, gamma: float = DEEPSEEK_BIAS_UPDATE_SPEED):
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter  # noqa: PLC0415

        self.gamma = gamma
        self.routers = [m for m in model.modules() if isinstance(m, DeepseekV3TopkRouter)]
        self.loads = [torch.zeros(r.num_experts) for r in self.routers]
        for router, load in zip(self.routers, self.loads, strict=True):
            router.register_forward_hook(self._counter(load))

    @staticmethod
    def _counter(load: torch.Tensor):
        def hook(module, args, output):
            if module.training:  # output = (router_logits, top-k weights, top-k indices)
                load.add_(torch.bincount(output[2].flatten(), minlength=len(load)).to(load.dtype))

        return hook

    @torch.no_grad()
    def step(self) -> None:
        for router, load in zip(self.routers, self.loads, strict=True):
            router.e_score_correction_bias += self.gamma * torch.sign(load.mean() - load)
            load.zero_()


def train_and_evaluate(
    name: str, config, setup: Setup, seed: int, data_path: Path, measure: bool = True
) -> dict[str, Any]:
    """Train `config` from scratch with seed `seed` and evaluate it; the measurements of one table cell.
    `measure=False` (the in-process quick sweep) skips the peak-RSS baseline and the FLOP counter (NaN)."""
    from transformers import get_cosine_schedule_with_warmup  # noqa: PLC0415

    data = torch.load(data_path)
    train_blocks = data["train"][: len(data["train"]) // setup.seq_len * setup.seq_len].view(-1, setup.seq_len)
    eval_blocks = validation_blocks(data["validation"], setup.seq_len, setup.eval_blocks)
    # The batch order depends on the seed only, so every model sees the same batches for a given seed.
    order = torch.randperm(len(train_blocks), generator=torch.Generator().manual_seed(seed))
    order = order.repeat(math.ceil(setup.max_steps * setup.batch_size / len(order)))
    model_class(config)  # import the modeling module first: its import is not the model's memory
    baseline_rss, peak_was_reset = start_memory_measurement() if measure else (math.nan, False)

    torch.manual_seed(seed)
    model = instantiate(config)
    model.train()
    parameters = sum(p.numel() for p in model.parameters())
    decay = [p for p in model.parameters() if p.dim() >= 2]  # matrices decay; norms and biases do not
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": setup.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=setup.learning_rate,
        betas=(0.9, 0.95),
    )
    schedule = get_cosine_schedule_with_warmup(optimizer, setup.warmup_steps, setup.max_steps)
    balancer = DeepseekBiasBalancer(model) if config.model_type == "deepseek_v3" else None
    with_aux = ("mixtral", "qwen3_moe", "uoe", "moeut_baseline")
    router_kwargs = {"output_router_logits": True} if config.model_type in with_aux else {}
    aux_weight = aux_loss_weight(config, setup)

    losses, aux_losses, step_seconds = [], [], []
    load_start = os.getloadavg()[0]
    start = time.perf_counter()
    for step in range(setup.max_steps):
        step_start = time.perf_counter()
        batch = train_blocks[order[step * setup.batch_size : (step + 1) * setup.batch_size]]
        outputs = model(input_ids=batch, **router_kwargs)
        token_loss = F.cross_entropy(outputs.logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten())
        loss = token_loss
        if router_kwargs:  # the same Switch-style aux loss weight for every model that has one (see aux_loss_weight)
            loss = loss + aux_weight * outputs.aux_loss
            aux_losses.append(outputs.aux_loss.item())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if balancer is not None:
            balancer.step()
        losses.append(token_loss.item())
        step_seconds.append(time.perf_counter() - step_start)
    train_seconds = time.perf_counter() - start
    load_end = os.getloadavg()[0]

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for chunk in eval_blocks.split(setup.batch_size):
            logits = model(input_ids=chunk).logits[:, :-1]
            total += F.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].flatten(), reduction="sum").item()
            count += chunk[:, 1:].numel()
    validation_loss = total / count
    counted = counted_flops_per_token(model, train_blocks[order[: setup.batch_size]]) if measure else math.nan
    return {
        "model": name,
        "seed": seed,
        "status": "ok",
        "parameters": parameters,
        "flops_analytic": analytic_flops_per_token(config, setup.seq_len),
        "flops_analytic_full_attention": analytic_flops_per_token(config, setup.seq_len, attention="full"),
        "flops_counted": counted,
        "validation_loss": validation_loss,
        "validation_perplexity": math.exp(validation_loss),
        "validation_tokens": count,
        "learning_rate": setup.learning_rate,
        "train_seconds": train_seconds,
        # The median step is robust to bursts of load from other processes; the wall-time mean is not.
        "tokens_per_second": setup.batch_size * setup.seq_len / statistics.median(step_seconds),
        "tokens_per_second_wall": setup.tokens / train_seconds,
        "load_average_start": load_start,
        "load_average_end": load_end,
        "peak_rss_mb": peak_rss_mb() - baseline_rss,
        "baseline_rss_mb": baseline_rss,
        "peak_rss_reset": peak_was_reset,
        "train_losses": losses,
        "aux_losses": aux_losses,
        "torch_threads": torch.get_num_threads(),
        "experts_implementation": getattr(model.config, "_experts_implementation", None),
        "attn_implementation": model.config._attn_implementation,
    }


def worker_main(spec_path: Path) -> None:
    """Entry point of a worker process: one (model, seed) run described by a JSON spec."""
    import transformers  # noqa: PLC0415

    import uoe  # noqa: F401, PLC0415  (registers the uoe model type)

    transformers.logging.set_verbosity_error()
    spec = json.loads(spec_path.read_text())
    setup = Setup(**spec["setup"])
    config = config_from_dict(spec["config"])
    result = train_and_evaluate(spec["model"], config, setup, spec["seed"], Path(spec["data"]))
    Path(spec["output"]).write_text(json.dumps(result))


def run_worker(name: str, config, setup: Setup, seed: int, data_path: Path, work_dir: Path, timeout: float) -> dict:
    """Run one (model, seed) in a fresh interpreter, so its peak RSS is its own; a failure becomes a reason."""
    spec = {
        "model": name, "seed": seed, "setup": dataclasses.asdict(setup), "config": config.to_dict(),
        "data": str(data_path), "output": str(work_dir / f"result_{name}_{seed}.json"),
    }  # fmt: skip
    stem = "".join(c if c.isalnum() or c in "_-" else "_" for c in f"{name}_{seed}_{setup.learning_rate:g}")
    spec["output"] = str(work_dir / f"result_{stem}.json")
    spec_path = work_dir / f"spec_{stem}.json"
    spec_path.write_text(json.dumps(spec))
    Path(spec["output"]).unlink(missing_ok=True)
    command = [sys.executable, str(Path(__file__).resolve()), "--_worker", str(spec_path)]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"model": name, "seed": seed, "status": f"timed out after {timeout:.0f} s"}
    if result.returncode != 0 or not Path(spec["output"]).is_file():
        lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
        reason = lines[-1] if lines else f"exit code {result.returncode}"
        print(result.stderr[-3000:], file=sys.stderr)
        return {"model": name, "seed": seed, "status": f"failed: {reason}"}
    return json.loads(Path(spec["output"]).read_text())


# ---------------------------------------------------------------------------------------------------------------------
# 5. Summary: table, claim, plot, RESULTS.md section
# ---------------------------------------------------------------------------------------------------------------------


def summarize(runs: list[dict], names: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """Per model: mean and spread over its seeds; a model with a failed seed is reported as failed."""
    summary = {}
    for name in names:
        mine = [r for r in runs if r["model"] == name]
        failed = [r for r in mine if r["status"] != "ok"]
        if failed or not mine:
            summary[name] = {"status": failed[0]["status"] if failed else "not run"}
            continue
        ppl = torch.tensor([r["validation_perplexity"] for r in mine], dtype=torch.float64)
        curves = torch.tensor([r["train_losses"] for r in mine], dtype=torch.float64)
        summary[name] = {
            "status": "ok",
            "seeds": [r["seed"] for r in mine],
            "perplexity_mean": ppl.mean().item(),
            "perplexity_std": ppl.std().item() if len(ppl) > 1 else 0.0,
            "perplexity_min": ppl.min().item(),
            "perplexity_max": ppl.max().item(),
            "parameters": mine[0]["parameters"],
            "flops_analytic": mine[0]["flops_analytic"],
            "flops_analytic_full_attention": mine[0]["flops_analytic_full_attention"],
            "flops_counted": mine[0]["flops_counted"],
            "tokens_per_second": sum(r["tokens_per_second"] for r in mine) / len(mine),
            "tokens_per_second_wall": sum(r["tokens_per_second_wall"] for r in mine) / len(mine),
            "max_load_average": max(max(r["load_average_start"], r["load_average_end"]) for r in mine),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in mine),
            "mean_train_losses": curves.mean(0).tolist(),
        }
    return summary


def markdown_table(summary: dict[str, dict[str, Any]]) -> str:
    rows = [
        "| model | class | parameters | active FLOPs/token (analytic) | FLOPs/token counted (executed) "
        "| val. perplexity (mean ± std, [min, max]) | train tokens/s (median step) | peak RSS Δ (MB) |",
        "|---|---|---:|---:|---:|---|---:|---:|",
    ]
    for name, s in summary.items():
        if s["status"] != "ok":
            rows.append(f"| {name} | {MODEL_CLASSES[name]} | – | – | – | **could not run**: {s['status']} | – | – |")
            continue
        rows.append(
            f"| {name} | {MODEL_CLASSES[name]} | {s['parameters']:,} | {s['flops_analytic'] / 1e6:.3f} M "
            f"| {s['flops_counted'] / 1e6:.3f} M | {s['perplexity_mean']:.2f} ± {s['perplexity_std']:.2f} "
            f"[{s['perplexity_min']:.2f}, {s['perplexity_max']:.2f}] | {s['tokens_per_second']:,.0f} "
            f"| {s['peak_rss_mb']:.0f} |"
        )
    return "\n".join(rows)


def claim_statement(summary: dict[str, dict[str, Any]]) -> str:
    """How far UoE is from the paper's claim: lower perplexity than the best MoE at <= 0.8x its FLOPs."""
    moes = {n: s for n, s in summary.items() if n in MOE_BASELINES and s["status"] == "ok"}
    uoes = {n: s for n, s in summary.items() if n.startswith("uoe") and s["status"] == "ok"}
    if not moes or not uoes:
        return "The paper's claim cannot be checked: no MoE baseline or no UoE model finished."
    best_name = min(moes, key=lambda n: moes[n]["perplexity_mean"])
    best = moes[best_name]
    lines = [
        f"Paper's claim: UoE reaches lower perplexity than the best MoE baseline at <= 0.8x its FLOPs. Best MoE "
        f"here: **{best_name}** (perplexity {best['perplexity_mean']:.2f} ± {best['perplexity_std']:.2f}, "
        f"{best['flops_analytic'] / 1e6:.3f} M active FLOPs/token)."
    ]
    for name, s in uoes.items():
        ratio = s["flops_analytic"] / best["flops_analytic"]
        gap = s["perplexity_mean"] - best["perplexity_mean"]
        spread = s["perplexity_std"] + best["perplexity_std"]
        lower, cheaper = gap < 0, ratio <= 0.8
        verdict = "**meets the claim**" if lower and cheaper else "**does not meet the claim**"
        within = " (within the seed spread)" if abs(gap) <= spread else ""
        lines.append(
            f"- {name}: perplexity {s['perplexity_mean']:.2f} ({gap:+.2f}, {100 * gap / best['perplexity_mean']:+.1f}% "
            f"vs {best_name}{within}) at {ratio:.2f}x its active FLOPs: "
            f"{'lower' if lower else 'not lower'} perplexity, {'<=' if cheaper else '>'} 0.8x FLOPs → {verdict}."
        )
        others = [
            f"{moe}: {s['perplexity_mean'] - m['perplexity_mean']:+.2f} perplexity at "
            f"{s['flops_analytic'] / m['flops_analytic']:.2f}x FLOPs"
            for moe, m in moes.items()
        ]
        lines.append(f"  - against each MoE baseline: {'; '.join(others)}.")
    return "\n".join(lines)


def plot_losses(summary: dict[str, dict[str, Any]], setup: Setup, path: Path) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    figure, axis = plt.subplots(figsize=(8, 5))
    window = max(1, setup.max_steps // 25)  # moving average: single steps are noisy
    for name, s in summary.items():
        if s["status"] != "ok":
            continue
        curve = torch.tensor(s["mean_train_losses"])
        smooth = curve.unfold(0, window, 1).mean(1) if len(curve) >= window else curve
        tokens = (torch.arange(len(smooth)) + len(curve) - len(smooth) + 1) * setup.batch_size * setup.seq_len
        axis.plot(tokens.numpy(), smooth.numpy(), label=f"{name} (val ppl {s['perplexity_mean']:.1f})")
    axis.set_xlabel("training tokens")
    axis.set_ylabel(f"train token loss (mean over seeds, moving average of {window} steps)")
    axis.set_title("compare_lm.py: same data, tokenizer, optimizer, schedule, budget and seeds")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def environment() -> dict[str, Any]:
    import transformers  # noqa: PLC0415

    import uoe  # noqa: PLC0415

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        except OSError:
            return ""

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": harness.cpu_name(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "uoe": uoe.__version__,
        "git_commit": git("rev-parse", "--short", "HEAD"),
        "uoe_uncommitted_changes": bool(git("status", "--porcelain", "--", "uoe")),
    }


def results_section(record: dict[str, Any], summary: dict[str, dict[str, Any]], setup: Setup) -> str:
    """The markdown section of RESULTS.md: command, device, setup, matching rule, table, claim, notes."""
    env, data_info, configs, wall = record["environment"], record["data"], record["configs"], record["wall_seconds"]
    command, load = record["command"], record["load_average"]
    widths = ", ".join(
        f"{name} {configs[name].get('moe_intermediate_size') or configs[name]['intermediate_size']}"
        for name in MOE_BASELINES
        if name in configs
    )
    head_dim = setup.hidden_size // setup.num_heads
    seeds = next((s["seeds"] for s in summary.values() if s["status"] == "ok"), [])
    uncommitted = ", with uncommitted changes in uoe/" if env["uoe_uncommitted_changes"] else ""
    # The load average counts this benchmark's own threads too; more than one beyond them means competition.
    run_loads = [max(r["load_average_start"], r["load_average_end"]) for r in record["runs"] if r["status"] == "ok"]
    busiest = max(run_loads, default=0.0)
    threads = env["torch_threads"]
    load_note = (
        f"; at most {busiest:.2f} during the runs, of which this benchmark's {threads} threads are about {threads}"
    )
    load_note += ": the machine was otherwise about idle" if busiest <= threads + 1 else ""
    if busiest > threads + 1:
        load_note += "; other processes were competing for the cores, so tokens/s are lower and noisier"
    eval_blocks = min(setup.eval_blocks, data_info["validation_tokens"] // setup.seq_len)
    failed = ", ".join(f"{n} ({s['status']})" for n, s in summary.items() if s["status"] != "ok")
    lines = [
        SECTION_TITLE,
        "",
        f"Command: `{command}` ({wall / 60:.1f} min wall time, finished {env['date']}).",
        f"Device: {env['cpu']}, {env['cores']} cores, torch threads {env['torch_threads']}, no GPU.",
        f"Versions: Python {env['python']}, torch {env['torch']}, transformers {env['transformers']}, "
        f"uoe {env['uoe']} (commit {env['git_commit']}{uncommitted}).",
        f"Load average (1 min): {load['start'][0]:.2f} at start, {load['end'][0]:.2f} at end{load_note}.",
        "",
        f"Setup, identical for every model: Shakespeare (`uoe.data`, {data_info['train_tokens']:,} training tokens; "
        f"validation = the held-out works {', '.join(data_info['validation_works'])}), one byte-level BPE of "
        f"{setup.vocab_size} tokens; blocks of {setup.seq_len} tokens, batch {setup.batch_size}, {setup.max_steps} "
        f"steps = {setup.tokens:,} training tokens per run; AdamW (lr {setup.learning_rate}, betas 0.9/0.95, weight "
        f"decay {setup.weight_decay} on matrices), linear warmup over {setup.warmup_steps} steps then cosine to 0, gradient "
        f'clipping 1.0, float32, SDPA attention, MoE experts `experts_implementation="{EXPERTS_IMPLEMENTATION}"`; '
        f"seeds {', '.join(map(str, seeds))} (initialisation and batch order). Validation perplexity on {eval_blocks} "
        f"evenly spaced blocks, token cross-entropy only (unigram baseline of this tokenizer: "
        f"{data_info['unigram_perplexity']:.1f}).",
        "",
        f"Matching rule: width {setup.hidden_size}, {setup.num_layers} layers, {setup.num_heads} heads of {head_dim} "
        f"(no GQA), vocabulary {setup.vocab_size}, sequence {setup.seq_len} for all; `llama` has the dense MLP width "
        f"{setup.intermediate_size}, i.e. it is UoE at full routing; UoE selects {setup.attention_top_k}/"
        f"{setup.num_heads} heads and {setup.top_k}/{setup.num_experts} MLP slices of "
        f"{setup.intermediate_size // setup.num_experts}; the MoE baselines route top-{setup.top_k} of "
        f"{setup.num_experts} experts, per-expert width solved to match UoE's total parameters ({widths}). "
        f"DeepSeek-V3: MLA (q rank {setup.hidden_size // 2}, kv rank {setup.hidden_size // 4}, q/k head "
        f"{head_dim} + {head_dim // 2} RoPE, v head {head_dim}), 1 shared expert, 4 expert groups of which the best 2 "
        f"are kept, first layer dense (width {setup.intermediate_size}), `routed_scaling_factor=1`. Load balancing: "
        f"Mixtral, Qwen3-MoE and UoE add their Switch aux loss x {setup.aux_coef}; DeepSeek-V3 uses its "
        f"aux-loss-free bias update (gamma = {DEEPSEEK_BIAS_UPDATE_SPEED}), done by this script.",
        "",
        markdown_table(summary),
        "",
        claim_statement(summary),
        "",
        "FLOPs: forward, per token, a multiply-add = 2, LM head included. *Analytic* is the active compute with causal "
        "attention ((L+1)/2 keys per query; `uoe.estimate_flops_per_token` for UoE). *Counted* is "
        "`torch.utils.flop_counter.FlopCounterMode` on one forward of a training batch, attention counted as the "
        "whole L x L score matrix: it sees what the code executes. For Llama, Mixtral, Qwen3-MoE and DeepSeek-V3 it "
        "equals the analytic figure with full instead of causal attention (their eager experts run only the routed "
        'tokens). UoE runs its gathered path (the CPU default, `routing_backend="auto"`): only the selected '
        "(token, head) and (token, expert) pairs are projected, each head attends over its compacted token lists "
        "(padded to the longest list, full scores counted) and o_proj is one dense product, so its count lies "
        "between its analytic active FLOPs and the dense model's.",
        "",
        "Parameters are totals (embeddings and LM head included). Peak RSS delta: each (model, seed) runs in a fresh "
        "process; just before the model is built (data loaded) the process's peak-RSS counter is reset to its "
        "current RSS (Linux `/proc/self/clear_refs`), and the delta is the peak RSS (`VmHWM`) after training, "
        "evaluation and FLOP counting minus that RSS, i.e. what the model, gradients, AdamW state and activations "
        "add (max over seeds). Tokens/s: tokens of a batch / the median time of a training step (forward, backward, "
        "clipping, AdamW step), mean over seeds; the median keeps bursts of load from other processes out of it "
        "(the wall-time means and each run's load average are in the JSON).",
        "",
        f"Models that could not run: {failed or 'none, all six ran'}. transformers' default `grouped_mm` experts are "
        "not used: on this CPU they fail for DeepSeek-V3's matched float32 expert width (\"strides should be "
        'multiple of 16 bytes") and FlopCounterMode does not count them.',
        "",
        "![training loss curves](compare_lm_loss.png)",
        "",
        "Raw results (per seed, with loss curves): `benchmarks/results/compare_lm.json`.",
    ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------------------
# 6. The frontier sweep (--sweep): every family at three or more compute levels
# ---------------------------------------------------------------------------------------------------------------------

SWEEP_SECTION_TITLE = "## LM frontier sweep (compare_lm.py --sweep)"
LR_GRID = (1.5e-3, 3e-3, 6e-3)  # the same grid for every family
UOE_FAMILIES = ("uoe_union", "uoe_weighted", "uoe_shared", "uoe_moeut", "uoe_chain")
SWEEP_MOE_FAMILIES = ("mixtral", "qwen3_moe", "deepseek_v3", "moeut")
SWEEP_FAMILIES = ("llama", *SWEEP_MOE_FAMILIES, *UOE_FAMILIES)
FAMILY_DESCRIPTIONS = {
    "llama": "LlamaForCausalLM, dense, by hidden width (MLP 4x, 4 heads)",
    "mixtral": "MixtralForCausalLM, by top-k of 8 (expert width matched to UoE's parameters at top-2)",
    "qwen3_moe": "Qwen3MoeForCausalLM, by top-k of 8 (expert width matched at top-2)",
    "deepseek_v3": "DeepseekV3ForCausalLM, by routed top-k of 8 (+1 shared expert; width matched at top-2)",
    "moeut": "MoEUT baseline (benchmarks/moeut.py; layers shared two by two, parameters matched by its number of "
    "MLP experts), by SwitchHead / sigma-MoE top-k",
    "uoe_union": "UoE, union gates, by selected heads / MLP slices",
    "uoe_weighted": "UoE, weighted gates, by selected heads / MLP slices",
    "uoe_shared": "UoE weighted + 1 shared head and 1 shared MLP slice, by routed heads / slices",
    "uoe_moeut": "UoE weighted, MoEUT-style: layers shared two by two (num_layer_groups = layers/2; so fewer "
    "parameters at the same FLOPs), entropy balance loss, peri-layernorm",
    "uoe_chain": "UoE weighted, Chain-of-Experts: the UoME block twice per layer (C=2)",
}


@dataclasses.dataclass
class SweepPlan:
    """What the sweep trains besides `Setup`: seeds, the learning-rate search and the in-process switch."""

    setup: Setup
    seeds: tuple[int, ...] = (0, 1)
    lr_grid: tuple[float, ...] = LR_GRID
    lr_steps: int = 60  # steps of each learning-rate trial (seed 0, the family's middle level)
    in_process: bool = False  # True: runs in this process (no per-run peak RSS; the quick mode's speed)


SWEEP_FULL = SweepPlan(
    setup=dataclasses.replace(FULL, max_steps=180, warmup_steps=18, normalize_aux_by_top_k=True), lr_steps=60
)
SWEEP_QUICK = SweepPlan(
    setup=dataclasses.replace(
        FULL,
        vocab_size=256,
        hidden_size=32,
        num_layers=2,
        intermediate_size=64,
        seq_len=32,
        batch_size=4,
        max_steps=3,
        warmup_steps=1,
        eval_blocks=4,
        max_train_chars=200_000,
        normalize_aux_by_top_k=True,
    ),  # fmt: skip
    seeds=(0, 1),
    lr_steps=2,
    in_process=True,
)


def sweep_levels(family: str, setup: Setup) -> list[tuple[str, dict[str, Any]]]:
    """The compute levels of `family`: (label, the changes from the family's base config)."""
    if family == "llama":  # dense, by width: hidden 1/2, 3/4 and 1x the setup's, MLP 4x hidden, 4 heads
        widths = [setup.hidden_size // 2, 3 * setup.hidden_size // 4, setup.hidden_size]
        return [(f"d{w}", {"hidden_size": w, "intermediate_size": 4 * w}) for w in widths]
    if family in ("mixtral", "qwen3_moe", "deepseek_v3"):
        return [(f"k{k}", {"num_experts_per_tok": k}) for k in (1, 2, 4)]
    if family == "moeut":
        return [(f"a{a}m{m}", {"attention_top_k": a, "mlp_top_k": m}) for a, m in ((1, 2), (2, 4), (4, 8))]
    # UoE from its main-comparison point (2 of 4 heads, 2 of 8 slices) up to about the MoEs' largest FLOPs, so that
    # the frontiers overlap (the MoEs' attention is dense: their FLOPs span only their MLP's share)
    if family == "uoe_shared":  # 1 shared + routed: 2/2, 3/4 and 4/6 heads / slices in all
        pairs = ((1, 1), (2, 3), (3, 5))
    elif family == "uoe_chain":  # the MLP runs twice: 2x the slices per token
        pairs = ((2, 1), (3, 2), (4, 3))
    else:
        pairs = ((2, 2), (3, 4), (4, 6))
    return [(f"h{h}e{e}", {"attention_top_k": h, "mlp_top_k": e}) for h, e in pairs]


UOE_VARIANT_FIELDS = {
    "uoe_union": {"gate_mode": "union"},
    "uoe_weighted": {"gate_mode": "weighted"},
    "uoe_shared": {"gate_mode": "weighted", "num_shared_attention_groups": 1, "num_shared_mlp_experts": 1},
    # num_layer_groups None here: half the layers, set per setup in sweep_base_configs (4 layers = 2 distinct x 2)
    "uoe_moeut": {
        "gate_mode": "weighted",
        "num_layer_groups": None,
        "router_balance_loss": "entropy",
        "norm_placement": "peri",
    },  # fmt: skip
    "uoe_chain": {"gate_mode": "weighted", "mlp_chain_length": 2},
}


def missing_uoe_fields(family: str) -> list[str]:
    """The variant fields of `family` that this UoEConfig does not take yet (its **kwargs would swallow them)."""
    import inspect  # noqa: PLC0415

    from uoe import UoEConfig  # noqa: PLC0415

    accepted = inspect.signature(UoEConfig.__init__).parameters
    return [name for name in UOE_VARIANT_FIELDS.get(family, {}) if name not in accepted]


def _moeut_config(setup: Setup, num_mlp_experts: int, **levels):
    return moeut.MoEUTConfig(
        vocab_size=setup.vocab_size, hidden_size=setup.hidden_size, num_hidden_layers=setup.num_layers,
        group_size=max(1, setup.num_layers // 2), num_attention_heads=setup.num_heads,
        num_attention_experts=4, num_mlp_experts=num_mlp_experts, mlp_expert_size=setup.intermediate_size // 16,
        max_position_embeddings=setup.seq_len, **levels,
    )  # fmt: skip


def sweep_base_configs(setup: Setup, families: tuple[str, ...]) -> dict[str, Any]:
    """Per family, a function level-overrides -> config. The MoEs keep the parameters matched to UoE (top-2 of 8,
    as the main comparison); the MoEUT baseline's number of MLP experts is solved likewise (its layers are shared
    two by two, so it spends the parameters on more, smaller experts: width intermediate/16)."""
    from transformers import LlamaConfig  # noqa: PLC0415

    from uoe import UoEConfig  # noqa: PLC0415

    builders: dict[str, Any] = {}
    base = build_configs(setup, tuple(f for f in families if f in MOE_BASELINES) + ("uoe_union",))
    target = count_parameters(base["uoe_union"])
    for family in families:
        if family == "llama":
            builders[family] = lambda o: LlamaConfig(**{**_common(setup), "num_key_value_heads": setup.num_heads, **o})
        elif family in MOE_BASELINES:
            values = base[family].to_dict()
            builders[family] = lambda o, values=values: config_from_dict({**values, **o})
        elif family == "moeut":
            at_1, at_2 = (count_parameters(_moeut_config(setup, n, mlp_top_k=1)) for n in (1, 2))
            experts = max(8, round(1 + (target - at_1) / (at_2 - at_1)))
            builders[family] = lambda o, experts=experts: _moeut_config(setup, experts, **o)
        else:
            values = {**base["uoe_union"].to_dict(), **UOE_VARIANT_FIELDS[family]}
            if "num_layer_groups" in values and values["num_layer_groups"] is None:
                values["num_layer_groups"] = max(1, setup.num_layers // 2)
            builders[family] = lambda o, values=values: UoEConfig.from_dict({**values, **o})
    return builders


def run_point(name: str, config, setup: Setup, seed: int, data_path: Path, work_dir: Path, plan: SweepPlan,
              timeout: float) -> dict[str, Any]:  # fmt: skip
    """One training run of the sweep: in a fresh process (peak RSS is its own), or here with `plan.in_process`."""
    if not plan.in_process:
        return run_worker(name, config, setup, seed, data_path, work_dir, timeout)
    try:
        return train_and_evaluate(name, config, setup, seed, data_path, measure=False)
    except Exception as error:  # noqa: BLE001  (a failing model is reported, the sweep goes on)
        return {"model": name, "seed": seed, "status": f"failed: {type(error).__name__}: {error}"}


def sweep_main(args: argparse.Namespace, command: str) -> dict[str, Any]:
    """Choose each family's learning rate on the grid, then train every (family, level, seed)."""
    wall_start, load_start = time.perf_counter(), os.getloadavg()
    plan = dataclasses.replace(SWEEP_QUICK if args.quick else SWEEP_FULL)
    plan.setup = dataclasses.replace(plan.setup)
    if args.max_steps is not None:
        plan.setup.max_steps = args.max_steps
    if args.tokens is not None:
        plan.setup.max_steps = max(1, args.tokens // (plan.setup.batch_size * plan.setup.seq_len))
    if args.eval_blocks is not None:
        plan.setup.eval_blocks = args.eval_blocks
    if args.seeds_given:
        plan.seeds = args.seeds
    if args.in_process:
        plan.in_process = True
    setup = plan.setup
    setup.warmup_steps = min(setup.warmup_steps, max(1, setup.max_steps // 10))
    work_dir = Path(args.work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    print(f"[sweep] {'quick' if args.quick else 'full'}: {plan}", flush=True)
    data_path, data_info = prepare_data(work_dir, setup)

    families, skipped = [], {}
    for family in args.families:
        missing = missing_uoe_fields(family)
        if missing:
            skipped[family] = f"skipped: UoEConfig does not accept {', '.join(missing)} yet"
            print(f"[sweep] {family}: {skipped[family]}", flush=True)
        else:
            families.append(family)
    builders = sweep_base_configs(setup, tuple(families))
    points = {f: [(label, builders[f](o)) for label, o in sweep_levels(f, setup)] for f in families}

    lr_search, runs = {}, []
    for family in families:  # the learning rate: argmin of validation perplexity on a short run, middle level
        label, config = points[family][len(points[family]) // 2]
        short = dataclasses.replace(setup, max_steps=plan.lr_steps, warmup_steps=max(1, plan.lr_steps // 10))
        results = {}
        for lr in plan.lr_grid:
            run = run_point(f"{family}:{label}", config, dataclasses.replace(short, learning_rate=lr), 0, data_path,
                            work_dir, plan, args.run_timeout)  # fmt: skip
            results[repr(lr)] = run.get("validation_perplexity") if run["status"] == "ok" else None
            print(f"[sweep] lr search {family} {label} lr {lr:g}: {results[repr(lr)]}", flush=True)
        finished = {lr: ppl for lr, ppl in results.items() if ppl is not None and math.isfinite(ppl)}
        chosen = float(min(finished, key=finished.get)) if finished else None
        lr_search[family] = {"level": label, "steps": plan.lr_steps, "seed": 0, "perplexity": results, "chosen": chosen}

    for seed in plan.seeds:
        for family in families:
            lr = lr_search[family]["chosen"]
            for label, config in points[family]:
                name = f"{family}:{label}"
                if lr is None:
                    runs.append({"model": name, "seed": seed, "status": "failed: every learning rate failed"})
                    continue
                run = run_point(name, config, dataclasses.replace(setup, learning_rate=lr), seed, data_path, work_dir,
                                plan, args.run_timeout)  # fmt: skip
                run.update(family=family, level=label)
                runs.append(run)
                done = f"val ppl {run['validation_perplexity']:.2f}" if run["status"] == "ok" else run["status"]
                print(f"[sweep] {name} seed {seed} lr {lr:g}: {done}", flush=True)

    record = {
        "command": command, "mode": "sweep_quick" if args.quick else "sweep", "setup": dataclasses.asdict(setup),
        "plan": {"seeds": list(plan.seeds), "lr_grid": list(plan.lr_grid), "lr_steps": plan.lr_steps,
                 "in_process": plan.in_process},
        "environment": environment(), "load_average": {"start": load_start, "end": os.getloadavg()},
        "data": data_info, "wall_seconds": time.perf_counter() - wall_start, "families": list(families),
        "skipped": skipped, "lr_search": lr_search,
        "points": {f"{f}:{label}": {"family": f, "level": label, "config": c.to_dict()} for f in families
                   for label, c in points[f]},
        "runs": runs,
    }  # fmt: skip
    return write_sweep_reports(record, Path(args.plot), Path(args.results_md), Path(args.output))


def pareto_frontier(points: dict[str, dict[str, Any]]) -> list[str]:
    """The lower envelope of (active FLOPs, mean perplexity): the points no cheaper-or-equal point beats, by FLOPs."""
    ordered = sorted(points, key=lambda n: (points[n]["flops_analytic"], points[n]["perplexity_mean"]))
    frontier, best = [], math.inf
    for name in ordered:
        if points[name]["perplexity_mean"] < best:
            frontier.append(name)
            best = points[name]["perplexity_mean"]
    return frontier


def frontier_at(curve: list[tuple[float, float]], flops: float, top: float) -> float | None:
    """A frontier (FLOPs ascending, perplexity descending) read at a budget of `flops`: linear in log FLOPs between
    its points; past its last point up to `top` (the family's costliest point) its best perplexity (a costlier
    level of the family did no better); None below its cheapest point or above `top` (no extrapolation)."""
    if not curve or flops < curve[0][0] * (1 - 1e-9) or flops > top * (1 + 1e-9):
        return None
    for (f0, p0), (f1, p1) in zip(curve, curve[1:], strict=False):
        if f0 <= flops <= f1:
            return p0 + (p1 - p0) * (math.log(flops) - math.log(f0)) / (math.log(f1) - math.log(f0))
    return curve[-1][1]


def summarize_sweep(record: dict[str, Any]) -> dict[str, Any]:
    """Per point: mean and spread over seeds; per family: its frontier; the claim at common FLOP levels."""
    points = {}
    for name, info in record["points"].items():
        mine = [r for r in record["runs"] if r["model"] == name]
        failed = [r for r in mine if r["status"] != "ok"]
        if failed or not mine:
            points[name] = {**info, "status": failed[0]["status"] if failed else "not run"}
            continue
        ppl = [r["validation_perplexity"] for r in mine]
        points[name] = {
            "family": info["family"], "level": info["level"], "status": "ok", "seeds": [r["seed"] for r in mine],
            "learning_rate": mine[0]["learning_rate"], "parameters": mine[0]["parameters"],
            "flops_analytic": mine[0]["flops_analytic"], "flops_counted": mine[0]["flops_counted"],
            "perplexity_mean": statistics.fmean(ppl), "perplexity_std": statistics.stdev(ppl) if len(ppl) > 1 else 0.0,
            "perplexity_min": min(ppl), "perplexity_max": max(ppl),
            "tokens_per_second": statistics.fmean(r["tokens_per_second"] for r in mine),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in mine),
        }  # fmt: skip
    frontiers = {}
    for family in record["families"]:
        ok = {n: p for n, p in points.items() if p["family"] == family and p["status"] == "ok"}
        frontiers[family] = pareto_frontier(ok)

    def curve(family: str) -> list[tuple[float, float]]:
        return [(points[n]["flops_analytic"], points[n]["perplexity_mean"]) for n in frontiers.get(family, [])]

    def top(family: str) -> float:
        return max(p["flops_analytic"] for p in points.values() if p["family"] == family and p["status"] == "ok")

    def best_of(group: tuple[str, ...], flops: float) -> tuple[str | None, float | None]:
        values = {f: frontier_at(curve(f), flops, top(f)) for f in group if frontiers.get(f)}
        values = {f: v for f, v in values.items() if v is not None}
        return (min(values, key=values.get), min(values.values())) if values else (None, None)

    claim = {"levels": []}
    spans = {g: [(curve(f)[0][0], top(f)) for f in group if frontiers.get(f)]
             for g, group in (("uoe", UOE_FAMILIES), ("moe", SWEEP_MOE_FAMILIES))}  # fmt: skip
    if spans["uoe"] and spans["moe"]:
        low = max(min(lo for lo, _ in spans["uoe"]), min(lo for lo, _ in spans["moe"]))
        high = min(max(hi for _, hi in spans["uoe"]), max(hi for _, hi in spans["moe"]))
        claim["overlap"] = [low, high]
        if low <= high:
            count = 5 if high > low else 1
            for i in range(count):
                flops = low * (high / low) ** (i / max(count - 1, 1))
                uoe_family, uoe_ppl = best_of(UOE_FAMILIES, flops)
                moe_family, moe_ppl = best_of(SWEEP_MOE_FAMILIES, flops)
                if uoe_ppl is None or moe_ppl is None:
                    continue  # the envelope of one side has a gap here
                claim["levels"].append({
                    "flops": flops, "uoe_family": uoe_family, "uoe_perplexity": uoe_ppl, "moe_family": moe_family,
                    "moe_perplexity": moe_ppl, "difference": uoe_ppl - moe_ppl,
                    "relative": (uoe_ppl - moe_ppl) / moe_ppl,
                })  # fmt: skip
    return {"points": points, "frontiers": frontiers, "claim": claim}


def sweep_table(record: dict[str, Any], summary: dict[str, Any]) -> str:
    rows = [
        "| family | level | lr | parameters | active FLOPs/token (analytic) | val. perplexity (mean ± std, [min, max]) "
        "| train tokens/s (median step) | on frontier |",
        "|---|---|---:|---:|---:|---|---:|:-:|",
    ]
    for name, p in summary["points"].items():
        if p["status"] != "ok":
            rows.append(f"| {p['family']} | {p['level']} | – | – | – | **could not run**: {p['status']} | – | – |")
            continue
        mark = "✓" if name in summary["frontiers"][p["family"]] else ""
        rows.append(
            f"| {p['family']} | {p['level']} | {p['learning_rate']:g} | {p['parameters']:,} "
            f"| {p['flops_analytic'] / 1e6:.3f} M | {p['perplexity_mean']:.2f} ± {p['perplexity_std']:.2f} "
            f"[{p['perplexity_min']:.2f}, {p['perplexity_max']:.2f}] | {p['tokens_per_second']:,.0f} | {mark} |"
        )
    for family, reason in record["skipped"].items():
        rows.append(f"| {family} | – | – | – | – | {reason} | – | – |")
    return "\n".join(rows)


def sweep_claim_statement(summary: dict[str, Any]) -> str:
    """The paper's claim read off the frontiers: UoE's best envelope against the best MoE envelope at equal FLOPs."""
    claim = summary["claim"]
    if not claim["levels"]:
        overlap = claim.get("overlap")
        why = "no UoE or no MoE frontier" if overlap is None else "their frontiers' FLOP ranges do not overlap"
        return f"The paper's claim cannot be read off the frontiers: {why}."
    lines = [
        "Paper's claim, read off the frontiers at equal active FLOPs (each family's lower envelope: linear in "
        "log FLOPs between its frontier points, flat from its best point to its costliest level, no extrapolation "
        "beyond its levels; the best UoE variant against the best MoE, MoEUT included, at 5 log-spaced levels "
        "over the FLOPs both cover):",
        "",
        "| active FLOPs/token | best UoE (variant) | best MoE (family) | UoE − MoE perplexity |",
        "|---:|---|---|---:|",
    ]
    for level in claim["levels"]:
        lines.append(
            f"| {level['flops'] / 1e6:.3f} M | {level['uoe_perplexity']:.2f} ({level['uoe_family']}) "
            f"| {level['moe_perplexity']:.2f} ({level['moe_family']}) | {level['difference']:+.2f} "
            f"({100 * level['relative']:+.1f}%) |"
        )
    below = [lv for lv in claim["levels"] if lv["difference"] <= 0]
    above = [lv for lv in claim["levels"] if lv["difference"] > 0]
    lines.append("")
    if not above:
        lines.append(f"UoE's best frontier is at or below the best MoE's at all {len(below)} levels: the claim holds.")
    else:
        worst = max(above, key=lambda lv: lv["relative"])
        closest = collections_counter([lv["uoe_family"] for lv in above])
        above_levels = ", ".join(f"{lv['flops'] / 1e6:.3f} M" for lv in above)
        lines.append(
            f"UoE's best frontier is below the best MoE's at {len(below)} of {len(claim['levels'])} levels and above "
            f"at {above_levels} (by up to {worst['difference']:+.2f} "
            f"perplexity, {100 * worst['relative']:+.1f}%, at {worst['flops'] / 1e6:.3f} M); the UoE variant "
            f"closest there: {closest}."
        )
    return "\n".join(lines)


def collections_counter(names: list[str]) -> str:
    counts: dict[str, int] = {}
    for name in names:
        counts[name] = counts.get(name, 0) + 1
    return max(counts, key=counts.get)


def plot_frontier(record: dict[str, Any], summary: dict[str, Any], path: Path) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    figure, axis = plt.subplots(figsize=(9, 6))
    colors = plt.get_cmap("tab10")
    for i, family in enumerate(record["families"]):
        mine = [p for p in summary["points"].values() if p["family"] == family and p["status"] == "ok"]
        if not mine:
            continue
        style = "-" if family in UOE_FAMILIES else "--"
        flops = [p["flops_analytic"] / 1e6 for p in mine]
        means = [p["perplexity_mean"] for p in mine]
        spread = [[m - p["perplexity_min"] for m, p in zip(means, mine, strict=True)],
                  [p["perplexity_max"] - m for m, p in zip(means, mine, strict=True)]]  # fmt: skip
        axis.errorbar(flops, means, yerr=spread, fmt="o", color=colors(i), capsize=3, alpha=0.8)
        front = [summary["points"][n] for n in summary["frontiers"][family]]
        axis.plot([p["flops_analytic"] / 1e6 for p in front], [p["perplexity_mean"] for p in front], style,
                  color=colors(i), marker="o", markersize=7, markerfacecolor="none", label=family)  # fmt: skip
    axis.set_xscale("log")
    axis.set_xlabel("analytic active forward FLOPs per token (M)")
    axis.set_ylabel("validation perplexity (mean over seeds; bars: min-max)")
    axis.set_title("compare_lm.py --sweep: frontiers (lower envelopes); solid: UoE variants, dashed: baselines")
    axis.grid(alpha=0.3, which="both")
    axis.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def sweep_section(record: dict[str, Any], summary: dict[str, Any], plot_link: str) -> str:
    env, setup, plan, data_info = record["environment"], record["setup"], record["plan"], record["data"]
    load = record["load_average"]
    lr_lines = [
        f"- {family}: " + ", ".join(
            f"{float(lr):g} → {'failed' if ppl is None else f'{ppl:.2f}'}" for lr, ppl in s["perplexity"].items()
        ) + f" ⇒ **{s['chosen']:g}**" if s["chosen"] is not None else f"- {family}: every learning rate failed"
        for family, s in record["lr_search"].items()
    ]  # fmt: skip
    lines = [
        SWEEP_SECTION_TITLE,
        "",
        f"Command: `{record['command']}` ({record['wall_seconds'] / 60:.1f} min wall time, finished {env['date']}).",
        f"Device: {env['cpu']}, {env['cores']} cores, torch threads {env['torch_threads']}, no GPU; load average "
        f"(1 min) {load['start'][0]:.2f} at start, {load['end'][0]:.2f} at end. Versions: torch {env['torch']}, "
        f"transformers {env['transformers']}, uoe {env['uoe']} (commit {env['git_commit']}).",
        "",
        f"Setup, identical for every run (as the LM comparison above, at a smaller budget): Shakespeare "
        f"({data_info['train_tokens']:,} training tokens), BPE {setup['vocab_size']}, blocks of {setup['seq_len']}, "
        f"batch {setup['batch_size']}, {setup['max_steps']} steps "
        f"({setup['max_steps'] * setup['batch_size'] * setup['seq_len']:,} tokens), AdamW (betas 0.9/0.95, weight "
        f"decay {setup['weight_decay']}), warmup {setup['warmup_steps']} then cosine, clipping 1.0, float32; seeds "
        f"{', '.join(map(str, plan['seeds']))}. Width {setup['hidden_size']}, {setup['num_layers']} layers, "
        f"{setup['num_heads']} heads; the MoEs and UoE variants share the main comparison's matching rule.",
        "",
        "Balance at the same pressure: UoE's Switch loss (mean over its 2L routed blocks) is 1 at perfect balance, "
        "transformers' Mixtral / Qwen3-MoE loss (`load_balancing_loss_func`) is top_k there, so their coefficient "
        f"is divided by their top-k: every Switch loss is weighted {setup['aux_coef']} per unit of imbalance. "
        "DeepSeek-V3 keeps its aux-loss-free bias update; the MoEUT baseline its own entropy loss (0.01 MLP, "
        f"0.001 attention, as its code); `uoe_moeut` UoE's entropy balance loss x {setup['aux_coef']}.",
        "",
        f"Learning rate per family: the argmin of validation perplexity over the grid "
        f"{', '.join(f'{lr:g}' for lr in plan['lr_grid'])} on a {plan['lr_steps']}-step run (seed 0) at the "
        "family's middle level:",
        *lr_lines,
        "",
        "Families: "
        + "; ".join(f"`{f}`: {FAMILY_DESCRIPTIONS[f]}" for f in (*record["families"], *record["skipped"]))
        + ".",
        "",
        sweep_table(record, summary),
        "",
        sweep_claim_statement(summary),
        "",
        f"![frontier]({plot_link})",
        "",
        "FLOPs: analytic active forward FLOPs per token (`analytic_flops_per_token`, `uoe.estimate_flops_per_token` "
        "for UoE, causal attention, LM head included). Frontier: the points that no cheaper-or-equal point of the "
        "family beats. Tokens/s: the median training step. Raw results: `benchmarks/results/compare_lm_sweep.json`.",
    ]
    return "\n".join(lines) + "\n"


def write_sweep_reports(record: dict[str, Any], plot: Path, results_md: Path, output: Path | None) -> dict[str, Any]:
    summary = summarize_sweep(record)
    record["summary"] = summary
    print("\n" + sweep_table(record, summary) + "\n\n" + sweep_claim_statement(summary), flush=True)
    plot_frontier(record, summary, plot)
    section = sweep_section(record, summary, os.path.relpath(plot, results_md.parent))
    harness.replace_section(results_md, SWEEP_SECTION_TITLE, section.removeprefix(SWEEP_SECTION_TITLE))
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(record, indent=1))
    print(f"[sweep] wrote {results_md}, {plot}, {output} ({record['wall_seconds'] / 60:.1f} min)", flush=True)
    return record


# ---------------------------------------------------------------------------------------------------------------------
# 7. Command line
# ---------------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny models and data (a few minutes on 2 CPU cores)")
    parser.add_argument(
        "--sweep", action="store_true", help="the frontier sweep: every family at 3 compute levels (see section 6)"
    )
    parser.add_argument("--families", help=f"--sweep: comma-separated subset of {SWEEP_FAMILIES}")
    parser.add_argument("--in_process", action="store_true", help="--sweep: train in this process (quick default)")
    parser.add_argument("--models", default=",".join(MODEL_NAMES), help=f"comma-separated subset of {MODEL_NAMES}")
    parser.add_argument("--seeds", help="comma-separated integer seeds (>= 2 for a spread; default 0,1)")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--max_steps", type=int, help="training steps per run (default: the mode's)")
    budget.add_argument("--tokens", type=int, help="training tokens per run (rounded down to whole batches)")
    parser.add_argument("--eval_blocks", type=int, help="validation blocks (default: the mode's)")
    parser.add_argument("--output", help="raw JSON (default results/compare_lm.json, --sweep compare_lm_sweep.json)")
    parser.add_argument("--plot", help="PNG (default compare_lm_loss.png, --sweep compare_lm_frontier.png)")
    parser.add_argument("--results_md", default=str(BENCHMARKS / "RESULTS.md"), help="markdown file to update")
    parser.add_argument("--work_dir", default=str(ROOT / "runs" / "compare_lm"), help="data cache and worker files")
    parser.add_argument("--run_timeout", type=float, default=1800, help="seconds before a single run is abandoned")
    parser.add_argument(
        "--from_json", help="re-write the table, PNG and RESULTS.md section from a saved JSON, without training"
    )
    parser.add_argument("--_worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.output = args.output or str(
        BENCHMARKS / "results" / ("compare_lm_sweep.json" if args.sweep else "compare_lm.json")
    )
    args.plot = args.plot or str(BENCHMARKS / ("compare_lm_frontier.png" if args.sweep else "compare_lm_loss.png"))
    args.seeds_given = args.seeds is not None
    args.seeds = args.seeds or "0,1"
    if args._worker or args.from_json:
        return args
    if args.families is not None and not args.sweep:
        parser.error("--families: only with --sweep")
    families = tuple(f.strip() for f in (args.families or ",".join(SWEEP_FAMILIES)).split(",") if f.strip())
    unknown = [f for f in families if f not in SWEEP_FAMILIES]
    if unknown or not families:
        parser.error(f"--families: unknown family(s) {unknown or families}; allowed: {', '.join(SWEEP_FAMILIES)}")
    args.families = tuple(dict.fromkeys(families))

    models = tuple(m.strip() for m in args.models.split(",") if m.strip())
    unknown = [m for m in models if m not in MODEL_NAMES]
    if unknown or not models:
        parser.error(f"--models: unknown model(s) {unknown or models}; allowed: {', '.join(MODEL_NAMES)}")
    args.models = tuple(dict.fromkeys(models))
    try:
        args.seeds = tuple(dict.fromkeys(int(s) for s in args.seeds.split(",") if s.strip()))
    except ValueError:
        parser.error(f"--seeds: expected comma-separated integers, got {args.seeds!r}")
    if not args.seeds:
        parser.error("--seeds: give at least one seed")
    for flag in ("max_steps", "tokens", "eval_blocks"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            parser.error(f"--{flag}: must be an integer >= 1, got {getattr(args, flag)}")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args._worker:
        worker_main(Path(args._worker))
        return {}
    if args.from_json:
        record = json.loads(Path(args.from_json).read_text())
        if record["mode"].startswith("sweep"):
            return write_sweep_reports(record, Path(args.plot), Path(args.results_md), Path(args.output))
        return write_reports(record, Path(args.plot), Path(args.results_md), Path(args.output))
    command = shlex.join([".venv/bin/python", "benchmarks/compare_lm.py", *(sys.argv[1:] if argv is None else argv)])
    if args.sweep:
        return sweep_main(args, command)
    wall_start, load_start = time.perf_counter(), os.getloadavg()
    setup = dataclasses.replace(QUICK if args.quick else FULL)
    if args.max_steps is not None:
        setup.max_steps = args.max_steps
    if args.tokens is not None:
        setup.max_steps = max(1, args.tokens // (setup.batch_size * setup.seq_len))
    if args.eval_blocks is not None:
        setup.eval_blocks = args.eval_blocks
    setup.warmup_steps = min(setup.warmup_steps, max(1, setup.max_steps // 10))

    work_dir = Path(args.work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    print(f"[compare_lm] {'quick' if args.quick else 'full'} mode: {setup}", flush=True)
    data_path, data_info = prepare_data(work_dir, setup)
    print(f"[compare_lm] data: {data_info}", flush=True)
    configs = build_configs(setup, args.models)
    for name, config in configs.items():
        print(f"[compare_lm] {name}: {count_parameters(config):,} parameters, "
              f"{analytic_flops_per_token(config, setup.seq_len) / 1e6:.3f} M active FLOPs/token", flush=True)  # fmt: skip

    runs = []
    for seed in args.seeds:  # seed-major, so a stopped run still has every model for the first seed
        for name in args.models:
            result = run_worker(name, configs[name], setup, seed, data_path, work_dir, args.run_timeout)
            runs.append(result)
            if result["status"] == "ok":
                print(f"[compare_lm] {name} seed {seed}: val ppl {result['validation_perplexity']:.2f}, "
                      f"{result['tokens_per_second']:,.0f} tokens/s (median step), {result['train_seconds']:.0f} s, "
                      f"peak RSS Δ {result['peak_rss_mb']:.0f} MB, load {result['load_average_start']:.1f}"
                      f"->{result['load_average_end']:.1f}", flush=True)  # fmt: skip
            else:
                print(f"[compare_lm] {name} seed {seed}: {result['status']}", flush=True)

    record = {
        "command": command, "mode": "quick" if args.quick else "full", "setup": dataclasses.asdict(setup),
        "environment": environment(), "load_average": {"start": load_start, "end": os.getloadavg()},
        "data": data_info, "wall_seconds": time.perf_counter() - wall_start,
        "configs": {name: config.to_dict() for name, config in configs.items()}, "runs": runs,
    }  # fmt: skip
    return write_reports(record, Path(args.plot), Path(args.results_md), Path(args.output))


def write_reports(record: dict[str, Any], plot: Path, results_md: Path, output: Path | None) -> dict[str, Any]:
    """Summarise the runs of `record`, print the table and write the PNG, the RESULTS.md section and the JSON."""
    setup = Setup(**record["setup"])
    summary = summarize(record["runs"], tuple(record["configs"]))
    record["summary"] = summary
    print("\n" + markdown_table(summary) + "\n\n" + claim_statement(summary), flush=True)
    plot_losses(summary, setup, plot)
    section = results_section(record, summary, setup)
    if plot.resolve() != (results_md.parent / "compare_lm_loss.png").resolve():  # keep the image link valid
        section = section.replace("(compare_lm_loss.png)", f"({os.path.relpath(plot, results_md.parent)})")
    harness.replace_section(results_md, SECTION_TITLE, section.removeprefix(SECTION_TITLE))
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(record, indent=1))
    print(f"[compare_lm] wrote {results_md}, {plot}, {output} ({record['wall_seconds'] / 60:.1f} min)", flush=True)
    return record


if __name__ == "__main__":
    main()
