"""MoEUT's ideas as UoE options (Csordás et al., 2024): layer grouping (`num_layer_groups`), σ-MoE's entropy balance
loss (`router_balance_loss="entropy"`) and peri-layernorm (`norm_placement="peri"`)."""

import math
import re

import pytest
import torch
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

import uoe
from uoe.modeling_uoe import RoutingInputs

from .helpers import (
    checkpointing_argument,
    enable_checkpointing,
    require_triton,
    returned_cache,
    tiny_config,
    tiny_model,
)
from .reference_uoe import _rms_norm, _rope, _select
from .remote_code import many_logits_without_uoe
from .test_training import assert_same_gradients, promised_gradients, trainer_gradients
from .test_vision import vision_config, vision_model


def copies_of(grouped: uoe.UoEForCausalLM, **overrides) -> uoe.UoEForCausalLM:
    """The ungrouped model of the same config whose layer `a * G + j` holds a copy of the grouped model's layer j."""
    config = grouped.config
    num_groups, num_layers = config.num_layer_groups, config.num_hidden_layers
    ungrouped = uoe.UoEForCausalLM(
        uoe.UoEConfig(**{**config.to_diff_dict(), "num_layer_groups": None, **overrides})
    ).to(grouped.dtype)
    state = {}
    for name, tensor in grouped.state_dict().items():
        match = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
        if match is None:
            state[name] = tensor.clone()
            continue
        for application in range(num_layers // num_groups):
            state[f"model.layers.{application * num_groups + int(match[1])}.{match[2]}"] = tensor.clone()
    ungrouped.load_state_dict(state, strict=True)
    return ungrouped.eval()


def padded_batch(seq_len: int = 12, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, 61, (3, seq_len), generator=generator)
    attention_mask = torch.ones(3, seq_len, dtype=torch.long)
    attention_mask[1, :4] = 0  # left padding
    attention_mask[2, :2] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


# -- layer grouping --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "num_groups, backend, norm_placement", [(1, "masked", "pre"), (2, "gathered", "pre"), (2, "masked", "peri")]
)
def test_grouped_model_equals_ungrouped_copies_in_outputs_and_summed_gradients(num_groups, backend, norm_placement):
    torch.manual_seed(0)
    config = tiny_config(
        num_hidden_layers=4,
        num_layer_groups=num_groups,
        routing_backend=backend,
        norm_placement=norm_placement,
        router_z_loss_coef=0.1,
    )
    grouped = uoe.UoEForCausalLM(config).double().eval()
    assert len(grouped.model.layers) == num_groups
    ungrouped = copies_of(grouped)
    batch = padded_batch()
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    outputs = [
        model(**batch, labels=labels, output_router_logits=True, output_hidden_states=True)
        for model in (grouped, ungrouped)
    ]
    torch.testing.assert_close(outputs[0].logits, outputs[1].logits, rtol=1e-10, atol=1e-12)
    for field in ("loss", "aux_loss", "router_z_loss"):  # float32: the router terms and transformers' token loss
        torch.testing.assert_close(getattr(outputs[0], field), getattr(outputs[1], field), rtol=1e-6, atol=0)
    # one router entry per application of each block and one hidden state per application (+ the embeddings)
    for field, count in (("router_logits", 2 * 4), ("hidden_states", 4 + 1)):
        assert len(getattr(outputs[0], field)) == len(getattr(outputs[1], field)) == count
        for a, b in zip(getattr(outputs[0], field), getattr(outputs[1], field), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)

    for out in outputs:
        out.loss.backward()
    copies = dict(ungrouped.named_parameters())
    for name, param in grouped.named_parameters():
        match = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
        if match is None:
            expected = copies[name].grad
        else:  # a shared weight gets the gradients of all its applications
            layers = range(int(match[1]), 4, num_groups)
            expected = sum(copies[f"model.layers.{layer}.{match[2]}"].grad for layer in layers)
        assert expected is not None and float(expected.abs().max()) > 0, name
        torch.testing.assert_close(param.grad, expected, rtol=1e-9, atol=1e-12, msg=name)


