"""Engine invariants on tiny random T5 and Llama: batch invariance, isolation, identity, scoring."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from helpers import CLASSIFY, METHODS, add_tasks, make_engine
from server.batch import BatchContext
from server.data.spec import TaskSpec
from server.engine import Engine, EngineConfig, Request
from server.errors import Incompatible, InputTooLong, InvalidRequest, NotFound

TEXTS = ["a great movie", "awful", "meh, it was long and boring but fine in the end", "x", "not bad at all, really"]
GENERATE = TaskSpec(template="Q: {text}\nA:", description="Answer the question:", max_new_tokens=5)


@pytest.fixture(scope="module")
def served(engine: Engine) -> tuple[Engine, list[str]]:
    names = add_tasks(engine)
    for method in METHODS:  # one generative task per method too
        task = engine.tasks.new(f"{method}-gen", method, GENERATE, seed=7)
        with torch.no_grad():
            for p in task.params.values():
                p.add_(torch.randn_like(p) * 0.1)
        engine.tasks.add(task)
        names.append(task.name)
    return engine, names


def assert_same(batch, solo) -> None:
    assert batch.output == solo.output
    assert batch.label == solo.label
    if solo.scores is not None:
        for label, p in solo.scores.items():
            assert batch.scores[label] == pytest.approx(p, abs=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_batch_invariance_per_method(served, method: str) -> None:
    engine, names = served
    requests = [Request(n, t) for n in names if n.startswith(method) for t in TEXTS[:3]]
    batch = engine.run(requests)
    for req, got in zip(requests, batch):
        assert_same(got, engine.run([req])[0])


def test_batch_invariance_all_methods_mixed(served) -> None:
    engine, names = served
    requests = [Request(n, TEXTS[i % len(TEXTS)]) for i, n in enumerate(names * 2)]
    batch = engine.run(requests)
    assert len({r.task for r in batch}) == len(names)
    for req, got in zip(requests, batch):
        assert_same(got, engine.run([req])[0])


def test_generation_rows_bounded_and_batch_invariant(served) -> None:
    engine, names = served
    requests = [Request(n, "why?", max_new_tokens=3) for n in names if n.endswith("-gen")]
    outputs = engine.run(requests)
    for req, got in zip(requests, outputs):
        assert got.label is None and got.scores is None
        assert len(engine.backbone.tokenizer(got.output, add_special_tokens=False)["input_ids"]) <= 3
        assert got.output == engine.run([req])[0].output


def test_every_method_modulates(served) -> None:
    """Each method's task scores differ from the plain backbone's (no silently dropped modulation)."""
    engine, names = served
    plain = plain_scores(engine, CLASSIFY, TEXTS[0])
    for method in METHODS:
        scores = engine.run([Request(f"{method}-0", TEXTS[0])])[0].scores
        got = torch.tensor([scores[label] for label in CLASSIFY.labels])
        assert not torch.allclose(got, plain, atol=1e-4), method


def plain_scores(engine: Engine, spec: TaskSpec, text: str, *, with_description: bool = False) -> torch.Tensor:
    """Reference rank classification: one full forward of the UNHOOKED model per label, the label
    tokens' log-likelihoods reduced by the spec's scoring rule, softmax over labels."""
    b = engine.backbone
    prompt = b.encode(spec.render(text, with_description=with_description))
    totals = []
    with torch.no_grad():
        for label in spec.labels:
            new_word = not b.is_encoder_decoder and not spec.template[-1:].isspace()  # a decoder-only label is a new word after the cue
            target = b.encode_target(f" {label}" if new_word else label)
            if b.is_encoder_decoder:
                dec_in = torch.tensor([[b.model.config.decoder_start_token_id] + target[:-1]])
                logits = b.model(input_ids=torch.tensor([prompt]), decoder_input_ids=dec_in).logits[0]
                logp = logits.log_softmax(-1)[torch.arange(len(target)), target]
            else:
                logits = b.model(input_ids=torch.tensor([prompt + target])).logits[0]
                logp = logits.log_softmax(-1)[torch.arange(len(prompt) - 1, len(prompt) + len(target) - 1), target]
            totals.append({"first": logp[0], "sum": logp.sum(), "mean": logp.mean()}[spec.scoring])
    return torch.stack(totals).softmax(-1)


@pytest.mark.parametrize("kind", ["t5", "llama"])
def test_untrained_ip_and_pha_are_the_plain_backbone(kind: str) -> None:
    """Identity at the engine level: fresh IP (c2 = 0) and PHA (zero up heads, zero shared up)
    tasks reproduce a naive per-label forward of the unhooked backbone."""
    engine = make_engine(kind)
    with torch.no_grad():
        for name in ("c2_w", "c2_b"):
            engine.methods["ip"].nets[name].zero_()
        pha = engine.methods["pha"]
        for t in (pha.head_up.weight, pha.head_up.bias, pha.head_up_bias.weight, pha.head_up_bias.bias, pha.enc_up, pha.enc_up_bias):
            t.zero_()
    for method in ("ip", "pha"):
        engine.tasks.add(engine.tasks.new(method, method, CLASSIFY))
        got = engine.run([Request(method, TEXTS[2])])[0].scores
        want = plain_scores(engine, CLASSIFY, TEXTS[2], with_description=method == "ip")
        assert torch.allclose(torch.tensor([got[label] for label in CLASSIFY.labels]), want, atol=1e-5)


@pytest.mark.parametrize("kind", ["t5", "llama"])
def test_identity_modulations_reproduce_backbone_logits_exactly(kind: str) -> None:
    """Empty prefix, I = 0 on every block and a zero adapter on every FFN: bit-identical logits."""
    engine = make_engine(kind)
    b = engine.backbone
    ids = torch.tensor([b.encode("hello there"), b.encode("general kenobi")[:12]] if False else [b.encode("hello there")[:8], b.encode("general kenobi")[:8]])
    kwargs = {"input_ids": ids}
    if b.is_encoder_decoder:
        kwargs["decoder_input_ids"] = torch.tensor([[0, 5, 6], [0, 7, 8]])
    with torch.no_grad():
        plain = b.model(**kwargs).logits
        ctx = BatchContext(2, b.d_model, b.n_layers, b.device, b.dtype)
        ctx.add_hidden_scale(torch.arange(2), torch.zeros(2, b.n_layers, b.d_model))
        n = len(engine.hooks.ffn_sites)
        zeros = [torch.zeros(1, n, b.d_model, 4), torch.zeros(1, n, 4), torch.zeros(1, n, 4, b.d_model), torch.zeros(1, n, b.d_model)]
        ctx.add_adapters(list(range(n)), torch.arange(2), torch.zeros(2, dtype=torch.long), *zeros)
        ctx.assemble()
        assert ctx.hidden_scale is not None and len(ctx.adapters) == n
        with engine.hooks.use(ctx):
            hooked = b.model(**kwargs).logits
    assert torch.equal(plain, hooked)


@pytest.mark.parametrize("kind", ["t5", "llama"])
@pytest.mark.parametrize("method", METHODS)
def test_isolation_adding_and_deleting_tasks_never_changes_others(method: str, kind: str) -> None:
    engine = make_engine(kind)
    add_tasks(engine, per_method=1)
    victim = f"{method}-0"
    before = {n: engine.run([Request(n, TEXTS[1])])[0] for n in engine.tasks if n != victim}
    for i in range(2):
        engine.tasks.add(engine.tasks.new(f"new-{method}-{i}", method, CLASSIFY, seed=50 + i))
    engine.tasks.remove(victim)
    for name, old in before.items():
        new = engine.run([Request(name, TEXTS[1])])[0]
        assert new.scores == old.scores  # bit-identical


@pytest.mark.parametrize("kind", ["t5", "llama"])
@pytest.mark.parametrize("scoring", ["first", "sum", "mean"])
def test_scoring_rules_match_reference(kind: str, scoring: str) -> None:
    engine = make_engine(kind)
    spec = TaskSpec(template="Review: {text}\nSentiment: ", labels=("bad", " positive", "neutral stance"), scoring=scoring)  # ends in a space: labels are scored as written
    engine.tasks.add(engine.tasks.new("pt", "prompt_tuning", spec, init={"prompt": torch.zeros(0, engine.backbone.d_model)}))
    texts = ["so so", "a long and winding review of a film"]
    batch = engine.run([Request("pt", t) for t in texts])
    for text, got in zip(texts, batch):
        want = plain_scores(engine, spec, text)
        assert torch.allclose(torch.tensor([got.scores[label] for label in spec.labels]), want, atol=1e-5)


def test_the_lm_head_computes_only_the_label_columns_a_classification_pass_needs(served) -> None:
    """Rows scored by `first` / `sum` need only their labels' first-token logits (the row's
    normaliser cancels in the softmax over its labels: test_scoring_rules_match_reference checks the
    scores); one generative or `mean`-scored row brings back the whole vocabulary, and T5 scores
    labels through its decoder."""
    engine, names = served
    b = engine.backbone
    vocab = b.model.get_output_embeddings().weight.shape[0]
    engine.tasks.add(engine.tasks.new("mean-scored", "prompt_tuning", dataclasses.replace(CLASSIFY, scoring="mean")))
    classify = [n for n in names if not n.endswith("-gen")]
    firsts = {b.label_ids(label, CLASSIFY.template)[0] for label in CLASSIFY.labels}

    def kept_columns(tasks: list[str]) -> int | None:
        """How many logits the prompt pass kept per row (None: T5, whose prompt pass has none)."""
        plan = engine.schedule([Request(n, TEXTS[i % len(TEXTS)]) for i, n in enumerate(tasks)])
        with torch.no_grad():
            enc, _, _ = engine._encode(plan, live=False, labels_only=True)
        return None if enc.last_logits is None else enc.last_logits.shape[-1]

    whole = None if b.is_encoder_decoder else vocab
    assert kept_columns(classify) == (whole if b.is_encoder_decoder else len(firsts))
    assert kept_columns([*classify, names[-1]]) == whole  # a generative row
    assert kept_columns([*classify, "mean-scored"]) == whole
    engine.tasks.remove("mean-scored")


@pytest.mark.parametrize("kind", ["t5", "llama"])
@pytest.mark.parametrize("method", ["prompt_tuning", "pha"])
def test_position_wise_modules_of_a_padded_first_pass_skip_the_padding(kind: str, method: str) -> None:
    """Rows of different lengths in one pass: every attention projection and FFN of the first pass
    computes the rows' real positions only (its output is exactly 0 at the padding, where W·x
    would not be), and each row's scores are what it gets alone."""
    engine = make_engine(kind)
    add_tasks(engine, per_method=1)
    texts = ["ok", "a much longer review, with many more words in it than the first one has"]
    requests = [Request(f"{method}-0", t) for t in texts]
    plan = engine.schedule(requests)
    prompt = engine.tasks.get_task(f"{method}-0").params.get("prompt")
    in_pass = 0 if prompt is None or not kind == "t5" else prompt.shape[0]  # T5's prompt runs in the encoder pass; Llama's is a cached past
    real = [len(ids) + in_pass for ids in plan.prompt_ids]
    assert real[0] < real[1]
    first_outputs: dict[int, torch.Tensor] = {}
    def keep_first(i: int):
        def hook(_module, _args, out: torch.Tensor) -> None:
            first_outputs.setdefault(i, out)
        return hook

    handles = [m.register_forward_hook(keep_first(i)) for i, m in enumerate(engine.hooks.position_wise)]
    try:
        batch = engine.run(requests)
    finally:
        for h in handles:
            h.remove()
    assert len(first_outputs) == len(engine.hooks.position_wise) > 0
    checked = 0
    for i, out in first_outputs.items():
        if engine.hooks.position_wise[i] in engine.hooks.ffn_sites and method == "pha":
            continue  # PHA's adapter hook adds A(x) after the FFN, padding included
        zero_rows = int((out.reshape(-1, out.shape[-1]) == 0).all(-1).sum())
        assert zero_rows == 2 * max(real) - sum(real), i
        checked += 1
    assert checked >= len(first_outputs) // 2
    for request, got in zip(requests, batch):
        assert_same(got, engine.run([request])[0])


