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
(`baseline_flops.analytic_flops_per_token`; `uoe.estimate_flops_per_token` for UoE; causal attention averaging
(L+1)/2 keys per query; LM head included) and the FLOPs `FlopCounterMode` counts in one forward of a training batch
with eager attention counted as the full L x L score matrix. The counter sees what the code runs: the MoE baselines'
experts compute only the routed tokens, so they count ~active FLOPs; UoE's gathered path (its CPU default) computes
only the selected (token, expert) pairs, its attention over each head's compacted token lists (padded to the
longest), and o_proj as one dense product.

Results: a table on stdout, a section of `benchmarks/RESULTS.md` (other sections are kept), loss curves in
`benchmarks/compare_lm_loss.png`, raw results in `benchmarks/results/compare_lm.json`.

The frontier sweep (every family at three compute levels) is `frontier_sweep.py`; `compare_lm.py --sweep` runs it.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402  (benchmarks/harness.py: what the benchmark scripts share)
from baseline_flops import analytic_flops_per_token  # noqa: E402
from harness import config_from_dict, count_parameters  # noqa: E402

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
    # "native": every model balances its load its own way (above). "entropy": Mixtral and Qwen3-MoE use the sigma-MoE
    # entropy balance loss instead of their Switch loss, computed here from their router logits exactly as UoE's
    # `router_balance_loss="entropy"` (the mean over the layers of sum_e p_e log p_e, p = the batch's mean softmax),
    # weighted by `aux_coef` (the recipe study's test of that component on a baseline)
    baseline_balance_loss: str = "native"

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


def common_fields(setup: Setup) -> dict[str, Any]:
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

    common, heads = common_fields(setup), setup.num_heads
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


def instantiate(config, device: str | torch.device = "cpu"):
    """The model of `config` with SDPA attention and, for the MoEs, eager experts (see EXPERTS_IMPLEMENTATION)."""
    if config.model_type in ("llama", "moeut_baseline"):
        return harness.instantiate(config, device)
    return harness.instantiate(config, device, experts_implementation=EXPERTS_IMPLEMENTATION)


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
    if entropy_balance(config, setup):
        return setup.aux_coef
    if kind in ("mixtral", "qwen3_moe") and setup.normalize_aux_by_top_k:
        return setup.aux_coef / config.num_experts_per_tok
    return setup.aux_coef


def entropy_balance(config, setup: Setup) -> bool:
    """Whether `config`'s model trains with the entropy balance loss in place of its own (`baseline_balance_loss`)."""
    if setup.baseline_balance_loss not in ("native", "entropy"):
        raise ValueError(f"`baseline_balance_loss` must be 'native' or 'entropy', got {setup.baseline_balance_loss!r}.")
    if setup.baseline_balance_loss == "native":
        return False
    if config.model_type not in ("mixtral", "qwen3_moe"):
        raise ValueError(
            "`baseline_balance_loss='entropy'` replaces the Switch loss of Mixtral and Qwen3-MoE only (UoE has "
            f"`router_balance_loss`, the MoEUT baseline its own entropy loss), got model_type {config.model_type!r}."
        )
    return True


def balance_loss(outputs, entropy: bool) -> torch.Tensor:
    """The balance loss the training adds: the model's own `aux_loss`, or with `entropy` the mean over the layers of
    the negative entropy of the batch's mean router softmax (from `outputs.router_logits`, one (tokens, experts)
    tensor per layer)."""
    if not entropy:
        return outputs.aux_loss
    import moeut  # noqa: PLC0415  (benchmarks/moeut.py: the MoEUT baseline's entropy of the mean)

    return torch.stack([moeut.negative_entropy_of_mean(logits) for logits in outputs.router_logits]).mean()


def match_expert_width(name: str, setup: Setup, target: int) -> int:
    """The integer per-expert width that brings the total parameters of `name` closest to `target`."""
    return harness.solve_width(lambda width: count_parameters(_config(name, setup, width)), target)


def build_configs(setup: Setup, names: tuple[str, ...] = MODEL_NAMES) -> dict[str, Any]:
    """The matched config of every model in `names` (the MoE baselines matched to UoE's parameter count)."""
    target = count_parameters(_config("uoe_union", setup))
    return {
        name: _config(name, setup, match_expert_width(name, setup, target) if name in MOE_BASELINES else None)
        for name in names
    }


