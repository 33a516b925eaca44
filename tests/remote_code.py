"""Helpers to load a checkpoint with `trust_remote_code=True` in a process where `uoe` cannot be imported."""

import json
import os
import subprocess
import sys
import textwrap

_LOAD_SCRIPT = textwrap.dedent(
    """
    import importlib.abc, json, sys

    class BlockUoE(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "uoe" or name.startswith("uoe."):
                raise ModuleNotFoundError(f"blocked: {{name}}")

    sys.meta_path.insert(0, BlockUoE())
    try:
        import uoe  # noqa: F401
        raise SystemExit("uoe is importable; the test would prove nothing")
    except ModuleNotFoundError:
        pass

    import torch
    from transformers import {auto_class}

    folder, inputs_path, output_path = sys.argv[1:4]
    model = {auto_class}.from_pretrained(folder, trust_remote_code=True).eval()
    inputs = torch.load(inputs_path)
    with torch.no_grad():
        logits = model(**inputs).logits
    torch.save(logits, output_path)
    print(json.dumps({{"class": type(model).__name__, "module": type(model).__module__,
                      "uoe_loaded": any(m == "uoe" or m.startswith("uoe.") for m in sys.modules)}}))
    """
)


def logits_without_uoe(folder, inputs: dict, tmp_path, auto_class: str = "AutoModelForCausalLM"):
    """Load `folder` with remote code in a fresh interpreter that cannot import `uoe`; return
    `(logits, info)` where `info` names the loaded class and its module."""
    import torch

    inputs_path, output_path = tmp_path / "inputs.pt", tmp_path / "logits.pt"
    torch.save(inputs, inputs_path)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            _LOAD_SCRIPT.format(auto_class=auto_class),
            str(folder),
            str(inputs_path),
            str(output_path),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    info = json.loads(result.stdout.strip().splitlines()[-1])
    return torch.load(output_path), info
