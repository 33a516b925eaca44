"""Seeded ListOps generator, tokenizer and evaluator (Nangia & Bowman 2018, as used by Long Range Arena).

An expression is a digit 0-9 or `[OP a1 ... an ]` with `OP` one of

- `MAX`, `MIN`: maximum / minimum of the arguments;
- `MED`: median, computed as LRA's generator does, `int(np.median(args))`: for an even number of arguments the
  mean of the two middle values, rounded down (`[MED 1 5 3 9 ]` = int(4.0) = 4, `[MED 1 2 ]` = int(1.5) = 1);
- `SM`: sum modulo 10.

The label (10 classes) is the value of the whole expression. Generation follows LRA's
`lra_benchmarks/data/listops.py`: a node at depth < `max_depth` becomes an operator with probability
`OPERATOR_P = 0.25` (otherwise a digit; at `max_depth` always a digit) with 2..`max_args` arguments drawn
recursively; trees are drawn until one has a token length in `[min_length, max_length]`, duplicates are
dropped. The root is at depth 1 and a node at `max_depth` is always a digit, so brackets nest at most
`max_depth - 1` deep (9 for LRA's `max_depth=10`). LRA used min/max length 500/2000,
`max_depth=10`, `max_args=10`. Unlike LRA's script, a tree is abandoned as soon as it exceeds `max_length`
(the accepted trees have the same distribution; the random stream, so the exact samples, differ from LRA's).

Tokens are LRA's: `[MAX`, `[MIN`, `[MED`, `[SM` open an operator, `]` closes it, digits are single tokens
(LRA's parentheses are dropped, as its input pipeline does). Everything is deterministic given the seed: the
generator draws from its own `random.Random(seed)`, never from global state.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

OPERATORS = ("MAX", "MIN", "MED", "SM")
OPERATOR_P = 0.25  # LRA's VALUE_P: a non-leaf node is an operator with this probability
PAD, CLS = "<pad>", "<cls>"
CLOSE = "]"
# Vocabulary: pad, cls, 10 digits, 4 operator openers, the closing bracket.
VOCAB = (PAD, CLS, *[str(d) for d in range(10)], *[f"[{op}" for op in OPERATORS], CLOSE)
TOKEN_TO_ID = {token: i for i, token in enumerate(VOCAB)}
PAD_ID, CLS_ID = TOKEN_TO_ID[PAD], TOKEN_TO_ID[CLS]
NUM_CLASSES = 10


def _median(values: list[int]) -> int:
    ordered = sorted(values)
    n = len(ordered)
    middle = ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2
    return int(middle)  # LRA: int(np.median(values)); values are >= 0, so this rounds down


def apply_operator(op: str, values: list[int]) -> int:
    """Value of `[op values... ]`."""
    if not values:
        raise ValueError(f"operator {op} needs at least one argument")
    if op == "MAX":
        return max(values)
    if op == "MIN":
        return min(values)
    if op == "MED":
        return _median(values)
    if op == "SM":
        return sum(values) % 10
    raise ValueError(f"unknown operator {op!r}; expected one of {list(OPERATORS)}")


# A tree is an int (digit) or a tuple (operator, [children]).
Tree = int | tuple


def tree_value(tree: Tree) -> int:
    if isinstance(tree, int):
        return tree
    op, children = tree
    return apply_operator(op, [tree_value(child) for child in children])


def tree_tokens(tree: Tree) -> list[str]:
    out: list[str] = []

    def walk(node: Tree) -> None:
        if isinstance(node, int):
            out.append(str(node))
            return
        op, children = node
        out.append(f"[{op}")
        for child in children:
            walk(child)
        out.append(CLOSE)

    walk(tree)
    return out


def tokenize(text: str) -> list[str]:
    """Split an expression like `[MAX 2 9 [MIN 4 7 ] 0 ]` (spaces optional around brackets) into tokens."""
    spaced = text.replace("]", " ] ").replace("[", " [")
    tokens = spaced.split()
    for token in tokens:
        if token not in TOKEN_TO_ID or token in (PAD, CLS):
            raise ValueError(f"unknown ListOps token {token!r} in {text!r}")
    return tokens


def evaluate(expression: str | list[str]) -> int:
    """Recursive-descent evaluation of an expression (a string or a token list); raises on malformed input."""
    tokens = tokenize(expression) if isinstance(expression, str) else list(expression)

    def parse(pos: int) -> tuple[int, int]:
        if pos >= len(tokens):
            raise ValueError("unexpected end of expression")
        token = tokens[pos]
        if token.isdigit():
            return int(token), pos + 1
        if not token.startswith("["):
            raise ValueError(f"unexpected token {token!r} at position {pos}")
        op, pos = token[1:], pos + 1
        values = []
        while pos < len(tokens) and tokens[pos] != CLOSE:
            value, pos = parse(pos)
            values.append(value)
        if pos >= len(tokens):
            raise ValueError(f"unclosed [{op}")
        return apply_operator(op, values), pos + 1

    value, end = parse(0)
    if end != len(tokens):
        raise ValueError(f"trailing tokens after position {end}: {tokens[end:]}")
    return value


def max_nesting(tokens: list[str]) -> int:
    depth = deepest = 0
    for token in tokens:
        if token.startswith("["):
            depth += 1
            deepest = max(deepest, depth)
        elif token == CLOSE:
            depth -= 1
    return deepest


def max_arguments(tokens: list[str]) -> int:
    """Largest number of arguments of any operator in the token list."""
    stack: list[int] = []
    widest = 0
    for token in tokens:
        if token.startswith("["):
            if stack:
                stack[-1] += 1
            stack.append(0)
        elif token == CLOSE:
            widest = max(widest, stack.pop())
        elif stack:
            stack[-1] += 1
    return widest


class _TooLong(Exception):
    pass


def _generate_tree(
    rng: random.Random, depth: int, max_depth: int, max_args: int, budget: list[int]
) -> tuple[Tree, int]:
    """LRA's generate_tree: returns (tree, token length).

    `budget[0]` is how many more tokens the tree may have; a tree that would exceed it is abandoned early
    (`_TooLong`), which rejects exactly the trees LRA would reject for being too long, without building them.
    """
    r = rng.random() if depth < max_depth else 1.0
    if r > OPERATOR_P:
        budget[0] -= 1
        if budget[0] < 0:
            raise _TooLong
        return rng.randrange(10), 1
    num_args = rng.randint(2, max_args)
    budget[0] -= 2  # the operator token and the closing bracket
    if budget[0] < 0:
        raise _TooLong
    children, length = [], 2
    for _ in range(num_args):
        child, child_length = _generate_tree(rng, depth + 1, max_depth, max_args, budget)
        children.append(child)
        length += child_length
    return (rng.choice(OPERATORS), children), length


@dataclass
class ListOpsExample:
    tokens: list[str]
    label: int

    @property
    def text(self) -> str:
        return " ".join(self.tokens)


def _check_int(name: str, value, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}, got {value!r}.")


def generate(
    num_samples: int,
    seed: int,
    min_length: int = 500,
    max_length: int = 2000,
    max_depth: int = 10,
    max_args: int = 10,
    max_tries: int | None = None,
) -> list[ListOpsExample]:
    """`num_samples` distinct expressions with `min_length <= len(tokens) <= max_length`, deterministic in `seed`."""
    _check_int("num_samples", num_samples, 1)
    _check_int("min_length", min_length, 1)
    _check_int("max_length", max_length, min_length)
    _check_int("max_depth", max_depth, 1)
    _check_int("max_args", max_args, 2)
    if max_depth == 1 and min_length > 1:
        raise ValueError("`max_depth=1` only produces single digits; raise `max_depth` or set `min_length=1`.")
    rng = random.Random(seed)
    max_tries = max_tries if max_tries is not None else 20_000 * num_samples + 1_000_000
    seen: set[tuple[str, ...]] = set()
    examples: list[ListOpsExample] = []
    tries = 0
    while len(examples) < num_samples:
        tries += 1
        if tries > max_tries:
            raise RuntimeError(
                f"found only {len(examples)} of {num_samples} expressions with length in [{min_length}, {max_length}] "
                f"after {max_tries} trees; widen the length range or raise max_depth/max_args."
            )
        try:
            tree, length = _generate_tree(rng, 1, max_depth, max_args, [max_length])
        except _TooLong:
            continue
        if length < min_length:
            continue
        tokens = tree_tokens(tree)
        key = tuple(tokens)
        if key in seen:
            continue
        seen.add(key)
        examples.append(ListOpsExample(tokens, tree_value(tree)))
    return examples


def encode(tokens: list[str], add_cls: bool = True) -> list[int]:
    """Token ids, CLS first (the classifier reads it)."""
    ids = [TOKEN_TO_ID[t] for t in tokens]
    return [CLS_ID, *ids] if add_cls else ids


def label_counts(examples: list[ListOpsExample]) -> dict[int, int]:
    counts = Counter(example.label for example in examples)
    return {label: counts.get(label, 0) for label in range(NUM_CLASSES)}
