"""The ListOps generator, tokenizer and evaluator of benchmarks/listops.py."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import listops  # noqa: E402


@pytest.mark.parametrize(
    "expression, value",
    [
        ("[MAX 2 9 [MIN 4 7 ] 0 ]", 9),
        ("[SM 5 6 7 ]", 8),
        ("[SM 5 6 7]", 8),  # the closing bracket may touch the last argument
        ("[MED 1 5 3 9 ]", 4),  # even count: int(median) = int((3 + 5) / 2)
        ("[MED 1 2 ]", 1),  # int(1.5)
        ("[MED 7 1 4 ]", 4),
        ("[MIN 3 [MAX 1 2 ] 8 ]", 2),
        ("[SM [SM 9 9 ] [MED 2 8 6 ] 3 ]", 7),  # (8 + 6 + 3) % 10
        ("[MAX [MIN [SM 4 4 ] 9 ] [MED 0 0 1 1 ] ]", 8),
        ("5", 5),
    ],
)
def test_evaluator_on_hand_made_expressions(expression, value):
    assert listops.evaluate(expression) == value


def test_median_matches_lra_numpy_definition():
    rng = np.random.default_rng(0)
    for _ in range(200):
        values = rng.integers(0, 10, size=rng.integers(1, 11)).tolist()
        assert listops.apply_operator("MED", values) == int(np.median(values))


@pytest.mark.parametrize("bad", ["[MAX 1 2", "[MAX 1 2 ] 3", "[FOO 1 ]", "]", "[MAX 1 x ]", ""])
def test_evaluator_rejects_malformed(bad):
    with pytest.raises(ValueError):
        listops.evaluate(bad)


def test_generator_is_deterministic_per_seed():
    a = listops.generate(50, seed=3, min_length=20, max_length=60)
    b = listops.generate(50, seed=3, min_length=20, max_length=60)
    c = listops.generate(50, seed=4, min_length=20, max_length=60)
    assert [(e.tokens, e.label) for e in a] == [(e.tokens, e.label) for e in b]
    assert [e.tokens for e in a] != [e.tokens for e in c]


@pytest.mark.parametrize("min_length, max_length, max_depth, max_args", [(20, 60, 10, 10), (30, 80, 4, 5)])
def test_generator_respects_limits_and_labels(min_length, max_length, max_depth, max_args):
    examples = listops.generate(300, seed=1, min_length=min_length, max_length=max_length, max_depth=max_depth,
                                max_args=max_args)  # fmt: skip
    assert len({tuple(e.tokens) for e in examples}) == len(examples)  # distinct
    for example in examples:
        assert min_length <= len(example.tokens) <= max_length
        # LRA's depth counts the digits: the root is at depth 1, a node at max_depth is a digit
        assert listops.max_nesting(example.tokens) <= max_depth - 1
        assert listops.max_arguments(example.tokens) <= max_args
        assert 0 <= example.label <= 9
        assert listops.evaluate(example.tokens) == example.label
        assert listops.evaluate(example.text) == example.label
    labels = listops.label_counts(examples)
    assert sum(labels.values()) == 300 and len([v for v in labels.values() if v]) >= 8  # all values occur
    # the nesting limit is reached, not just respected
    assert max(listops.max_nesting(e.tokens) for e in examples) >= min(max_depth - 1, 4)


def test_encoding_and_vocabulary():
    example = listops.generate(1, seed=0, min_length=10, max_length=30)[0]
    ids = listops.encode(example.tokens)
    assert ids[0] == listops.CLS_ID and len(ids) == len(example.tokens) + 1
    assert all(0 <= i < len(listops.VOCAB) for i in ids) and listops.PAD_ID not in ids
    assert len(listops.VOCAB) == 17  # pad, cls, 10 digits, 4 operators, ]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_samples=0), "num_samples"),
        (dict(num_samples=5, min_length=50, max_length=10), "max_length"),
        (dict(num_samples=5, max_args=1), "max_args"),
        (dict(num_samples=5, max_depth=0), "max_depth"),
    ],
)
def test_generator_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        listops.generate(seed=0, **kwargs)


def test_generator_gives_up_clearly_on_impossible_lengths():
    # depth 2 with 2..3 arguments cannot reach 40 tokens
    with pytest.raises(RuntimeError, match="widen the length range"):
        listops.generate(3, seed=0, min_length=40, max_length=50, max_depth=2, max_args=3, max_tries=2000)
