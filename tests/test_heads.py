"""The heads transformers users expect besides the causal LM: sequence classification (pooled on the last
non-padding token, like Llama's), token classification and extractive QA through transformers' generic heads,
registered with the Auto classes and in `auto_map`; and ViT's `interpolate_pos_encoding` for the image classifier."""

import pytest
import torch
from transformers import (
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    ViTConfig,
)
from transformers.models.vit.modeling_vit import ViTEmbeddings

import uoe

from .helpers import tiny_config
from .remote_code import many_logits_without_uoe, run_without_uoe
from .test_vision import vision_config, vision_model

PAD = 0


def head_config(**overrides) -> uoe.UoEConfig:
    return tiny_config(pad_token_id=PAD, num_labels=3, **overrides)


def padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Two sequences of 40 tokens: the first right-padded after 30 tokens, the second left-padded by 6."""
    ids = torch.randint(1, 61, (2, 40), generator=torch.Generator().manual_seed(5))
    ids[0, 30:] = PAD
    ids[1, :6] = PAD
    return ids, (ids != PAD).long()


@pytest.mark.parametrize(
    "auto_class, model_class",
    [
        (AutoModelForSequenceClassification, uoe.UoEForSequenceClassification),
        (AutoModelForTokenClassification, uoe.UoEForTokenClassification),
        (AutoModelForQuestionAnswering, uoe.UoEForQuestionAnswering),
    ],
)
def test_auto_classes_build_and_load_the_heads(auto_class, model_class, tmp_path):
    torch.manual_seed(0)
    model = auto_class.from_config(head_config()).eval()
    assert type(model) is model_class
    model.save_pretrained(tmp_path)
    reloaded = auto_class.from_pretrained(tmp_path).eval()
    ids, mask = padded_batch()
    with torch.no_grad():
        outputs, again = model(ids, attention_mask=mask), reloaded(ids, attention_mask=mask)
    for name in ("logits", "start_logits", "end_logits"):
        if name in outputs:
            torch.testing.assert_close(again[name], outputs[name], rtol=0, atol=0)
    auto_map = reloaded.config.auto_map
    for auto_name in (
        "AutoModelForCausalLM",
        "AutoModelForSequenceClassification",
        "AutoModelForTokenClassification",
        "AutoModelForQuestionAnswering",
    ):
        assert auto_map[auto_name].startswith("modeling_uoe.UoEFor"), auto_name


def test_sequence_classification_pools_the_last_real_token():
    """The score of each sequence is the head applied to the base model's hidden state at its last non-padding token
    (left and right padding), and equals the sequence classified alone."""
    torch.manual_seed(0)
    model = uoe.UoEForSequenceClassification(head_config()).eval()
    ids, mask = padded_batch()
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits
        hidden = model.model(ids, attention_mask=mask).last_hidden_state
        expected = torch.stack([model.score(hidden[0, 29]), model.score(hidden[1, 39])])
        torch.testing.assert_close(logits, expected, rtol=1e-6, atol=1e-6)
        alone = model(ids[1:, 6:]).logits  # one sequence needs no padding token
        torch.testing.assert_close(logits[1:], alone, rtol=1e-5, atol=1e-5)
    labels = torch.tensor([0, 2])
    loss = model(ids, attention_mask=mask, labels=labels).loss
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits, labels), rtol=1e-5, atol=1e-6)


def test_token_classification_and_qa_losses_train_the_head():
    torch.manual_seed(0)
    ids, mask = padded_batch()
    tokens = uoe.UoEForTokenClassification(head_config()).train()
    labels = torch.randint(0, 3, ids.shape).masked_fill(mask == 0, -100)
    tokens(ids, attention_mask=mask, labels=labels).loss.backward()
    assert tokens.score.weight.grad.abs().sum() > 0
    qa = uoe.UoEForQuestionAnswering(head_config()).train()
    out = qa(ids, attention_mask=mask, start_positions=torch.tensor([3, 10]), end_positions=torch.tensor([5, 12]))
    out.loss.backward()
    assert qa.qa_outputs.weight.grad.abs().sum() > 0


def test_the_heads_load_by_remote_code(tmp_path):
    ids, mask = padded_batch()
    folders = []
    for auto_class in (AutoModelForSequenceClassification, AutoModelForTokenClassification):
        torch.manual_seed(0)
        model = auto_class.from_config(head_config()).eval()
        folder = tmp_path / auto_class.__name__
        model.save_pretrained(folder)
        folders.append((auto_class.__name__, folder, model))
    for name, folder, model in folders:
        logits, info = many_logits_without_uoe([folder], {"input_ids": ids, "attention_mask": mask}, tmp_path, name)
        assert info["classes"] == [type(model).__name__] and not info["uoe_loaded"]
        with torch.no_grad():
            torch.testing.assert_close(logits[0], model(ids, attention_mask=mask).logits, rtol=1e-6, atol=1e-6)
    torch.manual_seed(0)
    AutoModelForQuestionAnswering.from_config(head_config()).save_pretrained(tmp_path / "qa")
    script = (
        "from transformers import AutoModelForQuestionAnswering\n"
        "model = AutoModelForQuestionAnswering.from_pretrained(sys.argv[1], trust_remote_code=True)\n"
        "print(type(model).__name__)\n"
    )
    assert run_without_uoe(script, [str(tmp_path / "qa")], tmp_path).strip().endswith("UoEForQuestionAnswering")


# -- interpolate_pos_encoding ---------------------------------------------------------------------------------------


def test_interpolated_learned_positions_equal_vits():
    """The resized positions equal ViT's own `interpolate_pos_encoding` of the same trained table."""
    model = vision_model()
    embeddings = model.model.embeddings
    vit_config = ViTConfig(hidden_size=32, image_size=8, patch_size=2, num_channels=3)
    vit = ViTEmbeddings(vit_config)
    with torch.no_grad():
        vit.position_embeddings.copy_(embeddings.position_embeddings)
        for grid in ((6, 6), (4, 7), (4, 4)):
            expected = vit.interpolate_pos_encoding(torch.zeros(1, 1 + grid[0] * grid[1], 32), grid[0] * 2, grid[1] * 2)
            torch.testing.assert_close(embeddings.interpolate_pos_encoding(grid), expected, rtol=1e-6, atol=1e-6)


def test_other_image_sizes_need_interpolate_pos_encoding():
    model = vision_model()
    pixels = torch.randn(2, 3, 12, 12)
    with pytest.raises(ValueError, match="interpolate_pos_encoding=True"):
        model(pixels)
    with torch.no_grad():
        logits = model(pixels, interpolate_pos_encoding=True).logits
        same_size = torch.randn(2, 3, 8, 8)
        # at the trained size the flag changes nothing
        torch.testing.assert_close(
            model(same_size, interpolate_pos_encoding=True).logits, model(same_size).logits, rtol=0, atol=0
        )
    assert logits.shape == (2, 5) and torch.isfinite(logits).all()
    with pytest.raises(ValueError, match="routing_patch_size"):
        model(torch.randn(1, 3, 6, 2), interpolate_pos_encoding=True)  # 3 image tokens, patches of 2


def test_rotary_vision_models_take_other_sizes_with_the_flag():
    torch.manual_seed(0)
    model = uoe.UoEForImageClassification(
        vision_config(position_embedding_type="rope", max_position_embeddings=64)
    ).eval()
    with torch.no_grad():
        logits = model(torch.randn(2, 3, 12, 8), interpolate_pos_encoding=True).logits
    assert logits.shape == (2, 5) and torch.isfinite(logits).all()
