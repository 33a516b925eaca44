#!/usr/bin/env python
"""What honouring a wrapped projection costs: the gathered path with LoRA on q/k/v/o (so it calls the projection
modules on every token instead of multiplying only the selected heads' weight slices) against the masked reference
with the same adapter, and the plain gathered path against the plain masked one, in the same run.

    .venv/bin/python benchmarks/bench_wrapped.py           # the main job's shape, 4 x 256 tokens, 7 repeats
    .venv/bin/python benchmarks/bench_wrapped.py --quick   # tiny shape, 2 repeats (seconds)

Measured per variant, interleaved (every repeat runs each variant once in turn, after one warm-up round; medians
over the repeats): forward tokens/s under `torch.inference_mode()` (prefill, no cache) and tokens/s of one training
step (forward with labels, backward; LoRA trains only its adapters, the plain models everything). Ratios are against
the masked path of the same variant (below 1 = faster than masked). Raw numbers in
`benchmarks/results/bench_wrapped_<cpu|cuda>.json`.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import RESULTS_DIR, environment  # noqa: E402

import uoe  # noqa: E402

SHAPES = {
    # the main job's model: d192, 3 of 6 heads, 2 of 4 experts
    "main": dict(hidden_size=192, num_hidden_layers=4, num_attention_heads=6, attention_top_k=3, intermediate_size=768),
    "quick": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, attention_top_k=2, intermediate_size=64),
}


def build(shape: str, backend: str, lora: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    config = uoe.UoEConfig(
        vocab_size=4096, num_mlp_experts=4, mlp_top_k=2, routing_backend=backend, use_cache=False, **SHAPES[shape]
    )
    model = uoe.UoEForCausalLM(config)
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    return model


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    shape, (batch, length), repeats = ("quick", (2, 48), 2) if args.quick else ("main", (4, 256), args.repeats)
    if repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    ids = torch.randint(0, 4096, (batch, length), generator=torch.Generator().manual_seed(0))
    variants = {
        (lora, backend): build(shape, backend, lora) for lora in (False, True) for backend in ("masked", "gathered")
    }
    times: dict = {key: {"forward": [], "train": []} for key in variants}

    def forward(model):
        with torch.inference_mode():
            model(input_ids=ids)

    def train(model):
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        model.zero_grad(set_to_none=True)
        model.eval()

    for round_index in range(repeats + 1):  # round 0 warms up
        for key, model in variants.items():
            for kind, step in (("forward", forward), ("train", train)):
                seconds = timed(lambda: step(model))  # noqa: B023
                if round_index:
                    times[key][kind].append(seconds)
    tokens = batch * length
    rows = []
    record = environment("bench_wrapped.py", argv)
    print(f"device: {record['device']}, {torch.get_num_threads()} threads, {batch} x {length} tokens, {shape}")
    for lora in (False, True):
        for kind in ("forward", "train"):
            masked = statistics.median(times[(lora, "masked")][kind])
            gathered = statistics.median(times[(lora, "gathered")][kind])
            row = {
                "variant": "LoRA q/k/v/o" if lora else "plain",
                "measure": kind,
                "masked_tokens_per_s": tokens / masked,
                "gathered_tokens_per_s": tokens / gathered,
                "gathered_over_masked_time": gathered / masked,
            }
            rows.append(row)
            print(
                f"{row['variant']:>13} {kind:>7}: masked {row['masked_tokens_per_s']:9.0f} tok/s, gathered "
                f"{row['gathered_tokens_per_s']:9.0f} tok/s, gathered/masked time {row['gathered_over_masked_time']:.2f}"
            )
    output = args.output or RESULTS_DIR / f"bench_wrapped_{'cuda' if torch.cuda.is_available() else 'cpu'}.json"
    if not args.quick or args.output:
        output.write_text(
            json.dumps(
                {
                    "environment": record,
                    "rows": rows,
                    "raw": {
                        f"{'lora' if lora else 'plain'}-{backend}": value for (lora, backend), value in times.items()
                    },
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
