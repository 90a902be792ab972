"""Deterministic, stratified splits of labelled examples.

Every function first puts the examples in a canonical order (a SHA-256 of label and text), then
shuffles with `random.Random(seed)`: the result depends on the seed and the *set* of examples only,
never on file order or on Python's per-process `hash()` salt, so a split can be reproduced from
its seed alone. Repeated (text, label) rows are kept once, so the parts are disjoint.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterable
from dataclasses import dataclass

from server.data.readers import LabeledText
from server.errors import InvalidRequest

CARVE_FRACTION = 0.25
CARVE_MIN_EXAMPLES = 16


@dataclass(frozen=True)
class Splits:
    train: list[LabeledText]
    validation: list[LabeledText]
    test: list[LabeledText]


def _key(example: LabeledText) -> tuple[str, str, str]:
    digest = hashlib.sha256(f"{example.label}\x00{example.text}".encode()).hexdigest()
    return digest, example.label, example.text


def _by_label(examples: Iterable[LabeledText], rng: random.Random) -> dict[str, list[LabeledText]]:
    """Unique examples grouped by label (labels sorted), each group in canonical order, then shuffled."""
    groups: dict[str, list[LabeledText]] = {}
    for example in sorted(set(examples), key=_key):
        groups.setdefault(example.label, []).append(example)
    groups = dict(sorted(groups.items()))
    for group in groups.values():
        rng.shuffle(group)
    return groups


def _allocate(sizes: dict[str, int], total: int) -> dict[str, int]:
    """Split `total` across labels in proportion to `sizes` (largest remainder), so each part of a
    split keeps the label distribution and the totals are exact."""
    whole = sum(sizes.values())
    if whole == 0 or total <= 0:
        return dict.fromkeys(sizes, 0)
    quotas = {label: total * size / whole for label, size in sizes.items()}
    shares = {label: int(quota) for label, quota in quotas.items()}
    by_remainder = sorted(sizes, key=lambda label: (shares[label] - quotas[label], label))
    for label in by_remainder[: total - sum(shares.values())]:
        shares[label] += 1
    return shares


def split(
    examples: Iterable[LabeledText],
    seed: int,
    validation: float = 0.1,
    test: float = 0.2,
    max_test: int | None = 500,
) -> Splits:
    """Train/validation/test parts, stratified by label. `max_test` caps the test part (evaluating
    on CPU), the surplus going to train."""
    if validation < 0 or test < 0 or validation + test >= 1:
        raise InvalidRequest(f"validation ({validation}) and test ({test}) must be >= 0 and sum to < 1")
    if max_test is not None and max_test < 0:
        raise InvalidRequest(f"max_test must be >= 0, got {max_test}")
    rng = random.Random(seed)
    groups = _by_label(examples, rng)
    sizes = {label: len(group) for label, group in groups.items()}
    n = sum(sizes.values())
    n_test = round(n * test) if max_test is None else min(round(n * test), max_test)
    tests = _allocate(sizes, n_test)
    validations = _allocate(sizes, round(n * validation))
    parts = Splits([], [], [])
    for label, group in groups.items():
        t, v = tests[label], validations[label]
        parts.test.extend(group[:t])
        parts.validation.extend(group[t : t + v])
        parts.train.extend(group[t + v :])
    for part in (parts.train, parts.validation, parts.test):
        rng.shuffle(part)  # interleave the labels
    return parts


def few_shot(examples: Iterable[LabeledText], k: int, seed: int) -> list[LabeledText]:
    """`k` label-balanced examples: `k // n_labels` per label, the remainder to randomly chosen
    labels that have examples to spare. Fewer than `k` only when some label has too few."""
    if k < 0:
        raise InvalidRequest(f"k must be >= 0, got {k}")
    rng = random.Random(seed)
    groups = _by_label(examples, rng)
    if not groups:
        return []
    per_label = k // len(groups)
    spare = [label for label, group in groups.items() if len(group) > per_label]
    extra = set(rng.sample(spare, min(k - per_label * len(groups), len(spare))))
    chosen = [
        example
        for label, group in groups.items()
        for example in group[: per_label + (label in extra)]
    ]
    rng.shuffle(chosen)
    return chosen


def carve_validation(
    examples: Iterable[LabeledText], seed: int, min_train: int = 8
) -> tuple[list[LabeledText], list[LabeledText]]:
    """For few-shot jobs: hold out ~25% (stratified) for early stopping, but only from 16 examples
    up, always leaving `min_train` examples and at least one per label to train on. Below that,
    every example trains and the validation part is empty."""
    rows = list(examples)
    if len(rows) < CARVE_MIN_EXAMPLES:
        return rows, []
    rng = random.Random(seed)
    groups = _by_label(rows, rng)
    spare = {label: len(group) - 1 for label, group in groups.items()}
    n = sum(len(group) for group in groups.values())
    n_validation = min(int(n * CARVE_FRACTION), n - min_train, sum(spare.values()))
    if n_validation <= 0:
        return rows, []
    held = _allocate(spare, n_validation)
    train = [e for label, group in groups.items() for e in group[held[label] :]]
    validation = [e for label, group in groups.items() for e in group[: held[label]]]
    rng.shuffle(train)
    rng.shuffle(validation)
    return train, validation


def folds(examples: Iterable[LabeledText], n: int, seed: int) -> list[list[LabeledText]]:
    """The examples dealt into `n` stratified folds for cross-validation: every label spread as
    evenly as it goes (the deal rotates across labels, so fold sizes differ by at most one);
    seeded and independent of the input order. Duplicates count once."""
    if n < 2:
        raise InvalidRequest(f"folds: at least 2, got {n}")
    rng = random.Random(seed)
    out: list[list[LabeledText]] = [[] for _ in range(n)]
    dealt = 0
    for group in _by_label(examples, rng).values():
        for example in group:
            out[dealt % n].append(example)
            dealt += 1
    for fold in out:
        rng.shuffle(fold)
    return out