def test_grouped_model_with_gradient_checkpointing_gives_the_same_gradients():
    batch = padded_batch()
    grads = []
    for checkpointing in (False, True):
        model = tiny_model(num_hidden_layers=4, num_layer_groups=2, router_balance_loss="entropy").train()
        assert len(model.model.layers) == 2
        if checkpointing:
            enable_checkpointing(model)
        model(**batch, labels=batch["input_ids"]).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and any(".router." in name for name in grads[0])
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7, msg=name)


def test_grouping_counts_applications_in_flops_and_distinct_layers_in_parameters():
    grouped, ungrouped = tiny_model(num_hidden_layers=6, num_layer_groups=2), tiny_model(num_hidden_layers=6)
    assert uoe.estimate_flops_per_token(grouped.config, 64) == uoe.estimate_flops_per_token(ungrouped.config, 64)
    per_layer = sum(p.numel() for p in ungrouped.model.layers[0].parameters())
    assert grouped.num_parameters() == ungrouped.num_parameters() - 4 * per_layer
    assert sorted({name.split(".")[2] for name, _ in grouped.named_parameters() if ".layers." in name}) == ["0", "1"]


def test_grouped_model_refuses_pipeline_stages():
    """A pipeline stage replaces the layers it does not run by placeholders; the applications of a group need them."""

    class Placeholder(torch.nn.Module):  # like transformers' pipeline identity layer
        def forward(self, hidden_states, *args, **kwargs):
            return hidden_states

    model = tiny_model(num_hidden_layers=4, num_layer_groups=2)
    model.model.layers[1] = Placeholder()
    with pytest.raises(ValueError, match="num_layer_groups"):
        model(torch.randint(0, 61, (1, 5)))


@pytest.mark.parametrize(
    "backend, norm_placement, token_major",
    [("masked", "pre", True), ("gathered", "pre", True), ("gathered", "peri", True), ("gathered", "peri", False)],
)
def test_grouped_cached_decoding_equals_full_pass_with_a_cache_slot_per_application(
    backend, norm_placement, token_major, monkeypatch
):
    if not token_major:  # decoding through the sorted grouped products instead of copied weight slices
        monkeypatch.setattr(uoe.gathered, "TOKEN_MAJOR_MAX_WEIGHTS", 0)
    grouped = tiny_model(
        num_hidden_layers=4, num_layer_groups=2, routing_backend=backend, norm_placement=norm_placement
    )
    ungrouped = copies_of(grouped)
    input_ids = torch.randint(0, 61, (2, 13), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = grouped(input_ids).logits
        out = grouped(input_ids[:, :5], use_cache=True)
        cache, pieces = returned_cache(out), [out.logits]
        pieces.append(grouped(input_ids[:, 5:8], cache=cache, use_cache=True).logits)
        for t in range(8, 13):
            pieces.append(grouped(input_ids[:, t : t + 1], cache=cache, use_cache=True).logits)
        copy_cache = returned_cache(ungrouped(input_ids, use_cache=True))
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=0, atol=1e-5)
    # slot a * G + j holds application a of layer j: the same keys, values and routing as the copies' layer a * G + j
    assert len(cache.layers) == 4
    for slot, copy_slot in zip(cache.layers, copy_cache.layers, strict=True):
        torch.testing.assert_close(slot.keys, copy_slot.keys, rtol=0, atol=1e-5)
        torch.testing.assert_close(slot.values, copy_slot.values, rtol=0, atol=1e-5)
        assert torch.equal(slot.routing["head_selected"], copy_slot.routing["head_selected"])
    assert not torch.allclose(cache.layers[0].keys, cache.layers[2].keys)  # two applications of layer 0


def test_grouped_greedy_generation_same_with_and_without_cache():
    model = tiny_model(num_hidden_layers=4, num_layer_groups=2, norm_placement="peri")
    assert len(model.model.layers) == 2
    prompt = torch.randint(0, 61, (2, 6), generator=torch.Generator().manual_seed(2))
    kwargs = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert torch.equal(
        model.generate(prompt, use_cache=True, **kwargs), model.generate(prompt, use_cache=False, **kwargs)
    )


# -- entropy balance loss --------------------------------------------------------------------------


def negative_entropy(probs: torch.Tensor) -> float:
    mean = probs.mean(0)
    return float((mean * mean.log()).sum())


