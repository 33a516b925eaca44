"""Where the UoE Triton kernels can run, and how they are loaded.

Triton is optional: nothing here imports it at module level, so `uoe` imports without Triton and without
CUDA. The kernel modules (`kernels_uome_triton`, `kernels_smha_triton`) are imported on first use.

Kernels run on CUDA tensors, or on CPU tensors under Triton's interpreter (`TRITON_INTERPRET=1`, slow;
for tests). `triton.jit` decides between compiled and interpreted kernels when a kernel module is
imported, so `triton_module` re-imports a kernel module whose mode no longer matches the environment.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from types import ModuleType

import torch


class KernelsUnavailableError(RuntimeError):
    """The Triton kernels were requested where they cannot run."""


# Looked up once without importing Triton (a plain constant is also free for torch.compile to trace).
try:
    _TRITON_FOUND = importlib.util.find_spec("triton") is not None
except (ImportError, ValueError):  # e.g. `sys.modules["triton"] = None` to hide it
    _TRITON_FOUND = False


def triton_importable() -> bool:
    """Whether Triton is installed here."""
    return _TRITON_FOUND


def triton_interpreting() -> bool:
    """Whether `TRITON_INTERPRET` asks for Triton's CPU interpreter (read at every call)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def kernels_available(tensor: torch.Tensor) -> bool:
    """Whether the UoE Triton kernels can run on `tensor`'s device.

    True for CUDA tensors with Triton importable, and for CPU tensors when Triton is importable and
    `TRITON_INTERPRET=1` is set. Never synchronises or touches the GPU.
    """
    if not triton_importable():
        return False
    if tensor.device.type == "cuda":
        return True
    return tensor.device.type == "cpu" and triton_interpreting()


def kernels_unavailable_reason(tensor: torch.Tensor) -> str | None:
    """Why the kernels cannot run on `tensor`, or `None` when they can."""
    if not triton_importable():
        return "Triton is not installed (`pip install triton`, or `pip install uoe-transformers[kernels]`)"
    if tensor.device.type == "cuda" or (tensor.device.type == "cpu" and triton_interpreting()):
        return None
    if tensor.device.type == "cpu":
        return "the tensors are on the CPU (the kernels need a CUDA GPU; TRITON_INTERPRET=1 runs them slowly on CPU)"
    return f"the tensors are on a {tensor.device.type!r} device (the kernels need a CUDA GPU)"


def require_kernels(tensor: torch.Tensor, feature: str = "The UoE Triton kernels") -> None:
    """Raise `KernelsUnavailableError` with a clear message if the kernels cannot run on `tensor`.

    Args:
        tensor: a tensor the kernels would process (its device decides).
        feature: what was requested, for the message, e.g. `'routing_backend="triton"'`.
    """
    reason = kernels_unavailable_reason(tensor)
    if reason is not None:
        raise KernelsUnavailableError(
            f"{feature} cannot run here: {reason}. Use the PyTorch paths instead "
            '(`routing_backend="auto"`, `"gathered"` or `"masked"`).'
        )


def triton_module(name: str) -> ModuleType:
    """Import (or re-import, if the interpreter setting changed) the kernel module `uoe.<name>`."""
    qualified = f"{__package__}.{name}" if __package__ else name
    module = sys.modules.get(qualified)
    if module is None:
        return importlib.import_module(qualified)
    if module.INTERPRETED != triton_interpreting():
        module = importlib.reload(module)
    return module