def test_first_token_scoring_refuses_labels_it_cannot_tell_apart() -> None:
    engine = make_engine("llama")
    spec = TaskSpec(template="{text}", labels=(" negative", " positive"), scoring="first")  # byte tokens: both start with " "
    with pytest.raises(InvalidRequest, match="first token"):
        engine.tasks.add(engine.tasks.new("tie", "prompt_tuning", spec))


def test_errors_are_typed() -> None:
    engine = make_engine("t5")
    engine.tasks.add(engine.tasks.new("pt", "prompt_tuning", CLASSIFY))
    with pytest.raises(NotFound):
        engine.run([Request("nope", "x")])
    with pytest.raises(InputTooLong):
        engine.run([Request("pt", "x" * 5000)])
    with pytest.raises(InvalidRequest):
        engine.tasks.new("Bad/Name", "prompt_tuning", CLASSIFY)
    with pytest.raises(InvalidRequest):
        engine.tasks.new("ok", "lora", CLASSIFY)
    with pytest.raises(InvalidRequest):
        engine.run([])


def test_new_version_replaces_old_and_remove_is_idempotent() -> None:
    engine = make_engine("t5")
    spec = dataclasses.replace(CLASSIFY, description="")  # undescribed: the seed draws the prompt (a description would fix it)
    engine.tasks.add(engine.tasks.new("pt", "prompt_tuning", spec, seed=1, version=1))
    v1 = engine.run([Request("pt", "x")])[0]
    engine.tasks.add(engine.tasks.new("pt", "prompt_tuning", spec, seed=2, version=2))
    v2 = engine.run([Request("pt", "x")])[0]
    assert (v1.task_version, v2.task_version) == (1, 2)
    assert v1.scores != v2.scores
    assert engine.tasks.loaded("pt").task.version == 2
    engine.tasks.remove("pt")
    engine.tasks.remove("pt")
    with pytest.raises(NotFound):
        engine.run([Request("pt", "x")])