@pytest.mark.parametrize("num_groups", [None, 2, 1])
def test_entropy_loss_equals_float64_formula_over_tokens_and_applications(num_groups):
    """aux_loss = mean over the routed blocks of the distinct layers of sum_e p_e log p_e, p the softmax of the block's
    router logits averaged over the non-padding tokens of the batch and over every application of the layer."""
    model = tiny_model(
        num_hidden_layers=4, num_layer_groups=num_groups, router_balance_loss="entropy", router_score_func="sigmoid"
    )
    batch = padded_batch()
    with torch.no_grad():
        out = model(**batch, output_router_logits=True)
    real = batch["attention_mask"].bool()
    groups = num_groups or 4
    probs = [logits.double().softmax(-1)[real] for logits in out.router_logits]  # (real tokens, experts) each
    per_layer, per_application = [], []
    for layer in range(groups):
        for block in range(2):  # SMHA, UoME
            applications = [probs[2 * (application * groups + layer) + block] for application in range(4 // groups)]
            per_layer.append(negative_entropy(torch.cat(applications)))
            per_application.extend(negative_entropy(p) for p in applications)
    expected = sum(per_layer) / len(per_layer)
    assert float(out.aux_loss) == pytest.approx(expected, rel=1e-5, abs=1e-7)
    assert -math.log(4) <= expected < 0
    if num_groups is not None:  # the test tells the entropy of the pooled applications from the mean of theirs
        assert abs(expected - sum(per_application) / len(per_application)) > 1e-3


def test_entropy_loss_trains_the_routers_and_is_weighted_by_its_coefficient():
    model = tiny_model(router_balance_loss="entropy", router_aux_loss_coef=0.3, router_z_loss_coef=0.0).train()
    input_ids = torch.randint(0, 61, (2, 10), generator=torch.Generator().manual_seed(3))
    out = model(input_ids, labels=input_ids)
    assert float(out.aux_loss.detach()) < 0  # a negative entropy
    token_loss = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 61), input_ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, token_loss + 0.3 * out.aux_loss)
    out.aux_loss.backward()
    router_grads = [p.grad for n, p in model.named_parameters() if ".router." in n]
    assert router_grads and all(g is not None and float(g.abs().max()) > 0 for g in router_grads)


def test_entropy_loss_under_gradient_accumulation_is_the_token_weighted_mean_of_micro_batches(tmp_path):
    """Like the Switch loss: each micro-batch's entropy loss over its own tokens, weighted by its token share (the
    entropy loss itself is checked against the formula above)."""
    on = dict(
        router_aux_loss_coef=0.5,
        router_z_loss_coef=0.1,
        router_balance_loss="entropy",
        num_hidden_layers=4,
        num_layer_groups=2,
    )
    assert_same_gradients(trainer_gradients(tmp_path, 4, 2, **on), promised_gradients(2, **on))


def test_entropy_loss_of_the_image_encoder_per_block():
    model = vision_model(router_balance_loss="entropy")
    pixels = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        out = model(pixels, output_router_logits=True)
    expected = [negative_entropy(logits.double().softmax(-1).flatten(0, 1)) for logits in out.router_logits]
    assert float(out.aux_loss) == pytest.approx(sum(expected) / len(expected), rel=1e-5)


# -- peri-layernorm --------------------------------------------------------------------------------


