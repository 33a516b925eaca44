"""Benchmark the UoE Triton kernels on a CUDA GPU (bfloat16) and record the results in their section of
benchmarks/RESULTS.md.

UoME experts, per shape (tokens, d_model, experts, top-k; intermediate size 4 * d_model split over the
experts, SwiGLU), forward and forward+backward:
    kernel       `uoe.kernels_uome.uome_experts` (Triton)
    reference    the model's own eager path (every expert on every token, unselected ones weighted 0)
    grouped_mm   transformers' `grouped_mm_experts_forward`
    dense GEMM   one `[tokens * top_k, d_model] x [d_model, 3 * inner]` matmul: the same FLOPs in one GEMM
  with ms, TFLOP/s (routed FLOPs: 2 * tokens * top_k * d_model * 3 * inner forward, 3x that with backward)
  and % of the dense GEMM's TFLOP/s.

SMHA selective attention, per shape (batch, seq, heads, head_dim), causal, every token selecting 25%, 50%
or 100% of the heads, forward and forward+backward: the kernel (`uoe.kernels_smha.selective_attention`)
against dense `scaled_dot_product_attention(is_causal=True)` over all heads (flash attention), ms and
peak extra memory.

Each table also gives the largest relative difference of the kernel's output from transformers' `grouped_mm`
(UoME) and from SDPA at 100% selection (SMHA, where both compute the same attention), so the autotuned kernels
are checked at every benchmarked shape. An implementation that raises is reported in its row; the others run.

Usage: python benchmarks/bench_kernels.py [--quick] [--output benchmarks/RESULTS.md]
(`bash scripts/gpu_check.sh` runs the GPU tests first, then this.)
Needs a CUDA GPU with Triton; exits with status 2 and a message otherwise.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from baseline_flops import mlp_flops  # benchmarks/, next to this script
from harness import ROOT, display_path, environment, markdown_table, replace_section  # benchmarks/harness.py

DTYPE = torch.bfloat16
DEVICE = "cuda"

# UoME: (tokens, d_model, experts, top-k); SMHA: (batch, seq, heads, head_dim)
UOME_SHAPES = [
    (8192, hidden, experts, top_k)
    for hidden in (1024, 2048, 4096)
    for experts in (4, 8, 16)
    for top_k in (1, 2, 4)
    if top_k < experts
]
SMHA_SHAPES = [
    (batch, seq, heads, head_dim)
    for seq, batch in ((1024, 8), (4096, 2), (16384, 1))
    for heads, head_dim in ((8, 128), (32, 64))
]
QUICK_UOME_SHAPES = [(4096, 1024, 8, 2), (4096, 2048, 8, 2)]
QUICK_SMHA_SHAPES = [(1, 4096, 16, 64)]
TARGET_D_MODEL, TARGET_SEQ = 2048, 4096  # issue 4's targets: UoME at d_model >= 2048, SMHA at seq 4096
RESULTS_HEADING = "## Kernel benchmarks (bench_kernels.py, CUDA)"


def refuse(message: str) -> None:
    print(f"bench_kernels.py: {message}", file=sys.stderr)
    sys.exit(2)


def bench(fn: Callable[[], object]) -> float:
    """Mean milliseconds per call (Triton's do_bench: warm-up, L2 flush between calls)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=100))


def peak_memory_mib(fn: Callable[[], object]) -> float:
    """Peak memory allocated by one call beyond what was allocated before it, in MiB."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


# -- UoME ----------------------------------------------------------------------------------------


class _Experts(torch.nn.Module):
    """Stacked SwiGLU experts with the attributes transformers' experts back-ends read."""

    def __init__(self, hidden: int, inner: int, experts: int):
        super().__init__()
        from transformers.activations import ACT2FN

        self.num_experts, self.hidden_dim, self.intermediate_dim = experts, hidden, inner
        self.gate_up_proj = torch.nn.Parameter(
            torch.randn(experts, 2 * inner, hidden, device=DEVICE, dtype=DTYPE) * hidden**-0.5
        )
        self.down_proj = torch.nn.Parameter(
            torch.randn(experts, hidden, inner, device=DEVICE, dtype=DTYPE) * inner**-0.5
        )
        self.act_fn = ACT2FN["silu"]
        self.has_gate, self.has_bias, self.has_post_expert_norm = True, False, False
        self.is_transposed, self.is_concatenated, self._is_expert_parallel = False, True, False

    def _apply_gate(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return self.act_fn(gate) * up


def bench_uome(tokens: int, hidden: int, experts: int, top_k: int) -> tuple[list[list[str]], dict[str, float]]:
    from transformers.integrations.moe import grouped_mm_experts_forward

    from uoe.kernels_uome import uome_experts
    from uoe.modeling_uoe import UoESwiGLUExperts

    inner = 4 * hidden // experts
    module = _Experts(hidden, inner, experts)
    x = torch.randn(tokens, hidden, device=DEVICE, dtype=DTYPE, requires_grad=True)
    index = torch.rand(tokens, experts, device=DEVICE).topk(top_k, dim=-1).indices
    gates = torch.rand(tokens, top_k, device=DEVICE, dtype=DTYPE, requires_grad=True)
    params = [x, module.gate_up_proj, module.down_proj, gates]
    reference_forward = UoESwiGLUExperts.forward.__wrapped__  # the model's eager path, without the dispatch

    impls = {
        "kernel": lambda: uome_experts(x, module.gate_up_proj, module.down_proj, index, gates, "swiglu"),
        "reference": lambda: reference_forward(module, x, index, gates),
        "grouped_mm": lambda: grouped_mm_experts_forward(module, x, index, gates),
    }
    rows_in = tokens * top_k
    dense_in = torch.randn(rows_in, hidden, device=DEVICE, dtype=DTYPE, requires_grad=True)
    dense_w = torch.randn(hidden, 3 * inner, device=DEVICE, dtype=DTYPE, requires_grad=True)
    impls["dense GEMM"] = lambda: dense_in @ dense_w
    flops = rows_in * mlp_flops(hidden, inner)  # every routed (token, expert) row through a SwiGLU expert

    results: dict[str, float] = {}
    errors: dict[str, str] = {}
    try:  # the autotuned kernel at this shape against transformers' path (bf16 both)
        with torch.no_grad():
            results["kernel vs grouped_mm"] = max_rel_diff(impls["kernel"](), impls["grouped_mm"]())
    except Exception as error:
        failure(error)
    for name, fn in impls.items():
        inputs = [dense_in, dense_w] if name == "dense GEMM" else params
        try:
            with torch.no_grad():
                results[f"{name} fwd"] = bench(fn)
            out = fn()
            grad = torch.randn_like(out)
            results[f"{name} fwd+bwd"] = bench(
                lambda fn=fn, inputs=inputs, grad=grad: torch.autograd.grad(fn(), inputs, grad)
            )
        except Exception as error:  # one failing implementation is reported in its row, the others still run
            errors[name] = failure(error)
    rows = []
    for name in impls:
        if name in errors:
            rows.append([name, errors[name]] + [""] * 5)
            continue
        row = [name]
        for mode, mode_flops in (("fwd", flops), ("fwd+bwd", 3 * flops)):
            ms = results[f"{name} {mode}"]
            dense_ms = results.get(f"dense GEMM {mode}", float("nan"))
            row += [f"{ms:.3f}", f"{mode_flops / ms / 1e9:.1f}", f"{100 * dense_ms / ms:.0f}%"]
        rows.append(row)
    return rows, results


def max_rel_diff(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|, in float32."""
    actual, expected = actual.float(), expected.float()
    return float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30))


def failure(error: Exception) -> str:
    """A table cell for an implementation that raised (printed in full to stderr)."""
    print(f"bench_kernels.py: {type(error).__name__}: {error}", file=sys.stderr, flush=True)
    torch.cuda.empty_cache()
    return f"failed: {type(error).__name__}"


# -- SMHA ----------------------------------------------------------------------------------------


def bench_smha(batch: int, seq: int, heads: int, head_dim: int, fraction: float) -> dict[str, float | str]:
    from uoe.kernels_smha import selective_attention

    q, k, v = (
        torch.randn(batch, heads, seq, head_dim, device=DEVICE, dtype=DTYPE, requires_grad=True) for _ in range(3)
    )
    top_k = max(1, round(fraction * heads))
    chosen = torch.rand(batch, seq, heads, device=DEVICE).topk(top_k, dim=-1).indices
    selected = torch.zeros(batch, seq, heads, dtype=torch.bool, device=DEVICE).scatter(-1, chosen, True)
    impls = {
        "kernel": lambda: selective_attention(q, k, v, selected, selected, causal=True),
        "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
    }
    results: dict[str, float | str] = {}
    if fraction == 1.0:  # every head selected: the kernel computes exactly dense causal attention
        try:
            with torch.no_grad():
                results["kernel vs sdpa"] = max_rel_diff(impls["kernel"](), impls["sdpa"]().transpose(1, 2))
        except Exception as error:
            failure(error)
    for name, fn in impls.items():
        try:
            with torch.no_grad():
                results[f"{name} fwd ms"] = bench(fn)
                results[f"{name} fwd MiB"] = peak_memory_mib(fn)
            grad = torch.randn_like(fn())

            def step(fn=fn, grad=grad):
                return torch.autograd.grad(fn(), (q, k, v), grad)

            results[f"{name} fwd+bwd ms"] = bench(step)
            results[f"{name} fwd+bwd MiB"] = peak_memory_mib(step)
        except Exception as error:  # reported in the row; the other implementation still runs
            results[f"{name} error"] = failure(error)
    return results


# -- main ----------------------------------------------------------------------------------------


def environment_lines() -> list[str]:
    env = environment("bench_kernels.py", None)
    return [
        f"- date: {env['date_utc']}",
        f"- device: {env['device'].removeprefix('cuda:')} ({env['gpu_memory_gib']:.0f} GiB), CUDA {env['cuda']}",
        f"- torch {env['torch']}, triton {env['triton']}, transformers {env['transformers']}, Python {env['python']}",
        f"- command: `{env['command']}`",
        f"- dtype: {DTYPE}, times are means of `triton.testing.do_bench`",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few small shapes (about a minute)")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "RESULTS.md")
    args = parser.parse_args()

    if not torch.cuda.is_available():
        refuse("needs a CUDA GPU (none found); the kernels' CPU interpreter mode is for tests, not timing.")
    try:
        import triton  # noqa: F401
    except ImportError:
        refuse("needs Triton (`pip install triton`).")
    sys.path.insert(0, str(ROOT))
    torch.manual_seed(0)

    uome_shapes, smha_shapes = (QUICK_UOME_SHAPES, QUICK_SMHA_SHAPES) if args.quick else (UOME_SHAPES, SMHA_SHAPES)

    report = [*environment_lines(), ""]
    targets: list[str] = []

    report += ["### UoME experts (SwiGLU, intermediate 4 x d_model split over the experts)", ""]
    header = ["impl", "fwd ms", "fwd TFLOP/s", "fwd % dense", "fwd+bwd ms", "fwd+bwd TFLOP/s", "fwd+bwd % dense"]
    for tokens, hidden, experts, top_k in uome_shapes:
        rows, results = bench_uome(tokens, hidden, experts, top_k)
        title = f"tokens {tokens}, d_model {hidden}, experts {experts}, top-k {top_k}"
        table = markdown_table(header, rows)
        if "kernel vs grouped_mm" in results:
            table += f"\n\nkernel output vs grouped_mm: max rel. difference {results['kernel vs grouped_mm']:.1e}"
        print(f"\n{title}\n{table}", flush=True)
        report += [f"#### {title}", "", table, ""]
        if hidden >= TARGET_D_MODEL and all(
            f"{name} fwd+bwd" in results for name in ("kernel", "grouped_mm", "dense GEMM")
        ):
            speedup = results["grouped_mm fwd+bwd"] / results["kernel fwd+bwd"]
            dense = 100 * results["dense GEMM fwd+bwd"] / results["kernel fwd+bwd"]
            ok = speedup >= 1.3 and dense >= 70
            targets.append(
                f"- UoME {title}: fwd+bwd {speedup:.2f}x grouped_mm (target >= 1.3x), {dense:.0f}% of dense "
                f"(target >= 70%): {'MET' if ok else 'NOT MET'}"
            )
        torch.cuda.empty_cache()

    report += ["### SMHA selective attention (causal) vs dense SDPA over all heads", ""]
    header = ["selection", "impl", "fwd ms", "fwd MiB", "fwd+bwd ms", "fwd+bwd MiB"]
    for batch, seq, heads, head_dim in smha_shapes:
        rows, agreement = [], ""
        for fraction in (0.25, 0.5, 1.0):
            results = bench_smha(batch, seq, heads, head_dim, fraction)
            for name in ("kernel", "sdpa"):
                if f"{name} error" in results:
                    rows.append([f"{fraction:.0%}", name, results[f"{name} error"], "", "", ""])
                    continue
                rows.append(
                    [f"{fraction:.0%}", name]
                    + [
                        f"{results[f'{name} {mode} {unit}']:.{2 if unit == 'ms' else 0}f}"
                        for mode in ("fwd", "fwd+bwd")
                        for unit in ("ms", "MiB")
                    ]
                )
            if fraction == 0.5 and seq == TARGET_SEQ and not any(key.endswith("error") for key in results):
                time_ratio = results["kernel fwd+bwd ms"] / results["sdpa fwd+bwd ms"]
                memory_ratio = results["kernel fwd+bwd MiB"] / max(results["sdpa fwd+bwd MiB"], 1e-9)
                ok = time_ratio <= 0.6 and memory_ratio <= 0.6
                targets.append(
                    f"- SMHA batch {batch}, seq {seq}, {heads} heads of {head_dim}, 50% selection: fwd+bwd time "
                    f"{time_ratio:.2f}x and memory {memory_ratio:.2f}x dense SDPA (target <= 0.6x each): "
                    f"{'MET' if ok else 'NOT MET'}"
                )
            if "kernel vs sdpa" in results:
                agreement = (
                    f"kernel output vs SDPA at 100% selection: max rel. difference {results['kernel vs sdpa']:.1e}"
                )
            torch.cuda.empty_cache()
        title = f"batch {batch}, seq {seq}, {heads} heads of {head_dim}"
        table = markdown_table(header, rows)
        if agreement:
            table += f"\n\n{agreement}"
        print(f"\n{title}\n{table}", flush=True)
        report += [f"#### {title}", "", table, ""]

    report += ["### Targets (issue 4)", "", *(targets or ["- (no shape of the targets in this run)"]), ""]
    print("\n" + "\n".join(targets))
    # Only this script's section of the file is replaced; the CPU comparisons keep theirs.
    replace_section(args.output, RESULTS_HEADING, "\n".join(report))
    print(f"\nwrote {display_path(args.output)}")


if __name__ == "__main__":
    main()