def test_attempt_pools_real_tokens_only() -> None:
    """ATTEMPT's max-pool ignores padding: a row's instance prompt is the same padded or not."""
    from server.methods.base import RowGroup

    engine = make_engine("t5")
    attempt = engine.methods["attempt"]
    with torch.no_grad():
        attempt.up.weight.mul_(50)  # sharpen the attention so a pooling change would show
        task = engine.tasks.new("a", "attempt", CLASSIFY)
        statics = [attempt.static(task)]
        embeds = torch.randn(1, 3, engine.backbone.d_model) - 3.0  # all-negative real tokens
        outs = []
        for pad in (0, 4):
            padded = torch.cat([embeds, torch.zeros(1, pad, embeds.shape[-1])], dim=1)
            mask = torch.cat([torch.ones(1, 3), torch.zeros(1, pad)], dim=1).long()
            group = RowGroup(torch.tensor([0]), [task], torch.tensor([0]), statics, padded, mask, [task])
            ctx = BatchContext(1, engine.backbone.d_model, engine.backbone.n_layers, torch.device("cpu"), torch.float32)
            attempt.modulate(group, ctx)
            outs.append(ctx.assemble().prefix)
    assert torch.equal(outs[0], outs[1])


def test_batch_in_flight_keeps_the_version_it_was_scheduled_with() -> None:
    engine = make_engine("llama")
    engine.tasks.add(engine.tasks.new("pha", "pha", CLASSIFY, seed=1, version=1))
    want_v1 = engine.run([Request("pha", "x")])[0]
    plan = engine.schedule([Request("pha", "x")])
    engine.tasks.add(engine.tasks.new("pha", "pha", CLASSIFY, seed=2, version=2))  # swapped in meanwhile
    engine.tasks.remove("pha")
    got = engine.complete(plan, engine.execute(plan))[0]
    assert got.task_version == 1 and got.scores == want_v1.scores


