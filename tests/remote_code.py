"""Helpers to load a checkpoint with `trust_remote_code=True` in a process where `uoe` cannot be imported."""

import json
import os
import subprocess
import sys
import textwrap

# Makes `uoe` unimportable in the child interpreter (and proves it is), so only the checkpoint's copied code can load.
BLOCK_UOE_PREAMBLE = textwrap.dedent(
    """
    import importlib.abc, json, sys

    class BlockUoE(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "uoe" or name.startswith("uoe."):
                raise ModuleNotFoundError(f"blocked: {name}")

    sys.meta_path.insert(0, BlockUoE())
    try:
        import uoe  # noqa: F401
        raise SystemExit("uoe is importable; the test would prove nothing")
    except ModuleNotFoundError:
        pass
    """
)

_LOAD_SCRIPT = textwrap.dedent(
    """
    import torch
    from transformers import {auto_class}

    inputs_path, output_path, *folders = sys.argv[1:]
    inputs = torch.load(inputs_path)
    all_logits, classes, modules = [], [], []
    for folder in folders:
        model = {auto_class}.from_pretrained(folder, trust_remote_code=True).eval()
        with torch.no_grad():
            all_logits.append(model(**inputs).logits)
        classes.append(type(model).__name__)
        modules.append(type(model).__module__)
    torch.save(all_logits, output_path)
    print(json.dumps({{"classes": classes, "modules": modules,
                      "uoe_loaded": any(m == "uoe" or m.startswith("uoe.") for m in sys.modules)}}))
    """
)


def logits_without_uoe(folder, inputs: dict, tmp_path, auto_class: str = "AutoModelForCausalLM"):
    """Load `folder` with remote code in a fresh interpreter that cannot import `uoe`; return
    `(logits, info)` where `info` names the loaded class and its module."""
    logits, info = many_logits_without_uoe([folder], inputs, tmp_path, auto_class)
    return logits[0], {"class": info["classes"][0], "module": info["modules"][0], "uoe_loaded": info["uoe_loaded"]}


def many_logits_without_uoe(folders, inputs: dict, tmp_path, auto_class: str = "AutoModelForCausalLM"):
    """`logits_without_uoe` of several checkpoints in one fresh interpreter (one start-up for all): returns
    `(list of logits, info)` with `info["classes"]` and `info["modules"]` per folder."""
    import torch

    inputs_path, output_path = tmp_path / "inputs.pt", tmp_path / "logits.pt"
    torch.save(inputs, inputs_path)
    stdout = run_without_uoe(
        _LOAD_SCRIPT.format(auto_class=auto_class),
        [str(inputs_path), str(output_path), *(str(folder) for folder in folders)],
        tmp_path,
    )
    info = json.loads(stdout.strip().splitlines()[-1])
    return torch.load(output_path), info


def run_without_uoe(script: str, args: list[str], tmp_path) -> str:
    """Run `BLOCK_UOE_PREAMBLE + script` with `args` in a fresh offline interpreter (cwd `tmp_path`); return its stdout."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    result = subprocess.run(
        [sys.executable, "-c", BLOCK_UOE_PREAMBLE + script, *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout
