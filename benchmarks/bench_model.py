#!/usr/bin/env python
"""Whole-model speed: does UoE's sparsity pay off in wall-clock against the dense model of the same shape?

    .venv/bin/python benchmarks/bench_model.py --quick   # tiny shapes, 1 repeat (the test; seconds)
    .venv/bin/python benchmarks/bench_model.py           # the three default shapes, 5 repeats (minutes on 2 CPU cores)
    .venv/bin/python benchmarks/bench_model.py --shapes main,512:4:8/4:1376:8/2:4096:4x512 --backends masked

Shapes (`--shapes`, comma-separated preset names or `HIDDEN:LAYERS:HEADS/TOPK:INTERMEDIATE:EXPERTS/TOPK:VOCAB:BxT`):
`main` = the main job's model, `192:4:6/3:768:4/2:4096:16x256`; `d512` = `512:4:8/4:1376:8/2:4096:4x512`;
`d1024` = `1024:4:16/8:2752:8/2:4096:2x512`. Every model is SwiGLU, RMSNorm, RoPE, untied embeddings, no dropout,
one key/value head per query head, SDPA attention, built from its config with random weights (seed `--seed`).

Models per shape (`--models`, `--backends`):
- `llama`: `transformers.LlamaForCausalLM` with the dense shape: UoE at full routing computes exactly this model.
  It is the baseline of every ratio.
- `mixtral`: `transformers.MixtralForCausalLM` with the same hidden size, layers, heads and vocabulary, top-2 routing
  over `num_local_experts` = UoE's `num_mlp_experts`, and the expert width solved so that its *active parameters
  per token* equal UoE's as closely as an integer width allows (at least 1). Active parameters per token: every
  parameter a token's forward uses, i.e. UoE's q/k/v/o weights times attention_top_k / heads and its MLP expert
  weights times mlp_top_k / experts, Mixtral's expert weights times 2 / experts, everything else (routers,
  norms, embeddings, LM head, Mixtral's dense attention) in full; counted on the meta device, where they are linear
  in the width. Its experts run transformers' `grouped_mm` where the width allows it (the row stride of the
  `down_proj` must be a multiple of 16 bytes), else `eager` (`--mixtral_experts`).
- `uoe-<backend>`: `uoe.UoEForCausalLM` once per routing backend of `("auto", "masked", "gathered", "triton")`
  that `uoe.configuration_uoe.ROUTING_BACKENDS` offers and that can run here (`triton`: a CUDA device and Triton
  installed); the others are skipped with a printed note. `auto` is what a user gets by default (on CPU the gathered
  path, with decode steps and short sequences attending masked; on CUDA the kernels), `masked` computes every head
  and expert (the readable reference), `gathered` only the selected pairs everywhere, `triton` the kernels.

Measured per model, interleaved (after `--warmup` rounds, every repeat runs each model once in turn; the median over
`--repeats` is reported, with the range over the repeats as the spread):
- train: tokens/s of one training step on a `B x T` batch of random token ids: forward with labels, backward,
  `torch.optim.AdamW.step()`, `zero_grad` (train mode, no dropout, router aux losses off as in the configs);
- prefill: tokens/s of one forward of the same batch under `torch.inference_mode()` with `use_cache=True`;
- decode, for each batch size of `--decode_batches` and each mode of `--decode_modes`: after a prefill of a
  `batch x --decode_prompt` prompt, `--decode_tokens` greedy steps of one token each with the KV cache in a manual
  loop (argmax of the last logits fed back); tokens/s = batch x decode_tokens / time of the steps, and ms per step.
  Modes: `dynamic` (transformers' default `DynamicCache`, eager), `static` (a `StaticCache` of prompt + steps slots,
  eager), `compiled` (the static cache with the forward under `torch.compile(fullgraph=True, mode=--compile_mode)`,
  every model compiled alike; compilation happens in the warm-up round, which is untimed), `generate` (the whole
  `model.generate(max_new_tokens=decode_tokens, do_sample=False)` call, prefill included, default cache);
- peak memory of one training step (after the warm-up, untimed): on CUDA `torch.cuda.max_memory_allocated()` after
  `reset_peak_memory_stats()` minus the memory allocated before the step; on CPU the process RSS
  (`/proc/self/statm`) sampled every ~1 ms by a background thread during the step, peak minus the RSS just before
  it (after `gc.collect()` and glibc's `malloc_trim(0)`): what activations, gradients and temporaries add;
- analytic forward FLOPs per token at sequence T (a multiply-add = 2, LM head included, causal attention averaging
  (T+1)/2 keys): UoE's `uoe.estimate_flops_per_token(config, T).active`, Llama's = its `.dense`, Mixtral's
  `baseline_flops.analytic_flops_per_token` (projections, attention, router, 2 experts, LM head). The FLOPs ratio of
  UoE is `active / dense`.

Every ratio is against Llama: time ratio = model time / Llama time = Llama tokens/s / model tokens/s (below 1 =
faster than dense). On CUDA the device is synchronised before every timer read. Default dtype float32 on CPU,
bfloat16 on CUDA.

Results: a table per shape on stdout, the section `## Whole-model benchmark (bench_model.py, <CPU|CUDA>)` of
`benchmarks/RESULTS.md` (`--results_md`; other sections are kept), raw numbers in
`benchmarks/results/bench_model_<cpu|cuda>.json` (`--output`). `--quick` writes no RESULTS.md section unless
`--results_md` is given, and its JSON goes to `bench_model_<cpu|cuda>_quick.json`.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import dataclasses
import gc
import inspect
import os
import statistics
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402  (benchmarks/harness.py)
from baseline_flops import analytic_flops_per_token  # noqa: E402

MODELS = ("llama", "mixtral", "uoe")
BACKENDS = ("auto", "masked", "gathered", "triton")
DECODE_MODES = ("dynamic", "static", "compiled", "generate")
MIXTRAL_TOP_K = 2
SECTION_PREFIX = "## Whole-model benchmark (bench_model.py"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclasses.dataclass(frozen=True)
class Shape:
    """One model shape and its training/prefill batch."""

    name: str
    hidden: int
    layers: int
    heads: int
    attention_top_k: int
    intermediate: int
    experts: int
    mlp_top_k: int
    vocab: int
    batch: int
    seq: int

    @property
    def spec(self) -> str:
        return (
            f"{self.hidden}:{self.layers}:{self.heads}/{self.attention_top_k}:{self.intermediate}:"
            f"{self.experts}/{self.mlp_top_k}:{self.vocab}:{self.batch}x{self.seq}"
        )

    def describe(self) -> str:
        return (
            f"hidden {self.hidden}, {self.layers} layers, {self.heads} heads ({self.attention_top_k} selected), "
            f"intermediate {self.intermediate} in {self.experts} MLP experts ({self.mlp_top_k} selected), "
            f"vocab {self.vocab}, batch {self.batch} x {self.seq} tokens"
        )


def parse_shape(text: str, name: str | None = None) -> Shape:
    """`HIDDEN:LAYERS:HEADS/TOPK:INTERMEDIATE:EXPERTS/TOPK:VOCAB:BATCHxSEQ`, e.g. `192:4:6/3:768:4/2:4096:16x256`."""
    try:
        hidden, layers, heads, intermediate, experts, vocab, batch_seq = text.strip().split(":")
        heads, attention_top_k = heads.split("/")
        experts, mlp_top_k = experts.split("/")
        batch, seq = batch_seq.lower().split("x")
        values = [int(v) for v in (hidden, layers, heads, attention_top_k, intermediate, experts, mlp_top_k, vocab)]
        values += [int(batch), int(seq)]
    except ValueError:
        raise ValueError(
            f"--shapes: {text!r} is neither a preset ({', '.join(PRESETS)}) nor a shape "
            "HIDDEN:LAYERS:HEADS/TOPK:INTERMEDIATE:EXPERTS/TOPK:VOCAB:BATCHxSEQ (e.g. 192:4:6/3:768:4/2:4096:16x256)"
        ) from None
    if any(v < 1 for v in values):
        raise ValueError(f"--shapes: every number of {text!r} must be >= 1.")
    shape = Shape(name or f"d{values[0]}", *values)
    uoe_config(shape, 1)  # UoEConfig names the field that is invalid (heads not dividing hidden, top-k > experts...)
    return shape


PRESETS = {
    "main": Shape("main", 192, 4, 6, 3, 768, 4, 2, 4096, 16, 256),
    "d512": Shape("d512", 512, 4, 8, 4, 1376, 8, 2, 4096, 4, 512),
    "d1024": Shape("d1024", 1024, 4, 16, 8, 2752, 8, 2, 4096, 2, 512),
    "tiny": Shape("tiny", 64, 2, 4, 2, 256, 4, 2, 512, 2, 64),
    "tiny8": Shape("tiny8", 96, 2, 6, 3, 384, 8, 2, 512, 2, 64),
}
DEFAULT_SHAPES, QUICK_SHAPES = "main,d512,d1024", "tiny,tiny8"


def parse_shapes(text: str) -> list[Shape]:
    shapes = []
    for part in (p.strip() for p in text.split(",")):
        if part:
            shapes.append(PRESETS[part] if part in PRESETS else parse_shape(part))
    if not shapes:
        raise ValueError("--shapes: give at least one shape.")
    names = [s.name for s in shapes]
    if len(set(names)) != len(names):
        raise ValueError(f"--shapes: two shapes have the same name ({', '.join(names)}).")
    return shapes


# ---------------------------------------------------------------------------------------------------------------------
# Configs, the Mixtral width rule, FLOPs
# ---------------------------------------------------------------------------------------------------------------------


def _common(shape: Shape, max_positions: int) -> dict[str, Any]:
    return dict(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
        attention_dropout=0.0,
        rms_norm_eps=1e-6,
    )


def llama_config(shape: Shape, max_positions: int):
    from transformers import LlamaConfig  # noqa: PLC0415

    return LlamaConfig(
        **_common(shape, max_positions), num_key_value_heads=shape.heads, intermediate_size=shape.intermediate,
        hidden_act="silu", attention_bias=False, mlp_bias=False,
    )  # fmt: skip


def mixtral_config(shape: Shape, max_positions: int, expert_width: int):
    from transformers import MixtralConfig  # noqa: PLC0415

    return MixtralConfig(
        **_common(shape, max_positions), num_key_value_heads=shape.heads, intermediate_size=expert_width,
        num_local_experts=shape.experts, num_experts_per_tok=MIXTRAL_TOP_K, router_jitter_noise=0.0,
        output_router_logits=False, hidden_act="silu",
    )  # fmt: skip


def uoe_config(shape: Shape, max_positions: int, routing_backend: str = "auto"):
    from uoe import UoEConfig  # noqa: PLC0415

    return UoEConfig(
        **_common(shape, max_positions), attention_top_k=shape.attention_top_k, intermediate_size=shape.intermediate,
        num_mlp_experts=shape.experts, mlp_top_k=shape.mlp_top_k, mlp_type="swiglu", norm_type="rmsnorm",
        position_embedding_type="rope", output_router_logits=False, routing_backend=routing_backend,
    )  # fmt: skip


def active_parameters(config) -> float:
    """Parameters a token's forward uses (see the module docstring), counted on the meta device."""
    total = 0.0
    for name, parameter in harness.instantiate(config, "meta").named_parameters():
        share = 1.0
        if config.model_type == "uoe":
            if ".self_attn." in name and name.split(".")[-2] in ("q_proj", "k_proj", "v_proj", "o_proj"):
                share = config.attention_top_k / config.num_attention_heads
            elif ".mlp.experts." in name:
                share = config.mlp_top_k / config.num_mlp_experts
        elif config.model_type == "mixtral" and ".mlp.experts." in name:
            share = config.num_experts_per_tok / config.num_local_experts
        total += parameter.numel() * share
    return total