@pytest.mark.parametrize("kind", ["t5", "llama"])
def test_length_buckets_keep_rows_invariant(kind: str) -> None:
    """With lengths padded up to buckets of 16 (for graph capture), every row still equals its solo run."""
    engine = make_engine(kind, config=EngineConfig(length_multiple=16))
    names = add_tasks(engine, per_method=1)
    requests = [Request(n, TEXTS[i % len(TEXTS)]) for i, n in enumerate(names)]
    for req, got in zip(requests, engine.run(requests)):
        assert_same(got, engine.run([req])[0])


@pytest.mark.parametrize("kind", ["t5", "llama"])
def test_task_memory_bound_evicts_lru_and_reloads_bit_identical(kind: str) -> None:
    unbounded = make_engine(kind)
    names = add_tasks(unbounded, per_method=2)
    one_task = max(unbounded.tasks.loaded(n).nbytes for n in names)
    bound = 2 * one_task  # a few tasks' worth: several of the 10 must be evicted
    bounded = make_engine(kind, config=EngineConfig(task_memory_bytes=bound))
    for name in names:
        bounded.tasks.add(unbounded.tasks[name])
    assert bounded.tasks.resident_bytes <= bound < unbounded.tasks.resident_bytes
    requests = [Request(n, "a fine film") for n in names]
    want = [unbounded.run([r])[0] for r in requests]
    for _ in range(2):  # every task is evicted and rebuilt from its host copy at least once
        for request, expected in zip(requests, want):
            got = bounded.run([request])[0]
            assert got.scores == expected.scores, request.task
            assert bounded.tasks.resident_bytes <= bound
    mixed = bounded.run(requests)  # a batch needing more than the bound still runs, then shrinks back
    assert [r.scores for r in mixed] == [r.scores for r in unbounded.run(requests)]
    bounded.run([requests[0]])
    assert bounded.tasks.resident_bytes <= bound


