"""Deterministic, stratified, order-independent splits and label-balanced few-shot samples."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from server.data.readers import LabeledText
from server.data.splits import carve_validation, few_shot, split
from server.errors import InvalidRequest


def _examples(**sizes: int) -> list[LabeledText]:
    return [LabeledText(f"{label} example {i}", label) for label, n in sizes.items() for i in range(n)]


EXAMPLES = _examples(a=60, b=30, c=10)


def _counts(rows: list[LabeledText]) -> dict[str, int]:
    return dict(Counter(r.label for r in rows))


def test_split_is_disjoint_complete_and_sized() -> None:
    parts = split(EXAMPLES, seed=0)
    train, validation, test = map(set, (parts.train, parts.validation, parts.test))
    assert not (train & validation or train & test or validation & test)
    assert train | validation | test == set(EXAMPLES)
    assert (len(parts.train), len(parts.validation), len(parts.test)) == (70, 10, 20)


def test_split_is_stratified() -> None:
    parts = split(EXAMPLES, seed=3)
    assert _counts(parts.test) == {"a": 12, "b": 6, "c": 2}
    assert _counts(parts.validation) == {"a": 6, "b": 3, "c": 1}
    assert _counts(parts.train) == {"a": 42, "b": 21, "c": 7}


def test_split_is_deterministic_per_seed_and_independent_of_input_order() -> None:
    shuffled = EXAMPLES[:]
    random.Random(1).shuffle(shuffled)
    assert split(EXAMPLES, seed=7) == split(shuffled, seed=7) == split(list(reversed(EXAMPLES)), seed=7)
    assert split(EXAMPLES, seed=7).test != split(EXAMPLES, seed=8).test
    assert len(set(_counts(split(EXAMPLES, seed=7).train[:20]))) > 1  # labels are interleaved


def test_split_caps_the_test_part_and_keeps_duplicates_on_one_side() -> None:
    parts = split(EXAMPLES + EXAMPLES[:30], seed=0, test=0.5, max_test=10)
    assert _counts(parts.test) == {"a": 6, "b": 3, "c": 1}
    assert len(parts.train) + len(parts.validation) + len(parts.test) == len(EXAMPLES)
    assert not set(parts.train) & set(parts.test)
    assert len(split(EXAMPLES, seed=0, max_test=None).test) == 20


@pytest.mark.parametrize(
    "kwargs", [{"validation": -0.1}, {"test": 0.95}, {"validation": 0.5, "test": 0.5}, {"max_test": -1}]
)
def test_split_refuses_bad_fractions(kwargs: dict) -> None:
    with pytest.raises(InvalidRequest):
        split(EXAMPLES, seed=0, **kwargs)


def test_few_shot_is_label_balanced_and_deterministic() -> None:
    assert _counts(few_shot(EXAMPLES, 9, seed=0)) == {"a": 3, "b": 3, "c": 3}
    ten = few_shot(EXAMPLES, 10, seed=0)
    assert sorted(_counts(ten).values()) == [3, 3, 4] and len(set(ten)) == 10
    assert ten == few_shot(list(reversed(EXAMPLES)), 10, seed=0)
    assert set(few_shot(EXAMPLES, 10, seed=1)) != set(ten)
    assert few_shot(EXAMPLES, 0, seed=0) == [] and few_shot([], 4, seed=0) == []


def test_few_shot_returns_fewer_only_when_a_label_runs_out() -> None:
    rows = _examples(a=10, b=10, c=2)
    assert _counts(few_shot(rows, 12, seed=0)) == {"a": 4, "b": 4, "c": 2}
    # the remainder goes to labels with examples to spare, never to the exhausted one
    assert all(_counts(few_shot(rows, 8, seed=s))["c"] == 2 for s in range(10))
    assert len(few_shot(rows, 8, seed=0)) == 8
    with pytest.raises(InvalidRequest):
        few_shot(rows, -1, seed=0)


def test_carve_validation_keeps_small_sets_whole() -> None:
    rows = _examples(a=8, b=7)
    assert carve_validation(rows, seed=0) == (rows, [])


def test_carve_validation_holds_out_a_stratified_quarter() -> None:
    rows = _examples(a=24, b=12, c=4)
    train, validation = carve_validation(rows, seed=0)
    assert len(validation) == 10 and not set(train) & set(validation)
    assert set(train) | set(validation) == set(rows)
    assert _counts(validation) == {"a": 6, "b": 3, "c": 1}
    assert (train, validation) == carve_validation(list(reversed(rows)), seed=0)


def test_carve_validation_leaves_min_train_and_every_label() -> None:
    train, validation = carve_validation(_examples(a=15, b=1), seed=0, min_train=14)
    assert len(train) == 14 and len(validation) == 2
    assert "b" in _counts(train) and "b" not in _counts(validation)
    train, validation = carve_validation(_examples(a=12, b=1, c=1, d=1, e=1), seed=0)
    assert len(validation) == 4 and set(_counts(train)) == {"a", "b", "c", "d", "e"}
    assert carve_validation(_examples(a=10, b=6), seed=0, min_train=16)[1] == []