def solve_mixtral_width(shape: Shape, max_positions: int, target: float) -> int:
    """The integer expert width (>= 1) whose Mixtral active parameters per token are closest to `target`."""
    return harness.solve_width(lambda width: active_parameters(mixtral_config(shape, max_positions, width)), target)


def mixtral_experts_implementation(choice: str, width: int, dtype: torch.dtype) -> str:
    """`grouped_mm` (transformers' default) needs 16-byte aligned strides: the expert width times the element size."""
    if choice != "auto":
        return choice
    return "grouped_mm" if width * torch.tensor([], dtype=dtype).element_size() % 16 == 0 else "eager"


def routing_backends(requested: list[str], device: torch.device) -> tuple[list[tuple[str, str]], list[str]]:
    """(label, `routing_backend` value) of every requested backend that can run here, and a note per skipped one."""
    import uoe.configuration_uoe as configuration  # noqa: PLC0415
    from uoe.kernels_common import triton_importable  # noqa: PLC0415

    allowed = tuple(configuration.ROUTING_BACKENDS)
    runnable, notes = [], []
    for label in requested:
        value = label if label in allowed else None
        if value is None:
            notes.append(
                f"uoe-{label}: skipped, `routing_backend={label!r}` is not in "
                f"uoe.configuration_uoe.ROUTING_BACKENDS {allowed}."
            )
        elif label == "triton" and not (device.type == "cuda" and triton_importable()):
            reason = "Triton is not installed" if device.type == "cuda" else f"the device is {device.type}, not CUDA"
            notes.append(f"uoe-triton: skipped, {reason}.")
        else:
            runnable.append((label, value))
    return runnable, notes