def reference_layer(layer: torch.nn.Module, config: uoe.UoEConfig, x: torch.Tensor, peri: bool) -> torch.Tensor:
    """One decoder layer on one sequence `(seq, hidden)`, plain loops in float64. Peri-layernorm: the norms feed the
    routers and the query/key projections; the value projection and the MLP experts read the residual stream."""
    sd = {name: tensor.detach().double() for name, tensor in layer.state_dict().items()}
    seq, heads, head_dim = x.shape[0], config.num_attention_heads, config.head_dim
    theta, eps, expert_size = config.rope_parameters["rope_theta"], config.rms_norm_eps, config.mlp_expert_size

    h = _rms_norm(x, sd["input_layernorm.weight"], eps)
    router = h @ sd["self_attn.router.weight"].T
    heads_of = [
        _select(router[t], config.attention_top_k, config.router_score_func, config.gate_mode) for t in range(seq)
    ]
    q = (h @ sd["self_attn.q_proj.weight"].T).view(seq, heads, head_dim)
    k = (h @ sd["self_attn.k_proj.weight"].T).view(seq, heads, head_dim)
    v = ((x if peri else h) @ sd["self_attn.v_proj.weight"].T).view(seq, heads, head_dim)
    attn = torch.zeros(seq, heads, head_dim, dtype=torch.float64)
    for t in range(seq):
        for head, gate in heads_of[t].items():
            keys = [j for j in range(t + 1) if head in heads_of[j]]
            scores = torch.stack([_rope(q[t, head], t, theta) @ _rope(k[j, head], j, theta) for j in keys])
            weights = torch.softmax(scores / math.sqrt(head_dim), 0)
            attn[t, head] = gate * sum(w * v[j, head] for w, j in zip(weights, keys, strict=True))
    x = x + attn.reshape(seq, -1) @ sd["self_attn.o_proj.weight"].T

    h = _rms_norm(x, sd["post_attention_layernorm.weight"], eps)
    router = h @ sd["mlp.router.weight"].T
    expert_input = x if peri else h
    gate_up, down = sd["mlp.experts.gate_up_proj"], sd["mlp.experts.down_proj"]
    mlp = torch.zeros_like(x)
    for t in range(seq):
        for expert, gate in _select(router[t], config.mlp_top_k, config.router_score_func, config.gate_mode).items():
            g, u = gate_up[expert][:expert_size] @ expert_input[t], gate_up[expert][expert_size:] @ expert_input[t]
            mlp[t] += gate * (down[expert] @ (torch.nn.functional.silu(g) * u))
    return x + mlp


@pytest.mark.parametrize("backend", ["masked", "gathered"])
@pytest.mark.parametrize("top_k", [2, 4])  # sparse, and full routing (the dense layer with peri-norm)
def test_peri_norm_layer_equals_plain_loop_reference(backend, top_k):
    outputs = {}
    for placement in ("pre", "peri"):
        model = tiny_model(
            norm_placement=placement, routing_backend=backend, attention_top_k=top_k, mlp_top_k=top_k
        ).double()
        layer, config = model.model.layers[0], model.config
        x = torch.randn(1, 11, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
        with torch.no_grad():
            rotary = model.model.rotary_emb(x, torch.arange(11)[None])
            out, _ = layer(x, rotary, RoutingInputs(source_index=None, token_mask=None))
        expected = reference_layer(layer, config, x[0], peri=placement == "peri")
        # 1e-6: the model's RMSNorm and rotary tables are float32 even in a float64 model (as in Llama)
        torch.testing.assert_close(out[0], expected, rtol=1e-6, atol=1e-6)
        outputs[placement] = out
    # same seed, same weights: the placement alone changes the layer
    assert float((outputs["pre"] - outputs["peri"]).abs().max()) > 1e-2


# -- compile, checkpoints, Trainer, invalid values -------------------------------------------------


def test_all_options_compile_as_one_graph_with_the_eager_loss_and_gradients():
    """One distinct layer applied twice, the entropy loss and peri-norm: `fullgraph=True` (no graph break) forward and
    backward give eager's loss and gradients (`aot_eager`, as in test_modeling's compile test)."""
    options = dict(
        routing_backend="masked",
        num_hidden_layers=2,
        num_layer_groups=1,
        router_balance_loss="entropy",
        norm_placement="peri",
    )
    eager, compiled_model = tiny_model(**options).train(), tiny_model(**options).train()
    compiled = torch.compile(compiled_model, fullgraph=True, backend="aot_eager")
    batch = padded_batch(seq_len=9)
    losses = []
    for run in (eager, compiled):
        out = run(**batch, labels=batch["input_ids"])
        out.loss.backward()
        losses.append(out.loss.detach())
        assert float(out.aux_loss.detach()) < 0  # the entropy loss
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=0)
    for (name, p), q in zip(eager.named_parameters(), compiled_model.parameters(), strict=True):
        assert p.grad is not None and float(p.grad.abs().max()) > 0, name
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-7, msg=name)


OPTIONS = {
    "grouped": dict(num_hidden_layers=4, num_layer_groups=2),
    "entropy": dict(router_balance_loss="entropy"),
    "peri": dict(norm_placement="peri"),
}


