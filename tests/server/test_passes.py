"""Splitting a batch into first passes by row length: the cost model's choices, and that rows split
across passes answer exactly as they do alone (tiny random Llama and T5)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import CLASSIFY, add_tasks, make_engine
from server.data.spec import TaskSpec
from server.engine import EngineConfig, Request
from server.passes import plan_cost, split_by_length, split_passes

GENERATE = TaskSpec(template="Q: {text}\nA:", description="Answer the question:", max_new_tokens=4)
SHORT, LONG = "fine", " ".join(["a long and winding review of a film that went on"] * 6)


def cost(passes: list[list[int]], lengths: list[int], steps: list[int], overhead: float, padding: float = 1.0,
         past: list[int] | None = None, masked_key: float = 0.0) -> float:
    """The documented model, written out here: per pass (1 + its decode steps) × overhead + its real
    positions + `padding` × its padding (rows × longest − real positions) + `masked_key` × each row's
    positions × the columns of its pass's widest past that are not its own."""
    past = past or [0] * len(lengths)
    total = 0.0
    for p in passes:
        real = sum(lengths[r] for r in p)
        total += (1 + max(steps[r] for r in p)) * overhead + real + padding * (len(p) * max(lengths[r] for r in p) - real)
        total += masked_key * sum(lengths[r] * (max(past[q] for q in p) - past[r]) for r in p)
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


def test_rows_behind_a_cached_past_leave_rows_without_one_when_the_masked_keys_pay_for_a_pass() -> None:
    lengths, past = [30] * 8, [100] * 4 + [0] * 4  # 4 rows × 30 positions × 100 masked keys × 0.003 = 36 > 32
    assert split_passes(lengths, [0] * 8, past, 32, masked_key=0.003) == [[4, 5, 6, 7], [0, 1, 2, 3]]
    assert split_passes(lengths, [0] * 8, past, 32, masked_key=0.0) == [list(range(8))]  # no cost charged: one pass
    assert split_passes([30, 30], [0, 0], [100, 0], 32, masked_key=0.003) == [[0, 1]]  # 9 positions masked < a pass


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 300), st.sampled_from([0, 0, 1, 8]), st.sampled_from([0, 0, 20, 100])), min_size=1, max_size=40),
       st.sampled_from([0, 1, 32, 500]), st.sampled_from([1.0, 0.25]), st.sampled_from([0.0, 0.003, 0.05]))
def test_a_split_by_past_runs_every_row_once_and_never_costs_more_than_by_length_alone(rows, overhead, padding, masked_key) -> None:
    lengths, steps, past = [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]
    passes = split_passes(lengths, steps, past, overhead, padding, masked_key)
    assert sorted(r for p in passes for r in p) == list(range(len(rows)))
    assert all(p == sorted(p) and p for p in passes)
    by_length = split_by_length(lengths, steps, overhead, padding)
    mine = cost(passes, lengths, steps, overhead, padding, past, masked_key)
    assert mine <= cost(by_length, lengths, steps, overhead, padding, past, masked_key) + 1e-9
    assert mine <= cost([list(range(len(rows)))], lengths, steps, overhead, padding, past, masked_key) + 1e-9
    assert plan_cost(passes, lengths, steps, past, overhead, padding, masked_key) == pytest.approx(mine)


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


def test_rows_without_a_cached_past_run_apart_from_rows_behind_one() -> None:
    """Same texts, same lengths: only the cached past parts a plain row from a prompt-tuning row
    (with no pass overhead, any masked key pays for a pass)."""
    engine = make_engine("llama", config=EngineConfig(pass_overhead_tokens=0))
    add_tasks(engine, per_method=1)
    engine.tasks.add(engine.tasks.new("plain-0", "plain", CLASSIFY))
    plan = engine.schedule([Request("prompt_tuning-0", SHORT), Request("plain-0", SHORT)])
    assert plan.prompt_ids[0] == plan.prompt_ids[1]
    assert engine.passes(plan) == [[1], [0]]
