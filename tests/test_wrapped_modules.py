"""Every execution path honours what wraps, replaces or hooks a module: PEFT LoRA on the projections, torchao and
optimum-quanto quantization, accelerate's disk offload, ONNX export. The sparse paths read a projection's weights
directly only where that is provably the module's own computation (`gathered.reads_weights_directly`); otherwise
they call the module. Each case runs at sequence lengths on both sides of the CPU threshold where "auto" switches
between the masked and the gathered attention (`GATHERED_ATTENTION_MIN_KEYS` = 32), and on every backend CPU has
(the Triton kernels under Triton's interpreter), against the masked reference with the same modules.
"""

import contextlib
import copy

import pytest
import torch

import uoe
from uoe.gathered import reads_weights_directly
from uoe.selective_attention import GATHERED_ATTENTION_MIN_KEYS

from .helpers import require_triton, tiny_config

LENGTHS = [16, 48]  # below and above GATHERED_ATTENTION_MIN_KEYS
BACKENDS = ["gathered", "triton"]  # each held to "masked" with the same modules
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


def test_the_lengths_straddle_the_threshold():
    assert LENGTHS[0] < GATHERED_ATTENTION_MIN_KEYS <= LENGTHS[1]


def use_backend(backend: str, monkeypatch) -> None:
    if backend == "triton":
        require_triton()
        monkeypatch.setenv("TRITON_INTERPRET", "1")


def model_on(backend: str, seed: int = 0, **overrides) -> uoe.UoEForCausalLM:
    torch.manual_seed(seed)
    config = tiny_config(routing_backend=backend, initializer_range=0.05, **overrides)
    return uoe.UoEForCausalLM(config).eval()


def on_backend(model: torch.nn.Module, backend: str) -> torch.nn.Module:
    """A copy of the model (adapters and all) with another `routing_backend`."""
    model = copy.deepcopy(model)
    model.config.routing_backend = backend
    return model


@contextlib.contextmanager
def switched_to(model: torch.nn.Module, backend: str):
    """The model itself (quantized weights cannot be deep-copied) with another `routing_backend` for a while."""
    previous, model.config.routing_backend = model.config.routing_backend, backend
    try:
        yield model
    finally:
        model.config.routing_backend = previous


def input_ids(length: int) -> torch.Tensor:
    return torch.randint(0, 61, (2, length), generator=torch.Generator().manual_seed(length))


def tolerance(backend: str) -> float:
    return 1e-4 if backend == "triton" else 1e-5  # the interpreter's float32 kernels against PyTorch's


# -- the rule ---------------------------------------------------------------------------------------------------------


def test_only_plain_linear_layers_are_read_directly():
    cpu = torch.device("cpu")
    plain = torch.nn.Linear(4, 4)
    assert reads_weights_directly(plain, cpu)
    assert not reads_weights_directly(plain, torch.device("meta"))  # offloaded or elsewhere
    hooked = torch.nn.Linear(4, 4)
    hooked.register_forward_hook(lambda module, args, output: output)
    assert not reads_weights_directly(hooked, cpu)
    replaced = torch.nn.Linear(4, 4)
    replaced.forward = lambda x: x  # what accelerate's hooks do
    assert not reads_weights_directly(replaced, cpu)

    class Subclass(torch.nn.Linear):
        pass

    assert not reads_weights_directly(Subclass(4, 4), cpu)
    # global hooks are observers' (FlopCounterMode's module tracker): they do not turn the sparse paths dense
    handle = torch.nn.modules.module.register_module_forward_hook(lambda module, args, output: output)
    try:
        assert reads_weights_directly(plain, cpu)
    finally:
        handle.remove()


# -- PEFT LoRA --------------------------------------------------------------------------------------------------------


def lora_model(backend: str, target_modules) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    # init_lora_weights=False: a non-zero adapter, so that a path that skips it shows
    config = LoraConfig(r=4, lora_alpha=8, target_modules=target_modules, init_lora_weights=False)
    torch.manual_seed(1)
    return get_peft_model(model_on(backend), config)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("model_kind", ["causal_lm", "image_classifier"])