def check_option_is_active(model: uoe.UoEForCausalLM, name: str, batch: dict[str, torch.Tensor]) -> None:
    """The option changes the model (not only a config attribute that nothing reads)."""
    with torch.no_grad():
        out = model(**batch, output_router_logits=True)
    if name == "grouped":
        assert len(model.model.layers) == 2 and len(out.router_logits) == 2 * 4
    elif name == "entropy":
        # the entropy of each block's router distribution pooled over the real tokens, not the mean of the tokens'
        # entropies (planted bug: an unpooled entropy, which the former bound -log 4 <= aux_loss < 0 let through)
        real = batch["attention_mask"].bool()
        probs = [logits.double().softmax(-1)[real] for logits in out.router_logits]
        pooled = sum(negative_entropy(p) for p in probs) / len(probs)
        unpooled = sum(float((p * p.log()).sum(-1).mean()) for p in probs) / len(probs)
        assert float(out.aux_loss) == pytest.approx(pooled, rel=1e-5, abs=1e-7)
        assert abs(pooled - unpooled) > 1e-3
    else:  # the same weights with pre-norm give other logits
        pre = uoe.UoEForCausalLM(uoe.UoEConfig(**{**model.config.to_diff_dict(), "norm_placement": "pre"})).eval()
        pre.load_state_dict(model.state_dict())
        with torch.no_grad():
            assert float((pre(**batch).logits - out.logits).abs().max()) > 1e-3


def test_each_option_round_trips_through_save_pretrained_and_remote_code(tmp_path):
    batch = padded_batch(seq_len=10)
    folders, expected = [], []
    for name, options in OPTIONS.items():
        model = tiny_model(**options)
        folder = tmp_path / name
        model.save_pretrained(folder)
        loaded = AutoModelForCausalLM.from_pretrained(folder).eval()
        for field, value in options.items():
            assert getattr(loaded.config, field) == value
        check_option_is_active(loaded, name, batch)
        with torch.no_grad():
            expected.append(model(**batch).logits)
            assert torch.equal(loaded(**batch).logits, expected[-1])
        folders.append(folder)
    all_logits, info = many_logits_without_uoe(folders, batch, tmp_path)
    assert not info["uoe_loaded"] and set(info["classes"]) == {"UoEForCausalLM"}
    for logits, reference in zip(all_logits, expected, strict=True):
        assert torch.equal(logits, reference)


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self):
        self.input_ids = torch.randint(0, 61, (8, 16), generator=torch.Generator().manual_seed(6))

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[index], "labels": self.input_ids[index]}


@pytest.mark.parametrize("name", list(OPTIONS))
def test_each_option_trains_with_trainer_and_gradient_checkpointing(name, tmp_path):
    model = tiny_model(**OPTIONS[name]).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        **checkpointing_argument(),
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        use_cpu=True,
    )
    Trainer(model=model, args=args, train_dataset=RandomTokens()).train()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed == set(before), set(before) - changed  # every weight, routers and shared layers included
    check_option_is_active(model.eval(), name, padded_batch())


@pytest.mark.parametrize(
    "field, value",
    [
        ("num_layer_groups", 3),  # does not divide num_hidden_layers=4
        ("num_layer_groups", 0),
        ("num_layer_groups", -2),
        ("num_layer_groups", True),
        ("num_layer_groups", 2.0),
        ("router_balance_loss", "z"),
        ("router_balance_loss", None),
        ("norm_placement", "post"),
        ("norm_placement", True),
    ],
)
def test_invalid_values_raise_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        tiny_config(num_hidden_layers=4, **{field: value})


def test_from_dense_refuses_layer_grouping():
    from transformers import LlamaConfig, LlamaForCausalLM

    dense = LlamaForCausalLM(
        LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    )
    with pytest.raises(ValueError, match="num_layer_groups"):
        uoe.UoEForCausalLM.from_dense(dense, num_mlp_experts=4, num_layer_groups=1)


def test_image_encoder_refuses_layer_grouping():
    with pytest.raises(ValueError, match="num_layer_groups"):
        uoe.UoEForImageClassification(vision_config(num_layer_groups=1))


