"""Two CPU ranks started by torchrun (gloo): tensor and pipeline parallelism from `from_pretrained`, the standard
`Trainer` with DDP and FSDP2 against one process, and `examples/run_clm.py` with both.

The scripts the ranks run are in `tests/distributed_checks.py`. (`accelerate launch --cpu --num_processes 2` starts
one process, not two, without MPI, so torchrun starts the ranks; `Trainer` runs through accelerate inside them.)
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from uoe import UoEForCausalLM, UoEForImageClassification
from uoe.modeling_uoe import UoESelectiveHeadsParallel, UoEUnionMLPParallel

from .helpers import tiny_model
from .test_examples import EXAMPLES, ROOT, TINY_ARGS, corpus, offline_env, run  # noqa: F401  (corpus is a fixture)
from .test_vision import vision_config

FSDP_CONFIG = EXAMPLES / "fsdp_config.json"
CHECKS = Path(__file__).with_name("distributed_checks.py")
MODELS = ["lm", "lm_tied", "lm_gqa", "lm_shared", "vision", "vision_no_bias"]  # the folders of the `models` fixture


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """`lm`: the tests' tiny sparse UoE (2 of 4 heads, 2 of 4 experts) with router losses large enough to show in the
    loss (doubling them would move it by about 0.15); `lm_tied`: with the LM head tied to the embeddings; `lm_gqa`: 4 query heads in 2 key/value groups, 1 selected; `lm_shared`: a shared head and expert plus 1 routed; `vision` / `vision_no_bias`: the vision tests' image classifier
    (routing patches, CLS through every expert) with and without MLP biases."""
    folder = tmp_path_factory.mktemp("models")
    tiny_model(router_aux_loss_coef=0.1, router_z_loss_coef=0.01).save_pretrained(folder / "lm")
    tiny_model(tie_word_embeddings=True).save_pretrained(folder / "lm_tied")
    tiny_model(num_key_value_heads=2, attention_top_k=1).save_pretrained(folder / "lm_gqa")  # a group per rank
    shared = dict(num_shared_attention_groups=1, attention_top_k=1, num_shared_mlp_experts=1, mlp_top_k=1)
    tiny_model(**shared).save_pretrained(folder / "lm_shared")  # the shared head is rank 0's
    for name, mlp_bias in (("vision", True), ("vision_no_bias", False)):
        torch.manual_seed(0)
        model = UoEForImageClassification(vision_config(mlp_bias=mlp_bias))
        with torch.no_grad():  # non-zero biases, so that adding one per rank would show
            for param_name, param in model.named_parameters():
                if param_name.endswith(("bias", "up_proj_bias")):
                    param.normal_(0.0, 0.2)
        model.save_pretrained(folder / name)
    return folder


@pytest.fixture(scope="module")
def tiny_dir(models) -> Path:
    return models / "lm"


def launch(tmp_path: Path, *task: str, ranks: int = 2) -> tuple[list[dict], Path]:
    """Run `distributed_checks.py TASK...` on `ranks` torchrun ranks (1: a plain process); return each rank's report
    and the output folder."""
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)] if ranks > 1 else []
    env = offline_env(tmp_path)
    env["PYTHONPATH"] = str(ROOT)  # the ranks import this checkout's `uoe`
    run([sys.executable, *launcher, str(CHECKS), *task, str(out_dir)], cwd=tmp_path, env=env, timeout=120)
    return [json.loads((out_dir / f"rank{rank}.json").read_text()) for rank in range(ranks)], out_dir


@pytest.fixture(scope="module")
def tp_run(models, tmp_path_factory):
    return launch(tmp_path_factory.mktemp("tp"), "tp", *[str(models / name) for name in MODELS])


@pytest.mark.slow
@pytest.mark.parametrize("model", MODELS)
def test_tensor_parallel_plan_shards_heads_and_experts(tp_run, model):
    tp = 2
    for rank_report in tp_run[0]:
        params = rank_report[model]["params"]
        replicated = {name for name, param in params.items() if not param["dtensor"]}
        for name, param in params.items():
            local, full = param["local_shape"], param["full_shape"]
            if name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight")):
                assert local == [full[0] // tp, full[1]], name  # whole head groups: half the heads' rows
            elif name.endswith("o_proj.weight"):
                assert local == [full[0], full[1] // tp], name
            elif name.endswith(("experts.gate_up_proj", "experts.up_proj")):
                assert local == [full[0], full[1] // tp, full[2]], name  # every expert, half its units
            elif name.endswith("experts.up_proj_bias"):
                assert local == [full[0], full[1] // tp], name
            elif name.endswith("experts.down_proj"):
                assert local == [full[0], full[1], full[2] // tp], name
            elif name in ("model.embed_tokens.weight", "lm_head.weight"):
                assert local[0] in (full[0] // tp, full[0] - full[0] // tp) and local[1] == full[1], name
            elif name.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")):
                assert local == [full[0] // tp], name
            elif name.endswith("o_proj.bias"):
                assert local == full, name  # replicated, added once after the all-reduce
            else:
                assert name in replicated and local == full, name
        # routers and norms (and the vision embeddings, output biases and classifier) are replicated: every rank
        # routes every token
        expected = {
            name
            for name in params
            if any(part in name for part in (".router.", "norm", "embeddings.", "classifier.", "mlp.output_bias"))
        }
        assert replicated == expected


@pytest.mark.slow
@pytest.mark.parametrize("model", MODELS)
def test_tensor_parallel_computes_the_one_process_model(tp_run, model):
    # every rank: the same logits, losses, router losses and gradients (DTensor grads gathered) as the unsharded model
    for rank_report in tp_run[0]:
        assert rank_report["world_size"] == 2
        report = rank_report[model]
        assert report["eval_logits_error"] < 1e-5
        for name in ("eval_loss", "train_loss", "aux_loss"):
            assert report[name] == pytest.approx(report[f"{name}_reference"], rel=1e-6), name
        assert report["grads"].keys() == report["params"].keys()
        for name, (difference, scale) in report["grads"].items():
            # 1e-5 of the gradient's largest entry; 1e-6 absolute for the key biases, whose exact gradient is 0
            assert difference <= 1e-5 * max(scale, 0.1), name  # routers too: a rank's heads reach only its gates
        if model.startswith("lm"):
            assert report["generated"] == report["generated_reference"]  # cached greedy decoding


@pytest.mark.slow
@pytest.mark.parametrize("model", MODELS)
def test_tensor_parallel_model_saves_whole(models, tp_run, model):
    # `save_pretrained` on the sharded model gathers every shard: the folder holds the unsharded weights
    model_class = UoEForImageClassification if model.startswith("vision") else UoEForCausalLM
    saved, info = model_class.from_pretrained(tp_run[1] / model / "saved", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    original = dict(model_class.from_pretrained(models / model).named_parameters())
    for name, param in saved.named_parameters():
        assert torch.equal(param, original[name]), name


def test_tensor_parallel_styles_refuse_uneven_splits():
    mesh = SimpleNamespace(size=lambda: 3)
    layer = tiny_model(num_attention_heads=4, intermediate_size=64, num_mlp_experts=4).model.layers[0]
    with pytest.raises(ValueError, match="num_key_value_heads"):
        UoESelectiveHeadsParallel().install_forward(layer.self_attn, mesh)
    with pytest.raises(ValueError, match="mlp_expert_size"):  # 16 units per expert
        UoEUnionMLPParallel().install_forward(layer.mlp, mesh)
    mesh = SimpleNamespace(size=lambda: 2)
    assert UoESelectiveHeadsParallel().install_forward(layer.self_attn, mesh).tp_mesh is mesh
    assert UoEUnionMLPParallel().install_forward(layer.mlp, mesh) is layer.mlp


@pytest.mark.slow
def test_pipeline_parallel_matches_one_process(tiny_dir, tmp_path):
    reports, _ = launch(tmp_path, "pp", str(tiny_dir))
    assert reports[0]["layers"] == ["UoEDecoderLayer", "PipelineIdentityLayer"]
    assert reports[1]["layers"] == ["PipelineIdentityLayer", "UoEDecoderLayer"]
    for report in reports:
        assert report["logits_error"] < 1e-6


@pytest.fixture(scope="module")
def single_process_training(tiny_dir, tmp_path_factory):
    reports, out_dir = launch(tmp_path_factory.mktemp("single"), "trainer", "single", str(tiny_dir), ranks=1)
    return reports[0], out_dir / "model"


def check_same_training(reports: list[dict], model_dir: Path, single: tuple[dict, Path], initial_dir: Path) -> None:
    """Both ranks logged what one process logged on the same global batch, and trained the same weights."""
    reference, reference_dir = single
    steps = reference["log_history"]
    assert [entry["step"] for entry in steps] == [1, 2, 3]
    for report in reports:
        assert [entry["step"] for entry in report["log_history"]] == [1, 2, 3]
        for entry, expected in zip(report["log_history"], steps, strict=True):
            # `loss` includes the router terms and `aux_loss` / `router_z_loss` are the callback's: doubled by the
            # world size (or rank 0's share only) they would differ by far more than this
            for key in ("loss", "grad_norm", "aux_loss", "router_z_loss"):
                assert entry[key] == pytest.approx(expected[key], rel=1e-5), (entry["step"], key)
            for key in expected:
                if key.startswith("router/"):  # expert loads of the whole global batch
                    assert entry[key] == pytest.approx(expected[key], abs=1e-4), (entry["step"], key)
    trained = UoEForCausalLM.from_pretrained(model_dir)
    expected = dict(UoEForCausalLM.from_pretrained(reference_dir).named_parameters())
    initial = dict(UoEForCausalLM.from_pretrained(initial_dir).named_parameters())
    for name, param in trained.named_parameters():
        assert (expected[name] - initial[name]).abs().max() > 1e-4, name  # 3 SGD steps moved every parameter
        torch.testing.assert_close(param, expected[name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.slow
def test_trainer_ddp_trains_the_one_process_model(tiny_dir, tmp_path, single_process_training):
    reports, out_dir = launch(tmp_path, "trainer", "ddp", str(tiny_dir))
    for report in reports:
        assert report["distributed_type"] == "DistributedType.MULTI_CPU"
        assert report["wrapper"] == "DistributedDataParallel"
    check_same_training(reports, out_dir / "model", single_process_training, tiny_dir)


@pytest.mark.slow
def test_trainer_fsdp_trains_the_one_process_model(tiny_dir, tmp_path, single_process_training):
    reports, out_dir = launch(tmp_path, "trainer", "fsdp", str(tiny_dir))
    for report in reports:
        # accelerate (1.x) turns FSDP on for accelerator ranks only and runs CPU ranks as DDP without a word; the
        # check switches it to FSDP2 the way run_clm.py does. When this fails, accelerate shards on CPU by itself.
        assert report["trainer_enabled_fsdp"] is False
        assert report["distributed_type"] == "DistributedType.FSDP"
        assert report["wrapper"] == "FSDPUoEForCausalLM" and report["sharded"]  # parameters were sharded DTensors
    check_same_training(reports, out_dir / "model", single_process_training, tiny_dir)


def torchrun(tmp_path: Path, corpus_files: tuple[Path, Path], extra: list[str]) -> tuple[Path, str]:
    train_file, validation_file = corpus_files
    output_dir = tmp_path / "out"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(EXAMPLES / "run_clm.py"),
        "--train_file", str(train_file), "--validation_file", str(validation_file),
        "--output_dir", str(output_dir), *TINY_ARGS,
        "--per_device_train_batch_size", "4", "--max_steps", "6", "--logging_steps", "2", "--eval_steps", "3",
        "--save_strategy", "no", "--no_plots", *extra,
    ]  # fmt: skip
    result = run(command, cwd=tmp_path, env=offline_env(tmp_path), timeout=300)
    return output_dir, result.stdout + result.stderr


@pytest.fixture(scope="module")
def ddp_run(corpus, tmp_path_factory):  # noqa: F811
    return torchrun(tmp_path_factory.mktemp("ddp"), corpus, [])


@pytest.fixture(scope="module")
def fsdp_run(corpus, tmp_path_factory):  # noqa: F811
    return torchrun(
        tmp_path_factory.mktemp("fsdp"), corpus, ["--fsdp", "full_shard", "--fsdp_config", str(FSDP_CONFIG)]
    )


def check_two_rank_run(output_dir: Path, log: str, distributed: str) -> dict:
    for rank in (0, 1):
        assert f"[rank {rank}/2] finished: 6 steps" in log, f"rank {rank} did not finish"
    results = json.loads((output_dir / "all_results.json").read_text())
    assert results["world_size"] == 2
    assert results["distributed"] == distributed
    # 6 steps x 2 ranks x 4 sequences x 64 tokens: both ranks fed the optimizer.
    assert results["num_input_tokens_seen"] == 6 * 2 * 4 * 64
    assert results["eval_perplexity"] == pytest.approx(math.exp(results["eval_token_loss"]), rel=1e-6)

    config = json.loads((output_dir / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_uoe.UoEForCausalLM"
    assert (output_dir / "modeling_uoe.py").is_file()
    assert not list(output_dir.glob("_fsdp_*.py"))
    model, info = AutoModelForCausalLM.from_pretrained(output_dir, output_loading_info=True)
    assert isinstance(model, UoEForCausalLM)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    logits = model(**tokenizer("KING.\nWhat say you?", return_tensors="pt")).logits
    assert torch.isfinite(logits).all()
    return results


@pytest.mark.slow
def test_ddp_on_two_cpu_ranks(ddp_run):
    check_two_rank_run(*ddp_run, distributed="ddp")


@pytest.mark.slow
def test_fsdp_on_two_cpu_ranks(fsdp_run):
    assert json.loads(FSDP_CONFIG.read_text())["transformer_layer_cls_to_wrap"] == ["UoEDecoderLayer"]
    output_dir, log = fsdp_run
    check_two_rank_run(output_dir, log, distributed="fsdp")  # parameters were sharded DTensors
    training_args = torch.load(output_dir / "training_args.bin", weights_only=False)
    assert training_args.fsdp_config["transformer_layer_cls_to_wrap"] == ["UoEDecoderLayer"]


@pytest.mark.slow
def test_fsdp_trains_the_same_model_as_ddp(ddp_run, fsdp_run):
    # Same seed, data order and global batch: sharding must not change the mathematics.
    ddp = json.loads((ddp_run[0] / "all_results.json").read_text())
    fsdp = json.loads((fsdp_run[0] / "all_results.json").read_text())
    assert fsdp["eval_token_loss"] == pytest.approx(ddp["eval_token_loss"], rel=1e-4)
    ddp_model = AutoModelForCausalLM.from_pretrained(ddp_run[0])
    fsdp_model = AutoModelForCausalLM.from_pretrained(fsdp_run[0])
    for (name, ddp_param), fsdp_param in zip(ddp_model.named_parameters(), fsdp_model.parameters(), strict=True):
        torch.testing.assert_close(fsdp_param, ddp_param, atol=1e-4, rtol=1e-3, msg=name)