# ---------------------------------------------------------------------------------------------------------------------
# 3. FLOPs per token that FlopCounterMode counts (the analytic ones: baseline_flops.py, uoe.flops)
# ---------------------------------------------------------------------------------------------------------------------


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
    data = torch.load(data_path)
    train_blocks = data["train"][: len(data["train"]) // setup.seq_len * setup.seq_len].view(-1, setup.seq_len)
    eval_blocks = validation_blocks(data["validation"], setup.seq_len, setup.eval_blocks)
    # The batch order depends on the seed only, so every model sees the same batches for a given seed.
    order = torch.randperm(len(train_blocks), generator=torch.Generator().manual_seed(seed))
    order = order.repeat(math.ceil(setup.max_steps * setup.batch_size / len(order)))
    size = setup.batch_size
    batches = (train_blocks[order[step * size : (step + 1) * size]] for step in range(setup.max_steps))
    harness.model_class(config.model_type)  # import the modeling module first: its import is not the model's memory
    baseline_rss, peak_was_reset = start_memory_measurement() if measure else (math.nan, False)

    torch.manual_seed(seed)
    model = instantiate(config)
    balancer = DeepseekBiasBalancer(model) if config.model_type == "deepseek_v3" else None
    with_aux = config.model_type in ("mixtral", "qwen3_moe", "uoe", "moeut_baseline")
    aux_weight, entropy = aux_loss_weight(config, setup), entropy_balance(config, setup)
    token_losses, aux_losses = [], []

    def loss_fn(model, inputs: dict, batch: torch.Tensor) -> torch.Tensor:
        outputs = model(**inputs, output_router_logits=True) if with_aux else model(**inputs)
        token_loss = F.cross_entropy(outputs.logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten())
        token_losses.append(token_loss.item())
        if not with_aux:
            return token_loss
        aux = balance_loss(outputs, entropy)
        aux_losses.append(aux.item())
        return token_loss + aux_weight * aux  # the same Switch-style pressure for all (aux_loss_weight)

    load_start = os.getloadavg()[0]
    run = harness.train(
        model, (({"input_ids": batch}, batch) for batch in batches), loss_fn, steps=setup.max_steps,
        lr=setup.learning_rate, weight_decay=setup.weight_decay, warmup_steps=setup.warmup_steps, betas=(0.9, 0.95),
        decay_matrices_only=True, after_step=balancer.step if balancer is not None else None,
    )  # fmt: skip
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
        "parameters": count_parameters(model),
        "flops_analytic": analytic_flops_per_token(config, setup.seq_len),
        "flops_analytic_full_attention": analytic_flops_per_token(config, setup.seq_len, attention="full"),
        "flops_counted": counted,
        "validation_loss": validation_loss,
        "validation_perplexity": math.exp(validation_loss),
        "validation_tokens": count,
        "learning_rate": setup.learning_rate,
        "train_seconds": run["seconds"],
        # The median step is robust to bursts of load from other processes; the wall-time mean is not.
        "tokens_per_second": setup.batch_size * setup.seq_len / statistics.median(run["step_seconds"]),
        "tokens_per_second_wall": setup.tokens / run["seconds"],
        "load_average_start": load_start,
        "load_average_end": load_end,
        "peak_rss_mb": peak_rss_mb() - baseline_rss,
        "baseline_rss_mb": baseline_rss,
        "peak_rss_reset": peak_was_reset,
        "train_losses": token_losses,
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
        f"Command: `{command}` ({wall / 60:.1f} min wall time, finished {env['date_utc']}).",
        f"Device: {env['cpu']}, {env['cpu_count']} cores, torch threads {env['torch_threads']}, no GPU.",
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
# 6. Command line
# ---------------------------------------------------------------------------------------------------------------------


def add_run_arguments(parser: argparse.ArgumentParser, output: str, plot: str) -> None:
    """The arguments of a run that this script and frontier_sweep.py share; `output` and `plot`: default file names."""
    parser.add_argument("--quick", action="store_true", help="tiny models and data (a few minutes on 2 CPU cores)")
    parser.add_argument("--seeds", default="0,1", help="comma-separated integer seeds (>= 2 for a spread; default 0,1)")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--max_steps", type=int, help="training steps per run (default: the mode's)")
    budget.add_argument("--tokens", type=int, help="training tokens per run (rounded down to whole batches)")
    parser.add_argument("--eval_blocks", type=int, help="validation blocks (default: the mode's)")
    parser.add_argument("--output", default=str(BENCHMARKS / "results" / output), help=f"raw JSON (default {output})")
    parser.add_argument("--plot", default=str(BENCHMARKS / plot), help=f"PNG (default {plot})")
    parser.add_argument("--results_md", default=str(BENCHMARKS / "RESULTS.md"), help="markdown file to update")
    parser.add_argument("--work_dir", default=str(ROOT / "runs" / "compare_lm"), help="data cache and worker files")
    parser.add_argument("--run_timeout", type=float, default=1800, help="seconds before a single run is abandoned")
    parser.add_argument(
        "--from_json", help="re-write the table, PNG and RESULTS.md section from a saved JSON, without training"
    )


def check_run_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Seeds as a tuple, budgets >= 1; a bad value exits with a message naming its argument."""
    try:
        args.seeds = tuple(dict.fromkeys(int(s) for s in args.seeds.split(",") if s.strip()))
    except ValueError:
        parser.error(f"--seeds: expected comma-separated integers, got {args.seeds!r}")
    if not args.seeds:
        parser.error("--seeds: give at least one seed")
    for flag in ("max_steps", "tokens", "eval_blocks"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            parser.error(f"--{flag}: must be an integer >= 1, got {getattr(args, flag)}")


def apply_budget(setup: Setup, args: argparse.Namespace) -> Setup:
    """A copy of `setup` with the command line's budget; the warm-up at most a tenth of the steps."""
    setup = dataclasses.replace(setup)
    if args.max_steps is not None:
        setup.max_steps = args.max_steps
    if args.tokens is not None:
        setup.max_steps = max(1, args.tokens // (setup.batch_size * setup.seq_len))
    if args.eval_blocks is not None:
        setup.eval_blocks = args.eval_blocks
    setup.warmup_steps = min(setup.warmup_steps, max(1, setup.max_steps // 10))
    return setup


def read_record(path: str, sweep: bool) -> dict[str, Any]:
    """A JSON record this script (`sweep=False`) or frontier_sweep.py saved, to re-report."""
    record = json.loads(Path(path).read_text())
    if record["mode"].startswith("sweep") != sweep:
        script = "frontier_sweep.py" if record["mode"].startswith("sweep") else "compare_lm.py"
        raise SystemExit(f"--from_json: {path} is a record of {script}; re-report it with that script.")
    env = record["environment"]  # records from before `harness.environment` name two of its fields differently
    env.setdefault("date_utc", env.get("date"))
    env.setdefault("cpu_count", env.get("cores"))
    return record


def sweep_arguments(argv: list[str]) -> list[str] | None:
    """The arguments for frontier_sweep.py when `argv` asks for the sweep the former way (`compare_lm.py --sweep`)."""
    return [arg for arg in argv if arg != "--sweep"] if "--sweep" in argv else None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    argv = sys.argv[1:] if argv is None else list(argv)
    if sweep_arguments(argv) is not None:
        import frontier_sweep  # noqa: PLC0415  (it imports this module)

        return frontier_sweep.parse_args(sweep_arguments(argv))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_arguments(parser, output="compare_lm.json", plot="compare_lm_loss.png")
    parser.add_argument("--models", default=",".join(MODEL_NAMES), help=f"comma-separated subset of {MODEL_NAMES}")
    parser.add_argument("--sweep", action="store_true", help="run frontier_sweep.py with the other arguments")
    parser.add_argument("--families", help="with --sweep: the frontier sweep's families")
    parser.add_argument("--_worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._worker or args.from_json:
        return args
    if args.families is not None:
        parser.error("--families: only with --sweep")
    models = tuple(m.strip() for m in args.models.split(",") if m.strip())
    unknown = [m for m in models if m not in MODEL_NAMES]
    if unknown or not models:
        parser.error(f"--models: unknown model(s) {unknown or models}; allowed: {', '.join(MODEL_NAMES)}")
    args.models = tuple(dict.fromkeys(models))
    check_run_arguments(parser, args)
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else list(argv)
    if sweep_arguments(argv) is not None:
        import frontier_sweep  # noqa: PLC0415  (it imports this module)

        return frontier_sweep.main(sweep_arguments(argv))
    args = parse_args(argv)
    if args._worker:
        worker_main(Path(args._worker))
        return {}
    if args.from_json:
        return write_reports(read_record(args.from_json, sweep=False), Path(args.plot), Path(args.results_md),
                             Path(args.output))  # fmt: skip
    env, wall_start = harness.environment("compare_lm.py", argv), time.perf_counter()
    setup = apply_budget(QUICK if args.quick else FULL, args)
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
        "command": env["command"], "mode": "quick" if args.quick else "full", "setup": dataclasses.asdict(setup),
        "environment": env, "load_average": {"start": env["loadavg_start"], "end": os.getloadavg()},
        "data": data_info, "wall_seconds": time.perf_counter() - wall_start,
        "configs": {name: config.to_dict() for name, config in configs.items()}, "runs": runs,
    }  # fmt: skip
    return write_reports(record, Path(args.plot), Path(args.results_md), Path(args.output))


def write_reports(record: dict[str, Any], plot: Path, results_md: Path, output: Path) -> dict[str, Any]:
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
    harness.write_json(output, record, indent=1)
    print(f"[compare_lm] wrote {results_md}, {plot}, {output} ({record['wall_seconds'] / 60:.1f} min)", flush=True)
    return record


if __name__ == "__main__":
    main()
