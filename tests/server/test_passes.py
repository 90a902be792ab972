"""Splitting a batch into first passes by row length: the cost model's choices, and that rows split
across passes answer exactly as they do alone (tiny random Llama and T5)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import add_tasks, make_engine
from server.data.spec import TaskSpec
from server.engine import EngineConfig, Request
from server.passes import split_by_length

GENERATE = TaskSpec(template="Q: {text}\nA:", description="Answer the question:", max_new_tokens=4)
SHORT, LONG = "fine", " ".join(["a long and winding review of a film that went on"] * 6)


def cost(passes: list[list[int]], lengths: list[int], steps: list[int], overhead: float, padding: float = 1.0) -> float:
    """The documented model, written out here: per pass (1 + its decode steps) × overhead + its real
    positions + `padding` × its padding (rows × longest − real positions)."""
    total = 0.0
    for p in passes:
        real = sum(lengths[r] for r in p)
        total += (1 + max(steps[r] for r in p)) * overhead + real + padding * (len(p) * max(lengths[r] for r in p) - real)
    return total


def test_rows_of_one_length_stay_one_pass() -> None:
    assert split_by_length([30] * 16, [0] * 16, 0) == [list(range(16))]
    assert split_by_length([7], [0], 0) == [[0]]


def test_short_rows_leave_the_long_ones_behind() -> None:
    lengths = [30, 130, 31, 29, 130, 30, 30, 28]  # six ~30-token rows, two carrying a 100-position prompt
    assert split_by_length(lengths, [0] * 8, 32) == [[0, 2, 3, 5, 6, 7], [1, 4]]


def test_a_split_that_does_not_pay_for_its_pass_is_not_made() -> None:
    lengths = [30, 40]  # 10 positions of padding saved, a pass costs 32
    assert split_by_length(lengths, [0, 0], 32) == [[0, 1]]


def test_generating_rows_charge_each_decode_step() -> None:
    lengths = [30] * 6 + [130] * 2
    assert len(split_by_length(lengths, [0] * 8, 32)) == 2
    assert split_by_length(lengths, [64] * 8, 32) == [list(range(8))]  # 64 more decode steps cost more than the padding


def test_cheap_padding_keeps_rows_together_that_full_padding_would_split() -> None:
    lengths = [30] * 6 + [40] * 2  # 60 positions of padding in one pass; a pass costs 32
    assert len(split_by_length(lengths, [0] * 8, 32)) == 2  # padding at full cost: 60 > 32, split
    assert split_by_length(lengths, [0] * 8, 32, padding=0.25) == [list(range(8))]  # 15 < 32: one pass


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 300), st.sampled_from([0, 0, 1, 8])), min_size=1, max_size=40), st.sampled_from([0, 1, 32, 500]), st.sampled_from([1.0, 0.25]))
def test_every_row_runs_once_and_never_costs_more_than_one_pass(rows, overhead, padding) -> None:
    lengths, steps = [r[0] for r in rows], [r[1] for r in rows]
    passes = split_by_length(lengths, steps, overhead, padding)
    assert sorted(r for p in passes for r in p) == list(range(len(rows)))
    assert all(p == sorted(p) and p for p in passes)
    assert cost(passes, lengths, steps, overhead, padding) <= cost([list(range(len(rows)))], lengths, steps, overhead, padding) + 1e-9


@pytest.mark.parametrize("kind", ["llama", "t5"])
def test_rows_split_across_passes_answer_as_alone(kind: str) -> None:
    """A served batch mixing every method, long and short inputs, classification and generation,
    runs as several passes (pass overhead 0 splits wherever padding is saved) and each row's answer
    is its solo one."""
    engine = make_engine(kind, config=EngineConfig(pass_overhead_tokens=0))
    names = add_tasks(engine, per_method=1)
    for method in ("prompt_tuning", "attempt", "ip"):
        engine.tasks.add(engine.tasks.new(f"{method}-gen", method, GENERATE, seed=5))
        names.append(f"{method}-gen")
    requests = [Request(name, (SHORT, LONG)[i % 2], max_new_tokens=3) for i, name in enumerate(names * 2)]
    plan = engine.schedule(requests)
    assert len(engine.passes(plan)) > 1
    before = engine.split_batches
    outcomes = engine.run_each(requests)
    assert engine.split_batches == before + 1
    for request, got in zip(requests, outcomes, strict=True):
        want = engine.run([request])[0]
        assert (got.task, got.task_version, got.output, got.label, got.finish_reason) == (want.task, want.task_version, want.output, want.label, want.finish_reason)
        if want.scores is not None:
            for label, p in want.scores.items():
                assert got.scores[label] == pytest.approx(p, abs=1e-5)


def test_a_cached_prompt_adds_no_length_but_an_instance_prompt_does() -> None:
    """On Llama prompt tuning's prompt is cached (its rows run at their token length); ATTEMPT's is
    per instance (its rows run longer by its prompt) — the lengths the split is made from."""
    engine = make_engine("llama", config=EngineConfig(pass_overhead_tokens=0))
    add_tasks(engine, per_method=1)
    same_text = [Request("prompt_tuning-0", SHORT), Request("attempt-0", SHORT)]
    assert engine.passes(engine.schedule(same_text)) == [[0], [1]]
    uncached = make_engine("llama", config=EngineConfig(pass_overhead_tokens=0, cache_prefixes=False))
    add_tasks(uncached, per_method=1)
    plan = uncached.schedule(same_text)
    assert plan.prompt_ids[0] == plan.prompt_ids[1]  # the texts alone tie
    assert uncached.passes(plan) == [[1], [0]]  # uncached, prompt tuning's 6 positions outrun ATTEMPT's 4