@pytest.mark.parametrize("backend", ["masked", "gathered", "triton"])
def test_peri_norm_image_encoder_equals_plain_loop_reference(backend, monkeypatch):
    """The image classifier with peri-norm (weighted gates, a shared MLP expert, patch routing) on each path equals
    the float64 plain-loop encoder of `tests/reference_encoder.py`, where the value projection and the MLP experts read
    the residual stream. Planted bug the reference catches: the encoder ignoring `norm_placement` (pre and peri
    differ by more than the tolerance on the same weights, checked below)."""
    from .reference_encoder import reference_image_logits

    if backend == "triton":
        require_triton()
        monkeypatch.setenv("TRITON_INTERPRET", "1")  # float32 only under the interpreter
    dtype = torch.float32 if backend == "triton" else torch.float64
    pixel_values = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(3), dtype=dtype)
    logits = {}
    for placement in ("pre", "peri"):
        model = vision_model(
            seed=4, norm_placement=placement, gate_mode="weighted", num_shared_mlp_experts=1, routing_backend=backend
        ).to(dtype)
        with torch.no_grad():
            logits[placement] = model(pixel_values).logits
        expected = reference_image_logits(model, pixel_values).to(dtype)
        # float64 paths: 1e-6 (LayerNorm and softmax reorder sums); the float32 Triton path: 1e-4
        tolerance = 1e-4 if dtype == torch.float32 else 1e-6
        torch.testing.assert_close(logits[placement], expected, rtol=0, atol=tolerance)
    assert float((logits["pre"] - logits["peri"]).abs().max()) > 1e-2


def test_grouped_peri_model_on_the_triton_path_under_the_interpreter(monkeypatch):
    """The Triton path (kernels under Triton's CPU interpreter) of a grouped peri-norm model gives the masked path's
    logits, and its cached decoding the full pass's."""
    require_triton()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    options = dict(num_hidden_layers=2, num_layer_groups=1, norm_placement="peri")
    masked, triton = tiny_model(routing_backend="masked", **options), tiny_model(routing_backend="triton", **options)
    input_ids = torch.randint(0, 61, (2, 7), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = masked(input_ids).logits
        torch.testing.assert_close(triton(input_ids).logits, expected, rtol=0, atol=1e-4)
        out = triton(input_ids[:, :5], use_cache=True)
        steps = [out.logits] + [
            triton(input_ids[:, t : t + 1], cache=returned_cache(out), use_cache=True).logits for t in (5, 6)
        ]
    torch.testing.assert_close(torch.cat(steps, dim=1), expected, rtol=0, atol=1e-4)


# -- every option at once ---------------------------------------------------------------------------


def all_options_model(**overrides) -> uoe.UoEForCausalLM:
    """Grouping, peri-norm and the entropy loss of MoEUT with a shared head and expert and a 2-step chain."""
    options = dict(
        num_hidden_layers=4,
        num_layer_groups=2,
        norm_placement="peri",
        router_balance_loss="entropy",
        num_shared_attention_groups=1,
        attention_top_k=1,
        num_shared_mlp_experts=1,
        mlp_top_k=1,
        mlp_chain_length=2,
    )
    return tiny_model(**{**options, **overrides})


@pytest.mark.parametrize("backend", ["masked", "gathered"])
def test_all_options_together_decode_with_the_cache_as_the_full_pass(backend):
    model = all_options_model(routing_backend=backend)
    input_ids = torch.randint(0, 61, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = model(input_ids).logits
        out = model(input_ids[:, :6], use_cache=True)
        cache, pieces = returned_cache(out), [out.logits]
        for t in range(6, 12):
            pieces.append(model(input_ids[:, t : t + 1], cache=cache, use_cache=True).logits)
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=0, atol=1e-5)


def test_all_options_together_entropy_loss_pools_chain_blocks_per_distinct_layer():
    """With a chain, each distinct layer has 1 + C routed blocks (SMHA, UoME iteration 0, 1): the entropy loss is the
    mean over those blocks of the distinct layers, each pooled over the layer's applications (float64 formula)."""
    model = all_options_model()
    batch = padded_batch()
    with torch.no_grad():
        out = model(**batch, output_router_logits=True)
    real = batch["attention_mask"].bool()
    blocks, groups, applications = 3, 2, 2
    assert len(out.router_logits) == blocks * groups * applications
    probs = [logits.double().softmax(-1)[real] for logits in out.router_logits]
    per_block = [
        negative_entropy(
            torch.cat([probs[blocks * (application * groups + layer) + block] for application in range(applications)])
        )
        for layer in range(groups)
        for block in range(blocks)
    ]
    assert float(out.aux_loss) == pytest.approx(sum(per_block) / len(per_block), rel=1e-5, abs=1e-7)