def test_new_shared_module_version_leaves_existing_tasks_untouched() -> None:
    engine = make_engine("llama")
    add_tasks(engine, per_method=1)
    requests = [Request(f"{m}-0", "a fine film") for m in METHODS]
    before = [r.scores for r in engine.run(requests)]
    for method in METHODS:  # a retrained shared module (e.g. multi-task training) becomes v1
        retrained = copy.deepcopy(engine.methods[method])
        with torch.no_grad():
            for p in retrained.parameters():
                p.add_(torch.randn_like(p) * 0.3)
        engine.tasks.set_module(method, 1, retrained)
    assert [r.scores for r in engine.run(requests)] == before  # old tasks keep module v0
    fresh = engine.tasks.new("fresh-ip", "ip", CLASSIFY)
    assert fresh.module_version == 1
    engine.tasks.add(fresh)
    engine.tasks.remove("ip-0")  # nothing uses ip v0 any more: it is dropped
    assert not engine.tasks.has_module("ip", 0) and engine.tasks.has_module("pha", 0)
    with pytest.raises(Incompatible):
        engine.tasks.add(dataclasses.replace(fresh, name="stale", module_version=7))


def test_cached_prompt_prefixes_give_what_the_full_pass_gives() -> None:
    """Decoder-only: prompt tuning's and TPV's prompts run once per task version as cached keys and
    values; rows mixed with every other method (ATTEMPT's per-instance prefixes included) answer
    as the uncached engine does, and generations are token-identical."""
    cached, full = make_engine("llama"), make_engine("llama", config=EngineConfig(cache_prefixes=False))
    names = add_tasks(cached, per_method=2)
    for name in names:
        full.tasks.add(cached.tasks[name])
    for method in ("prompt_tuning", "tpv"):
        gen = cached.tasks.new(f"{method}-gen", method, GENERATE, seed=3)
        cached.tasks.add(gen)
        full.tasks.add(gen)
        names.append(gen.name)
    assert all("prefix_kv" in cached.tasks.loaded(n).static for n in names if n.startswith(("prompt_tuning", "tpv")))
    assert not any("prefix_kv" in full.tasks.loaded(n).static for n in names)
    assert "prefix_kv" not in cached.tasks.loaded("attempt-0").static  # per instance: nothing to cache
    requests = [Request(n, TEXTS[i % len(TEXTS)], max_new_tokens=4) for i, n in enumerate(names * 2)]
    for got, want in zip(cached.run(requests), full.run(requests), strict=True):
        assert_same(got, want)


def test_a_cached_prefix_follows_its_task_version() -> None:
    engine, full = make_engine("llama"), make_engine("llama", config=EngineConfig(cache_prefixes=False))
    for version, seed in ((1, 1), (2, 2)):
        task = engine.tasks.new("pt", "prompt_tuning", dataclasses.replace(CLASSIFY, description=""), seed=seed, version=version)
        engine.tasks.add(task)
        full.tasks.add(task)
        assert engine.run([Request("pt", "x")])[0].scores == pytest.approx(full.run([Request("pt", "x")])[0].scores, abs=1e-5)
    engine.tasks.remove("pt")
    with pytest.raises(NotFound):
        engine.run([Request("pt", "x")])


def test_t5_prompts_are_not_cached() -> None:
    engine = make_engine("t5")
    engine.tasks.add(engine.tasks.new("pt", "prompt_tuning", CLASSIFY))
    assert "prefix_kv" not in engine.tasks.loaded("pt").static  # the encoder attends both ways


@pytest.mark.parametrize("kind", ["t5", "llama"])
def test_batch_invariance_in_bfloat16_within_a_stated_tolerance(kind: str) -> None:
    """bf16 serving (the CPU default where bf16 is native): a row's probabilities in a mixed batch
    are its solo ones within 0.01 (bf16 keeps 8 bits of mantissa; padding changes reduction order),
    and the label is the same wherever the solo margin exceeds that."""
    engine = make_engine(kind, dtype=torch.bfloat16)
    names = add_tasks(engine, per_method=2)
    requests = [Request(n, TEXTS[i % len(TEXTS)]) for i, n in enumerate(names * 2)]
    for request, got in zip(requests, engine.run(requests)):
        solo = engine.run([request])[0]
        for label, p in solo.scores.items():
            assert got.scores[label] == pytest.approx(p, abs=0.01)
        ranked = sorted(solo.scores.values(), reverse=True)
        if ranked[0] - ranked[1] > 0.02:
            assert got.label == solo.label