def test_lora_with_peri_norm_equals_the_masked_path(model_kind, backend, monkeypatch):
    """With peri-norm the value projection reads another stream (the residual) than the query/key projections: the
    sparse paths must still run the adapted `v_proj` on it. The decoder at the longer length (gathered attention under
    "auto") and the image encoder, against the masked path with the same adapters."""
    from peft import LoraConfig, get_peft_model

    from .test_vision import vision_model

    use_backend(backend, monkeypatch)
    if model_kind == "causal_lm":
        base, inputs = model_on("masked", norm_placement="peri"), {"input_ids": input_ids(LENGTHS[1])}
    else:
        pixels = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
        base, inputs = vision_model(seed=4, norm_placement="peri"), {"pixel_values": pixels}
    with torch.no_grad():
        plain = base(**inputs).logits
    torch.manual_seed(1)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=ATTENTION, init_lora_weights=False)
    reference = get_peft_model(base, config)
    with torch.no_grad():
        expected = reference(**inputs).logits
        actual = on_backend(reference, backend)(**inputs).logits
    assert (expected - plain).abs().max() > 1e-2  # the adapter matters
    torch.testing.assert_close(actual, expected, rtol=tolerance(backend), atol=tolerance(backend))


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("target_modules", [ATTENTION, "all-linear"], ids=["qkvo", "all-linear"])
@pytest.mark.parametrize("backend", ["auto", *BACKENDS])
def test_lora_on_attention_equals_the_masked_path_and_trains(backend, target_modules, length, monkeypatch):
    use_backend(backend, monkeypatch)
    ids = input_ids(length)
    model = lora_model(backend, target_modules)
    reference = on_backend(model, "masked")
    with torch.no_grad():
        plain = model_on("masked")(ids).logits
    losses = []
    for candidate in (model, reference):
        out = candidate(ids, labels=ids)
        out.loss.backward()
        losses.append(out)
    logits, expected = losses[0].logits.detach(), losses[1].logits.detach()
    assert (expected - plain).abs().max() > 1e-2  # the adapter matters
    torch.testing.assert_close(logits, expected, rtol=tolerance(backend), atol=tolerance(backend))
    lora = {name: param for name, param in model.named_parameters() if "lora_" in name}
    lora_reference = dict(reference.named_parameters())
    assert {name.split(".")[-4] for name in lora} >= set(ATTENTION)  # every projection is adapted
    for name, param in lora.items():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
        torch.testing.assert_close(param.grad, lora_reference[name].grad, rtol=1e-4, atol=1e-6)


def test_lora_on_attention_merges_and_reloads(tmp_path):
    from peft import PeftModel

    ids = input_ids(48)
    model = lora_model("auto", ATTENTION)
    with torch.no_grad():
        adapted = model(ids).logits
        model.save_pretrained(tmp_path / "adapter")
        reloaded = PeftModel.from_pretrained(model_on("auto"), tmp_path / "adapter").eval()
        torch.testing.assert_close(reloaded(ids).logits, adapted, rtol=1e-5, atol=1e-5)
        merged = model.merge_and_unload()
        assert all(type(merged.model.layers[0].self_attn.get_submodule(n)) is torch.nn.Linear for n in ATTENTION)
        torch.testing.assert_close(merged(ids).logits, adapted, rtol=1e-5, atol=1e-5)


# -- quantization -----------------------------------------------------------------------------------------------------


def torchao_config(kind: str):
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig

    return Int8WeightOnlyConfig() if kind == "int8_weight_only" else Int8DynamicActivationInt8WeightConfig()