# ---------------------------------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def rss_bytes() -> int | None:
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def release_memory(device: torch.device) -> None:
    """Collect garbage and hand freed heap back to the OS, so the RSS before a step is the live memory."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        return
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class RssSampler:
    """The largest RSS seen by a background thread sampling `/proc/self/statm` every `interval` seconds."""

    def __init__(self, interval: float = 0.001):
        self.interval, self.before, self.peak = interval, None, None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            value = rss_bytes()
            if value is not None:
                self.peak = max(self.peak or 0, value)
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self.before = self.peak = rss_bytes()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        value = rss_bytes()
        if value is not None:
            self.peak = max(self.peak or 0, value)


def output_cache(outputs) -> Any:
    """The KV cache an output carries, under transformers' field name (`cache` from 5.24, else `past_key_values`)."""
    from uoe.configuration_uoe import CACHE_FIELD  # noqa: PLC0415

    for field in dict.fromkeys((CACHE_FIELD, "cache", "past_key_values")):
        cache = getattr(outputs, field, None)
        if cache is not None:
            return cache
    raise RuntimeError(f"{type(outputs).__name__} carries no cache (neither `cache` nor `past_key_values`).")


def cache_argument(model) -> str:
    """The forward's name for the KV cache: `cache` where it has one (transformers >= 5.24, UoE), else
    `past_key_values` (Llama in 5.24 still accepts it, with a deprecation warning)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@dataclasses.dataclass
class Entry:
    """One model under test and its state between measurements."""

    name: str
    description: str
    config: Any
    extra: dict[str, Any]
    model: Any = None
    optimizer: Any = None
    cache_arg: str = "cache"
    times: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    compiled: dict[Any, Any] = dataclasses.field(default_factory=dict)
    memory: dict[str, Any] = dataclasses.field(default_factory=dict)
    error: str | None = None


def build(entry: Entry, device: torch.device, dtype: torch.dtype, seed: int) -> None:
    torch.manual_seed(seed)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if "experts_implementation" in entry.extra:
        kwargs["experts_implementation"] = entry.extra["experts_implementation"]
    entry.model = harness.instantiate(entry.config, device, **kwargs)
    entry.extra.setdefault("experts_implementation", getattr(entry.model.config, "_experts_implementation", None))
    entry.cache_arg = entry.extra["cache_argument"] = cache_argument(entry.model)
    entry.optimizer = torch.optim.AdamW(entry.model.parameters(), lr=1e-4)


def train_step(entry: Entry, ids: torch.Tensor) -> torch.Tensor:
    entry.model.train()
    loss = entry.model(input_ids=ids, labels=ids).loss
    loss.backward()
    entry.optimizer.step()
    entry.optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def prefill(entry: Entry, ids: torch.Tensor) -> None:
    entry.model.eval()
    with torch.inference_mode():
        entry.model(input_ids=ids, use_cache=True)


def decode_name(mode: str, batch: int) -> str:
    return f"decode_{mode}_b{batch}"


def measurement_names(args: argparse.Namespace) -> list[str]:
    return ["train", "prefill", *(decode_name(m, b) for b in args.decode_batch_list for m in args.decode_mode_list)]


def decode(entry: Entry, prompt: torch.Tensor, steps: int, device: torch.device, mode: str, compile_mode) -> float:
    """Seconds of `steps` greedy one-token steps with the KV cache, after an (untimed) prefill of `prompt`; for
    `generate`, seconds of the whole call."""
    from transformers import StaticCache  # noqa: PLC0415

    model = entry.model.eval()
    if mode == "generate":
        with torch.inference_mode():
            synchronize(device)
            start = time.perf_counter()
            out = model.generate(prompt, max_new_tokens=steps, min_new_tokens=steps, do_sample=False)
            synchronize(device)
            seconds = time.perf_counter() - start
        if out.shape[1] != prompt.shape[1] + steps:
            raise RuntimeError(f"generate returned {out.shape[1]} tokens, expected {prompt.shape[1] + steps}.")
        return seconds
    forward = model
    cache = None
    if mode in ("static", "compiled"):
        cache = StaticCache(config=model.config, max_cache_len=prompt.shape[1] + steps)
        if mode == "compiled":
            key = ("compiled", prompt.shape[0])
            if key not in entry.compiled:  # one compiled forward per batch size, built in the warm-up round
                entry.compiled[key] = torch.compile(model.forward, fullgraph=True, mode=compile_mode)
            forward = entry.compiled[key]
    with torch.inference_mode():
        outputs = model(input_ids=prompt, use_cache=True, **({entry.cache_arg: cache} if cache is not None else {}))
        cache = output_cache(outputs)
        token = outputs.logits[:, -1:].argmax(-1)
        synchronize(device)
        start = time.perf_counter()
        for _ in range(steps):
            outputs = forward(input_ids=token, use_cache=True, **{entry.cache_arg: cache})
            cache = output_cache(outputs)
            token = outputs.logits[:, -1:].argmax(-1)
        synchronize(device)
        seconds = time.perf_counter() - start
    length = int(cache.get_seq_length())
    if length != prompt.shape[1] + steps:  # the cache was not used or not returned
        raise RuntimeError(f"after decoding, the cache holds {length} tokens, expected {prompt.shape[1] + steps}.")
    return seconds


def train_step_memory(entry: Entry, ids: torch.Tensor, device: torch.device) -> dict[str, Any]:
    """Peak memory one training step adds (see the module docstring), in MiB."""
    release_memory(device)
    if device.type == "cuda":
        synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        train_step(entry, ids)
        synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        return {
            "method": "cuda_max_memory_allocated",
            "peak_mib": (peak - before) / 2**20,
            "before_mib": before / 2**20,
        }
    with RssSampler() as sampler:
        train_step(entry, ids)
    if sampler.before is None:
        return {"method": "unavailable (no /proc/self/statm)", "peak_mib": None}
    return {
        "method": "rss_sampled_1ms",
        "peak_mib": (sampler.peak - sampler.before) / 2**20,
        "before_mib": sampler.before / 2**20,
    }


def measure(entry: Entry, name: str, fn: Callable[[], float]) -> None:
    """Run one measurement; a model that raises is recorded as failed and left out of the rest."""
    if entry.error is not None:
        return
    try:
        entry.times.setdefault(name, []).append(fn())
    except Exception as error:  # reported in the model's row; the other models go on
        traceback.print_exc()
        entry.error = f"{name}: {type(error).__name__}: {error}"
        print(f"[bench_model] {entry.name} failed in {name}: {type(error).__name__}: {error}", flush=True)


# ---------------------------------------------------------------------------------------------------------------------
# One shape
# ---------------------------------------------------------------------------------------------------------------------


def make_entries(shape: Shape, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict:
    """The models of a shape, the Mixtral width and the FLOPs/parameters of each (no model is built yet)."""
    from uoe import estimate_flops_per_token  # noqa: PLC0415

    max_positions = max(shape.seq, args.decode_prompt + args.decode_tokens)
    reference = uoe_config(shape, max_positions)
    flops = estimate_flops_per_token(reference, shape.seq)
    uoe_active = active_parameters(reference)
    entries: list[Entry] = []
    if "llama" in args.model_list:
        config = llama_config(shape, max_positions)
        entries.append(Entry("llama", "LlamaForCausalLM (dense)", config, {"flops": flops.dense}))
    width = solve_mixtral_width(shape, max_positions, uoe_active)
    mixtral = mixtral_config(shape, max_positions, width)
    if "mixtral" in args.model_list:
        implementation = mixtral_experts_implementation(args.mixtral_experts, width, dtype)
        description = f"MixtralForCausalLM (top-{MIXTRAL_TOP_K} of {shape.experts}, width {width}, {implementation})"
        extra = {"flops": analytic_flops_per_token(mixtral, shape.seq), "experts_implementation": implementation}
        entries.append(Entry("mixtral", description, mixtral, extra))
    backends, notes = routing_backends(args.backend_list, device) if "uoe" in args.model_list else ([], [])
    for label, value in backends:
        config = uoe_config(shape, max_positions, value)
        description = f'UoEForCausalLM (routing_backend="{value}")'
        entries.append(Entry(f"uoe-{label}", description, config, {"flops": flops.active, "routing_backend": value}))
    for entry in entries:
        entry.extra["parameters"] = harness.count_parameters(entry.config)
        entry.extra["active_parameters"] = active_parameters(entry.config)
    return {
        "entries": entries,
        "notes": notes,
        "mixtral_expert_width": width,
        "uoe_active_parameters": uoe_active,
        "mixtral_active_parameters": active_parameters(mixtral),
        "llama_flops": flops.dense,
        "uoe_flops": {"active": flops.active, "dense": flops.dense, "active_fraction": flops.active_fraction},
        "max_position_embeddings": max_positions,
    }


def run_shape(shape: Shape, index: int, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict:
    plan = make_entries(shape, args, device, dtype)
    entries: list[Entry] = plan["entries"]
    for note in plan["notes"]:
        print(f"[bench_model] {shape.name}: {note}", flush=True)
    generator = torch.Generator().manual_seed(args.seed + index)
    ids = torch.randint(0, shape.vocab, (shape.batch, shape.seq), generator=generator).to(device)
    prompts = {
        batch: torch.randint(0, shape.vocab, (batch, args.decode_prompt), generator=generator).to(device)
        for batch in args.decode_batch_list
    }

    def run_all(entry: Entry) -> None:
        measure(entry, "train", lambda: timed(lambda: train_step(entry, ids), device))
        measure(entry, "prefill", lambda: timed(lambda: prefill(entry, ids), device))
        for batch, prompt in prompts.items():
            for mode in args.decode_mode_list:
                measure(
                    entry,
                    decode_name(mode, batch),
                    lambda: decode(entry, prompt, args.decode_tokens, device, mode, args.compile_mode),  # noqa: B023
                )

    started = time.perf_counter()
    for entry in entries:
        try:
            build(entry, device, dtype, args.seed)
            loss = train_step(entry, ids)  # creates AdamW's state; the loss shows the model computes
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite training loss {loss.item()}")
            entry.extra["first_loss"] = loss.item()
        except Exception as error:
            traceback.print_exc()
            entry.error = f"build: {type(error).__name__}: {error}"
            print(f"[bench_model] {shape.name} {entry.name} failed: {entry.error}", flush=True)
    for _ in range(args.warmup):
        for entry in entries:
            run_all(entry)
    for entry in entries:
        entry.times = {m: [] for m in measurement_names(args)}  # warm-up rounds are not reported
        if entry.error is None:
            try:
                entry.memory = train_step_memory(entry, ids, device)
            except Exception as error:
                traceback.print_exc()
                entry.error = f"memory: {type(error).__name__}: {error}"
    loads = []
    for repeat in range(args.repeats):  # interleaved: a slow spell of the machine hits every model alike
        for entry in entries:
            run_all(entry)
        loads.append(os.getloadavg()[0])
        print(
            f"[bench_model] {shape.name}: repeat {repeat + 1}/{args.repeats} done, "
            f"{time.perf_counter() - started:.0f} s, load {loads[-1]:.2f}",
            flush=True,
        )
    rows = summarize_shape(shape, entries, args, plan["llama_flops"])
    for entry in entries:  # free this shape's models before the next one
        entry.model = entry.optimizer = None
        entry.compiled = {}
    if "compiled" in args.decode_mode_list:
        # each shape and batch size compiles the same forward again: without a reset the third shape reaches
        # dynamo's recompile limit (8 per code object) and `fullgraph=True` turns that into an error
        torch._dynamo.reset()
    release_memory(device)
    return {
        "shape": dataclasses.asdict(shape),
        "spec": shape.spec,
        "description": shape.describe(),
        "seconds": time.perf_counter() - started,
        **{key: value for key, value in plan.items() if key != "entries"},
        "loadavg_1min_after_each_repeat": loads,
        "rows": rows,
    }


def summarize_shape(shape: Shape, entries: list[Entry], args: argparse.Namespace, llama_flops: float) -> list[dict]:
    tokens = {"train": shape.batch * shape.seq, "prefill": shape.batch * shape.seq}
    for batch in args.decode_batch_list:
        for mode in args.decode_mode_list:
            tokens[decode_name(mode, batch)] = batch * args.decode_tokens
    rows = []
    for entry in entries:
        row: dict[str, Any] = {
            "model": entry.name,
            "description": entry.description,
            "status": "ok" if entry.error is None else f"failed: {entry.error}",
            **{k: v for k, v in entry.extra.items() if k != "flops"},
            "flops_per_token": entry.extra["flops"],
            "flops_ratio": entry.extra["flops"] / llama_flops,
            "peak_memory_mib": entry.memory.get("peak_mib"),
            "memory": entry.memory,
        }
        for name in measurement_names(args):
            seconds = entry.times.get(name, [])
            if entry.error is not None or not seconds:
                row[name] = None
                continue
            median = statistics.median(seconds)
            row[name] = {
                "seconds": seconds,
                "median_seconds": median,
                "tokens_per_second": tokens[name] / median,
                "tokens_per_second_range": [tokens[name] / max(seconds), tokens[name] / min(seconds)],
                "relative_range": (max(seconds) - min(seconds)) / median,
            }
            if name.startswith("decode_"):
                row[name]["ms_per_token"] = 1000 * median / args.decode_tokens
        rows.append(row)
    llama = next((r for r in rows if r["model"] == "llama" and r["status"] == "ok"), None)
    for row in rows:
        row["time_ratio"] = {
            name: (llama[name]["tokens_per_second"] / row[name]["tokens_per_second"])
            if llama is not None and row[name] is not None
            else None
            for name in measurement_names(args)
        }
        memory, base = row["peak_memory_mib"], llama["peak_memory_mib"] if llama is not None else None
        row["memory_ratio"] = memory / base if memory is not None and base else None
    return rows


# ---------------------------------------------------------------------------------------------------------------------
# Tables and the RESULTS.md section
# ---------------------------------------------------------------------------------------------------------------------

TABLE_HEADER = [
    "model", "params", "active params/token", "train tok/s", "train time ×Llama", "prefill tok/s",
    "prefill time ×Llama", "active FLOPs/token", "FLOPs ×Llama", "train peak Δ (MiB)", "memory ×Llama",
]  # fmt: skip


def _ratio(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def _rate(measurement: dict | None) -> str:
    if measurement is None:
        return "–"
    text = f"{measurement['tokens_per_second']:,.0f}"
    low, high = measurement["tokens_per_second_range"]
    return text if len(measurement["seconds"]) == 1 else f"{text} ({low:,.0f}–{high:,.0f})"


def shape_table(result: dict) -> str:
    rows = []
    for row in result["rows"]:
        if row["status"] != "ok":
            rows.append([f"{row['model']}: {row['description']}", f"**{row['status']}**"] + [""] * 9)
            continue
        memory = row["peak_memory_mib"]
        rows.append([
            f"{row['model']}: {row['description']}", harness.fmt_count(row["parameters"]),
            harness.fmt_count(row["active_parameters"]), _rate(row["train"]), _ratio(row["time_ratio"]["train"]),
            _rate(row["prefill"]), _ratio(row["time_ratio"]["prefill"]),
            harness.fmt_count(row["flops_per_token"]), f"{row['flops_ratio']:.3f}",
            "–" if memory is None else f"{memory:,.0f}", _ratio(row["memory_ratio"]),
        ])  # fmt: skip
    return harness.markdown_table(TABLE_HEADER, rows)


def decode_table(result: dict) -> str:
    """Per model, each decode measurement as `ms per step (time ×Llama)`."""
    names = [name for name in result["rows"][0] if name.startswith("decode_")]
    header = ["model", *(name.removeprefix("decode_").replace("_b", ", batch ") for name in names)]
    rows = []
    for row in result["rows"]:
        cells = [f"{row['model']}"]
        for name in names:
            value = row.get(name)
            cells.append(
                "–" if value is None else f"{value['ms_per_token']:.2f} ms ({_ratio(row['time_ratio'][name])})"
            )
        rows.append(cells)
    return harness.markdown_table(header, rows)


def shape_heading(result: dict) -> str:
    return f"### {result['shape']['name']} (`{result['spec']}`): {result['description']}"


def mixtral_note(result: dict) -> str:
    shape = result["shape"]
    return (
        f"Mixtral expert width {result['mixtral_expert_width']} (solved; UoE's MLP expert slices are "
        f"{shape['intermediate'] // shape['experts']} wide): active parameters per token "
        f"{result['mixtral_active_parameters']:,.0f} vs UoE's {result['uoe_active_parameters']:,.0f}. Mixtral's "
        f"attention is dense, UoE's active attention is {shape['attention_top_k']}/{shape['heads']} of it: at equal "
        "active parameters, Mixtral's experts get what is left after its full attention."
    )


def section_heading(kind: str) -> str:
    return f"{SECTION_PREFIX}, {kind})"


def markdown(results: dict) -> str:
    env, settings = results["environment"], results["settings"]
    memory_method = (
        "`torch.cuda.max_memory_allocated()` after `reset_peak_memory_stats()`, minus the memory allocated before "
        "the step"
        if results["device_kind"] == "CUDA"
        else "process RSS (`/proc/self/statm`) sampled every ~1 ms by a background thread during the step, peak minus "
        "the RSS just before it (after `gc.collect()` and `malloc_trim(0)`); RSS is coarse (allocator caching, page "
        "granularity), so read it as a rough figure"
    )
    lines = [
        f"Command: `{results['command']}` ({results['wall_seconds'] / 60:.1f} min, finished {env['date_utc']}).",
        f"Device: {results['device_name']} ({env['cpu_count']} CPU cores), {settings['threads']} torch threads, "
        f"dtype {settings['dtype']}.",
        f"Versions: Python {env['python']}, torch {env['torch']}, transformers {env['transformers']}, "
        f"uoe {results['uoe_version']}.",
        f"Load: {results['load_note']}",
        "",
        f"Method: per model, {settings['warmup']} warm-up round(s), then {settings['repeats']} interleaved repeats "
        "(each repeat runs every model once in turn); tokens/s from the median time, in brackets the range over the "
        "repeats (slowest–fastest). *train*: forward with labels + backward + `AdamW.step()` + `zero_grad` on the "
        "shape's batch of random token ids; *prefill*: one forward of that batch under `torch.inference_mode()` with "
        f"`use_cache=True`; *decode* (second table, per batch size): after a prefill of batch x "
        f"{settings['decode_prompt']} prompt tokens, {settings['decode_tokens']} greedy one-token steps with the KV "
        "cache; ms per step (one new token per sequence), in brackets time ×Llama. Modes: `dynamic` (DynamicCache, "
        "eager), `static` (StaticCache of prompt + steps slots, eager), `compiled` (the static cache and "
        f"`torch.compile(forward, fullgraph=True, mode={settings['compile_mode']!r})`, every model alike, compiled "
        "in the untimed warm-up), `generate` (the whole `generate` call, prefill included, per new token). Time ×Llama = model time / Llama time (below 1: faster than the dense model). "
        "Memory: peak of one training step, "
        f"{memory_method}. All models: SDPA attention, no dropout, router aux losses off.",
        "",
        "Baselines: `llama` is the dense model of the shape (UoE at full routing computes exactly it). `mixtral` has "
        f"the same hidden size, layers, heads and vocabulary, top-{MIXTRAL_TOP_K} routing over as many experts as "
        "UoE's MLP, and its expert width solved so that its active parameters per token (attention + 2 experts + "
        "router + norms + embeddings + LM head) match UoE's (attention weights × attention_top_k/heads, MLP weights "
        "× mlp_top_k/experts, routers, norms, embeddings, LM head). Active FLOPs: forward per token at the shape's "
        "sequence length, a multiply-add = 2, LM head included, causal attention ((T+1)/2 keys); UoE's from "
        "`uoe.estimate_flops_per_token(config, T).active` (Llama = its `.dense`, so UoE's ratio is `active_fraction`), "
        "Mixtral's by the same convention (projections, attention, router, 2 experts, LM head).",
    ]
    for result in results["shapes"]:
        lines += ["", shape_heading(result), "", shape_table(result), "", decode_table(result), ""]
        lines += [mixtral_note(result)]
        lines += [f"{note}" for note in result["notes"]]
    lines += ["", f"Raw numbers (every repeat's time): `{results['json_path']}`."]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, 1 repeat, few decode steps (the test)")
    parser.add_argument(
        "--shapes",
        default=None,
        help=f"comma-separated presets ({', '.join(PRESETS)}) or HIDDEN:LAYERS:HEADS/TOPK:INTERMEDIATE:EXPERTS/TOPK:"
        f"VOCAB:BATCHxSEQ (default {DEFAULT_SHAPES}; quick {QUICK_SHAPES})",
    )
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {list(MODELS)}")
    parser.add_argument(
        "--backends",
        default=",".join(BACKENDS),
        help=f"UoE routing backends, comma-separated subset of {list(BACKENDS)}",
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (default 5; quick 1)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds before the repeats (default 1)")
    parser.add_argument(
        "--decode_batches", default=None, help="comma-separated batch sizes of the decode rows (default 1,8; quick 2)"
    )
    parser.add_argument(
        "--decode_modes",
        default=None,
        help=f"comma-separated subset of {list(DECODE_MODES)} (default all; quick: dynamic,static,generate)",
    )
    parser.add_argument(
        "--compile_mode", default=None, help="torch.compile mode of the `compiled` rows (e.g. reduce-overhead on CUDA)"
    )
    parser.add_argument("--decode_prompt", type=int, default=None, help="prompt tokens before decoding (128; quick 16)")
    parser.add_argument("--decode_tokens", type=int, default=None, help="greedy decode steps (default 64; quick 4)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--dtype", default=None, choices=list(DTYPES), help="default float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument(
        "--mixtral_experts",
        default="auto",
        choices=["auto", "grouped_mm", "eager"],
        help="Mixtral experts_implementation (auto: grouped_mm where the expert width is 16-byte aligned, else eager)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--results_md",
        default=None,
        help="markdown file whose section is replaced, or 'none' (default benchmarks/RESULTS.md; quick: none)",
    )
    parser.add_argument(
        "--output", default=None, help="JSON path (default benchmarks/results/bench_model_<cpu|cuda>[_quick].json)"
    )
    args = parser.parse_args(argv)
    quick = args.quick
    defaults = {"shapes": QUICK_SHAPES if quick else DEFAULT_SHAPES, "repeats": 1 if quick else 5}
    defaults.update(decode_prompt=16 if quick else 128, decode_tokens=4 if quick else 64)
    defaults.update(
        decode_batches="2" if quick else "1,8",
        decode_modes="dynamic,static,generate" if quick else ",".join(DECODE_MODES),
    )
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    try:
        args.shape_list = parse_shapes(args.shapes)
        args.model_list = harness.parse_choices("models", args.models, MODELS)
        args.backend_list = harness.parse_choices("backends", args.backends, BACKENDS)
        args.decode_batch_list = harness.parse_int_list("decode_batches", args.decode_batches)
        for batch in args.decode_batch_list:
            harness.check_positive("decode_batches", batch)
        args.decode_mode_list = harness.parse_choices("decode_modes", args.decode_modes, DECODE_MODES)
        for name in ("repeats", "decode_prompt", "decode_tokens"):
            harness.check_positive(name, getattr(args, name))
        harness.check_positive("warmup", args.warmup, allow_zero=True)
        if args.threads is not None:
            harness.check_positive("threads", args.threads)
        if args.device is None:
            args.device = "cuda" if torch.cuda.is_available() else "cpu"
        if args.device not in ("cpu", "cuda") and not args.device.startswith("cuda:"):
            raise ValueError(f"--device must be cpu or cuda, got {args.device!r}.")
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device is available.")
    except ValueError as error:
        parser.error(str(error))
    kind = "cuda" if args.device.startswith("cuda") else "cpu"
    args.dtype = args.dtype or ("bfloat16" if kind == "cuda" else "float32")
    if args.results_md is None:
        args.results_md = "none" if quick else str(harness.DEFAULT_RESULTS_MD)
    if args.output is None:
        args.output = str(harness.RESULTS_DIR / f"bench_model_{kind}{'_quick' if quick else ''}.json")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import transformers  # noqa: PLC0415

    args = parse_args(argv)
    started = time.perf_counter()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    kind = "CUDA" if device.type == "cuda" else "CPU"
    env = harness.environment("bench_model.py", argv)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else harness.cpu_name()
    settings = {
        key: getattr(args, key)
        for key in ("quick", "repeats", "warmup", "decode_prompt", "decode_tokens", "seed", "compile_mode")
    }
    settings.update(
        decode_batches=args.decode_batch_list, decode_modes=args.decode_mode_list,
        shapes=[s.spec for s in args.shape_list], models=args.model_list, backends=args.backend_list,
        dtype=args.dtype, threads=torch.get_num_threads(), device=str(device), mixtral_experts=args.mixtral_experts,
    )  # fmt: skip
    print(f"[bench_model] {kind} ({device_name}), {settings['threads']} threads, {args.dtype}: {settings}", flush=True)

    shapes = []
    for index, shape in enumerate(args.shape_list):
        print(f"[bench_model] shape {shape.name}: {shape.describe()}", flush=True)
        result = run_shape(shape, index, args, device, dtype)
        shapes.append(result)
        tables = f"{shape_table(result)}\n\n{decode_table(result)}"
        print(f"\n{shape_heading(result)}\n\n{tables}\n\n{mixtral_note(result)}\n", flush=True)

    env["loadavg_end"] = list(os.getloadavg())
    results = {
        "benchmark": "bench_model",
        "command": env["command"],
        "device_kind": kind,
        "device_name": device_name,
        "uoe_version": env["uoe"],
        "environment": env,
        "settings": settings,
        "load_note": harness.load_note(
            env["loadavg_start"], env["loadavg_end"], env["cpu_count"], torch.get_num_threads()
        ),
        "wall_seconds": time.perf_counter() - started,
        "json_path": harness.display_path(args.output),
        "shapes": shapes,
    }
    harness.write_json(Path(args.output), results)
    text = markdown(results)
    if args.results_md.lower() != "none":
        harness.replace_section(Path(args.results_md), section_heading(kind), text)
    print(section_heading(kind) + "\n\n" + text, flush=True)
    written = ", ".join(p for p in (args.results_md if args.results_md.lower() != "none" else "", args.output) if p)
    print(f"[bench_model] wrote {written} ({results['wall_seconds'] / 60:.1f} min)", flush=True)
    return results


if __name__ == "__main__":
    outcome = main()
    sys.exit(1 if any(r["status"] != "ok" for s in outcome["shapes"] for r in s["rows"]) else 0)
