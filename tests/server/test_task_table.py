"""The engine's task bookkeeping (TaskTable): the named operations training uses, residency, and
that scheduling is lookups and tokenization only."""

from __future__ import annotations

import pytest
import torch

from helpers import CLASSIFY, add_tasks, make_engine
from server.engine import EngineConfig, Request
from server.errors import Conflict, InputTooLong, NotFound


def test_temporary_serves_a_task_for_the_block_only() -> None:
    engine = make_engine("llama")
    task = engine.tasks.new("probe", "prompt_tuning", CLASSIFY)
    with engine.tasks.temporary(task):
        assert "probe" in engine.tasks and engine.run([Request("probe", "x")])[0].task == "probe"
        with pytest.raises(Conflict):
            with engine.tasks.temporary(task):
                pass
    assert "probe" not in engine.tasks and len(engine.tasks) == 0
    with pytest.raises(NotFound):
        engine.run([Request("probe", "x")])


def test_refresh_makes_served_statics_follow_params_changed_in_place() -> None:
    engine = make_engine("llama")
    task = engine.tasks.new("pha", "pha", CLASSIFY, seed=1).on(engine.backbone.device)
    engine.tasks.add(task)
    before = engine.run([Request("pha", "a fine film")])[0].scores
    with torch.no_grad():
        task.params["prototype"].add_(1.0)  # what an optimiser step does
    assert engine.run([Request("pha", "a fine film")])[0].scores == before  # the cached adapters are stale
    engine.tasks.refresh("pha")
    after = engine.run([Request("pha", "a fine film")])[0].scores
    assert after != before
    fresh = make_engine("llama")
    fresh.tasks.add(task)  # the same params, built from scratch
    assert fresh.run([Request("pha", "a fine film")])[0].scores == after


def test_schedule_is_lookups_and_tokenization_only() -> None:
    """An evicted task stays evicted through `schedule`; `execute` makes it resident again."""
    engine = make_engine("llama")
    names = add_tasks(engine, per_method=1)
    one = max(engine.tasks.loaded(n).nbytes for n in names)
    bounded = make_engine("llama", config=EngineConfig(task_memory_bytes=one))
    for name in names:
        bounded.tasks.add(engine.tasks[name])
    cold = names[0]  # evicted by the later adds
    resident = bounded.tasks.resident_bytes
    plan = bounded.schedule([Request(cold, "a fine film")])
    assert bounded.tasks.resident_bytes == resident and plan.loaded == []
    got = bounded.complete(plan, bounded.execute(plan))[0]
    assert plan.loaded and plan.loaded[0].host is bounded.tasks[cold]
    assert got.scores == engine.run([Request(cold, "a fine film")])[0].scores


def test_run_each_answers_good_rows_and_returns_each_bad_rows_error() -> None:
    engine = make_engine("t5")
    names = add_tasks(engine, per_method=1)
    requests = [Request(names[0], "good"), Request("nope", "x"), Request(names[1], "x" * 5000), Request(names[2], "also good")]
    outcomes = engine.run_each(requests)
    assert isinstance(outcomes[1], NotFound) and isinstance(outcomes[2], InputTooLong)
    for i in (0, 3):
        assert outcomes[i].scores == pytest.approx(engine.run([requests[i]])[0].scores, abs=1e-6)


def test_the_table_reads_like_a_mapping_of_host_copies() -> None:
    engine = make_engine("llama")
    names = add_tasks(engine, per_method=1)
    assert sorted(engine.tasks) == sorted(names) and len(engine.tasks) == len(names)
    assert all(p.device.type == "cpu" for t in engine.tasks.values() for p in t.params.values())
    assert engine.tasks.get("nope") is None


def test_a_task_with_non_finite_weights_is_refused_with_a_reason() -> None:
    from server.errors import NonFinite

    engine = make_engine("llama")
    for method, key in (("prompt_tuning", "prompt"), ("pha", "prototype")):
        task = engine.tasks.new(f"bad-{method}", method, CLASSIFY)
        with torch.no_grad():
            task.params[key].view(-1)[0] = float("nan")
        with pytest.raises(NonFinite, match="NaN or infinite"):
            engine.tasks.add(task)
        assert task.name not in engine.tasks


def test_nan_scores_fail_their_row_not_its_batch(monkeypatch) -> None:
    """Scores that come out NaN at run time (e.g. an overflow) are that row's error, never a label."""
    from server.errors import NonFinite

    engine = make_engine("llama")
    names = add_tasks(engine, per_method=1)
    original = engine.runner.label_logprobs

    def poisoned(enc, ctx, pair_row, targets):  # the first row's scores become NaN
        out = original(enc, ctx, pair_row, targets).clone()
        out[pair_row == 0] = float("nan")
        return out

    monkeypatch.setattr(engine.runner, "label_logprobs", poisoned)
    outcomes = engine.run_each([Request(names[0], "x"), Request(names[1], "y")])
    assert isinstance(outcomes[0], NonFinite) and outcomes[1].label is not None


def test_resident_bytes_count_what_a_task_holds_of_its_own() -> None:
    """Memory accounting: prompt tuning's static prompt is its param (counted once, plus the cached
    prefix keys/values); IP from a description serves the shared nets (nothing of its own); an IP task
    with its own copy of the nets holds them."""
    engine = make_engine("llama")
    d, layers = engine.dims.d_model, engine.backbone.model.config.num_hidden_layers
    kv_heads = engine.backbone.model.config.num_key_value_heads
    head_dim = d // engine.backbone.model.config.num_attention_heads
    engine.tasks.add(engine.tasks.new("pt", "prompt_tuning", CLASSIFY))
    engine.tasks.add(engine.tasks.new("ip-described", "ip", CLASSIFY))
    engine.tasks.add(engine.tasks.new("ip-copy", "ip", CLASSIFY, init={"copy_nets": True}))
    prompt = 6 * d * 4  # SMALL_CONFIGS: 6 virtual tokens, fp32
    prefix_kv = layers * 2 * kv_heads * 6 * head_dim * 4  # [L, 2, kvh, m, hd]
    assert engine.tasks.loaded("pt").nbytes == prompt + prefix_kv
    assert engine.tasks.loaded("ip-described").nbytes == 0
    nets = sum(p.numel() * 4 for p in engine.methods["ip"].nets.values())
    assert engine.tasks.loaded("ip-copy").nbytes == nets
    assert engine.tasks.resident_bytes == prompt + prefix_kv + nets