def first_layer_inputs(model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logits, and the input each attention projection of the first layer was called with (hooks on the modules:
    a path that reads their weights instead records nothing)."""
    inputs = {}
    attention = model.model.layers[0].self_attn
    handles = [
        attention.get_submodule(name).register_forward_pre_hook(
            lambda module, args, n=name: inputs.update({n: args[0]})
        )
        for name in ATTENTION
    ]
    try:
        with torch.no_grad():
            logits = model(ids).logits
    finally:
        for handle in handles:
            handle.remove()
    return logits, inputs


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")
@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("backend", ["auto", *BACKENDS])
@pytest.mark.parametrize("kind", ["int8_weight_only", "int8_dynamic"])
def test_torchao_int8_runs_on_every_path_and_equals_the_masked_one(kind, backend, length, monkeypatch):
    """Every path calls the quantized projections on what the masked path gives them (first layer: equal to 1e-5).
    Weight-only int8 then gives equal logits (1e-5). Dynamic int8 also quantizes each activation row, so the paths'
    float32 rounding differences (1e-6, in attention and in the experts) can flip an int8 rounding: at this size a
    flip moves logits (of magnitude ~1) by up to 1e-2, so the logits are held to 2e-2."""
    from torchao.quantization import quantize_

    use_backend(backend, monkeypatch)
    ids = input_ids(length)
    model = model_on(backend)
    with torch.no_grad():
        unquantized = model(ids).logits
    quantize_(model, torchao_config(kind))
    assert not reads_weights_directly(model.model.layers[0].self_attn.q_proj, torch.device("cpu"))
    logits, inputs = first_layer_inputs(model, ids)
    with switched_to(model, "masked"):
        expected, expected_inputs = first_layer_inputs(model, ids)
    assert inputs.keys() == expected_inputs.keys() == set(ATTENTION)
    for name in ATTENTION:
        torch.testing.assert_close(inputs[name], expected_inputs[name], rtol=1e-5, atol=1e-5)
    exact = kind == "int8_weight_only"
    bound = tolerance(backend) if exact else 2e-2
    torch.testing.assert_close(logits, expected, rtol=0, atol=bound)
    if exact:
        assert (expected - unquantized).abs().max() > 1e-4  # the quantization is in effect


def test_torchao_config_in_from_pretrained(tmp_path):
    from torchao.quantization import Int8WeightOnlyConfig
    from transformers import TorchAoConfig

    model_on("auto").save_pretrained(tmp_path)
    ids = input_ids(48)
    quantized = uoe.UoEForCausalLM.from_pretrained(
        tmp_path, quantization_config=TorchAoConfig(Int8WeightOnlyConfig()), device_map="cpu"
    ).eval()
    with torch.no_grad(), switched_to(quantized, "masked"):
        expected = quantized(ids).logits
    with torch.no_grad():
        logits = quantized(ids).logits
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("backend", ["auto", *BACKENDS])
def test_quanto_int8_runs_on_every_path_and_equals_the_masked_one(backend, length, monkeypatch):
    from optimum.quanto import freeze, qint8, quantize

    use_backend(backend, monkeypatch)
    ids = input_ids(length)
    model = model_on(backend)
    with torch.no_grad():
        unquantized = model(ids).logits
    quantize(model, weights=qint8)
    freeze(model)
    with torch.no_grad(), switched_to(model, "masked"):
        expected = model(ids).logits
    with torch.no_grad():
        logits = model(ids).logits
    torch.testing.assert_close(logits, expected, rtol=tolerance(backend), atol=tolerance(backend))
    assert (expected - unquantized).abs().max() > 1e-4


# -- offload ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("backend", ["auto", *BACKENDS])
def test_disk_and_cpu_offload_equal_the_model_without_offload(backend, length, tmp_path, monkeypatch):
    use_backend(backend, monkeypatch)
    model_on(backend).save_pretrained(tmp_path / "model")
    ids = input_ids(length)
    with torch.no_grad():
        expected = uoe.UoEForCausalLM.from_pretrained(tmp_path / "model").eval()(ids).logits
        device_map = {
            "model.embed_tokens": "cpu",
            "model.rotary_emb": "cpu",
            "model.layers.0": "disk",  # weights stay on disk until the layer runs
            "model.layers.1": "cpu",
            "model.norm": "cpu",
            "lm_head": "cpu",
        }
        offloaded = uoe.UoEForCausalLM.from_pretrained(
            tmp_path / "model", device_map=device_map, offload_folder=tmp_path / "offload"
        ).eval()
        assert offloaded.model.layers[0].self_attn.q_proj.weight.device.type == "meta"
        torch.testing.assert_close(offloaded(ids).logits, expected, rtol=1e-6, atol=1e-6)


# -- ONNX -------------------------------------------------------------------------------------------------------------


class _Logits(torch.nn.Module):
    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning", "ignore::FutureWarning")
@pytest.mark.parametrize("length", LENGTHS)
def test_onnx_export_of_the_default_path_equals_eager(length, tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    model = model_on("auto")
    ids = input_ids(length)
    path = tmp_path / "uoe.onnx"
    torch.onnx.export(_Logits(model), (ids,), str(path), dynamo=True, verbose=False)
    session = onnxruntime.InferenceSession(str(path))
    (logits,) = session.run(None, {session.get_inputs()[0].name: ids.numpy()})
    with torch.no_grad():
        expected = model(ids).logits
    torch.testing.assert_close(torch.from_numpy(logits), expected, rtol=1e-4, atol=1e-4)


def test_under_onnx_export_auto_is_masked_and_explicit_sparse_paths_are_refused(monkeypatch):
    from uoe.selective_attention import resolve_routing_backend

    tensor = torch.zeros(1)
    assert resolve_routing_backend("auto", tensor) == "gathered"
    monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: True)
    assert resolve_routing_backend("auto", tensor) == "masked"
    assert resolve_routing_backend("masked", tensor) == "masked"
    for backend in ("gathered", "triton"):
        with pytest.raises(ValueError, match=f'routing_backend="{backend}".*ONNX'):
            resolve_routing_backend(backend, tensor)


# -- config overrides -------------------------------------------------------------------------------------------------


def test_overrides_are_validated_however_they_are_made(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    model_on("auto").save_pretrained(tmp_path)
    message = r"`attention_top_k`.*got 99"
    with pytest.raises(ValueError, match=message):
        AutoModelForCausalLM.from_pretrained(tmp_path, attention_top_k=99)
    with pytest.raises(ValueError, match=message):
        AutoConfig.from_pretrained(tmp_path, attention_top_k=99)
    config = AutoConfig.from_pretrained(tmp_path)
    config.attention_top_k = 99
    with pytest.raises(ValueError, match=message):
        uoe.UoEForCausalLM(config)
    with pytest.raises(ValueError, match=message):
        config.save_pretrained(tmp_path / "again")
