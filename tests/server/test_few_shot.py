"""Few-shot task creation on tiny models: the description-aware start (TEXT init), soft-prompt
learning rates scaled to the backbone, selection by cross-validation, the zero-shot guard, and
PHA's mixed retrieval with per-task refinement."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from helpers import make_engine
from server.data.spec import TaskSpec
from server.engine import Request
from server.methods import recipe_for
from server.task import Example
from server.training.few_shot import START, _folds, _untrained_beating, final_fit_steps, learn
from server.training.trainer import TrainConfig, train
from server.training.workbench import Workbench

SPEC = TaskSpec(template="Review: {text}\nSentiment: ", labels=("negative", "positive"), description="Tell me the sentiment of the review:", scoring="first")
TEXTS = [f"{'aaaa' if i % 2 else 'zzzz'} film {i}" for i in range(16)]


def test_text_init_reproduces_the_descriptions_token_embeddings() -> None:
    """PEFT's TEXT init: a described task's prompt rows are the embeddings of its description and
    labels' tokens, repeated to the prompt length; without a description, vocabulary samples."""
    engine = make_engine("llama")
    b = engine.backbone
    ids = b.tokenizer("Tell me the sentiment of the review: negative positive", add_special_tokens=False)["input_ids"]
    for method, key, n in (("prompt_tuning", "prompt", engine.tasks.method("prompt_tuning").config.n_virtual),
                           ("attempt", "target", engine.tasks.method("attempt").config.n_virtual)):
        prompt = engine.tasks.new("t", method, SPEC).params[key].detach()
        want = b.embedding.weight.detach()[torch.tensor((ids * n)[:n])]
        assert torch.equal(prompt, want), method
        undescribed = engine.tasks.new("u", method, dataclasses.replace(SPEC, description="")).params[key].detach()
        assert not torch.equal(undescribed, want)
    tpv = engine.tasks.method("tpv")
    n = tpv.config.n_virtual
    tau = engine.tasks.new("t", "tpv", SPEC).params["tau"].detach()
    assert torch.allclose(tpv.theta_init("origin-0").detach() + tau, b.embedding.weight.detach()[torch.tensor((ids * n)[:n])], atol=1e-6)


def test_prompt_learning_rate_follows_the_embedding_scale() -> None:
    embedding = torch.randn(100, 8) * 0.5
    rms = float(embedding.pow(2).mean().sqrt())
    assert TrainConfig().prompt_lr_for(embedding) == pytest.approx(0.03 * rms)
    assert TrainConfig(prompt_lr_relative=0.3).prompt_lr_for(embedding * 4) == pytest.approx(0.3 * 4 * rms)
    assert TrainConfig(prompt_lr=0.3).prompt_lr_for(embedding) == 0.3  # explicit: absolute
    assert TrainConfig.for_job(steps=60).eval_every == 10


def test_the_guard_publishes_the_untrained_start_when_training_makes_validation_worse() -> None:
    """Examples labelled with the start's own answers: the start is right on every held-out row,
    and a wildly large learning rate can only make things worse — the start is published."""
    engine = make_engine("llama")
    start = recipe_for("prompt_tuning").few_shot(Workbench(engine), "probe", SPEC, [], {}, 0)[0]
    with engine.tasks.temporary(start):
        answers = [r.label for r in engine.run([Request("probe", t) for t in TEXTS])]
    rows = [Example("new", t, a) for t, a in zip(TEXTS, answers)]
    learned = learn(engine, "new", "prompt_tuning", SPEC, rows, {}, TrainConfig(steps=10, batch_size=4, eval_every=5, prompt_lr=50.0))
    assert learned.selection[START]["accuracy"] == 1.0
    assert learned.chosen == START and learned.steps == 0 and "guard" in learned.notes
    assert torch.equal(learned.task.params["prompt"], start.params["prompt"].detach().cpu())
    assert learned.task.name == "new" and not any(p.requires_grad for p in learned.task.params.values())
    assert set(engine.tasks) == set()  # nothing left behind


def test_with_too_few_examples_to_hold_any_out_the_final_fit_check_still_guards() -> None:
    """Three examples cannot make two folds: all the steps train on all of them, and the fit is
    checked on them against the untrained candidates — here the start, right on every example,
    beats a fit a wildly large learning rate spoiled, so the start is published."""
    engine = make_engine("llama")
    start = recipe_for("prompt_tuning").few_shot(Workbench(engine), "probe", SPEC, [], {}, 0)[0]
    with engine.tasks.temporary(start):
        answers = [r.label for r in engine.run([Request("probe", t) for t in TEXTS[:3]])]
    rows = [Example("new", t, a) for t, a in zip(TEXTS[:3], answers)]
    learned = learn(engine, "new", "prompt_tuning", SPEC, rows, {}, TrainConfig(steps=10, batch_size=4, eval_every=5, prompt_lr=50.0))
    assert learned.folds == 0 and learned.selection[START] == {"accuracy": 1.0, "nll": learned.selection[START]["nll"], "rows": 3}
    assert learned.final_fit["rows"] == 3 and learned.final_fit["accuracy"] < 1.0  # what the check weighed
    assert learned.chosen == START and learned.steps == 0 and "final fit" in learned.notes["guard"]
    assert torch.equal(learned.task.params["prompt"], start.params["prompt"].detach().cpu())
    unguarded = learn(engine, "new", "prompt_tuning", SPEC, rows, {}, TrainConfig(steps=10, batch_size=4, eval_every=5, prompt_lr=50.0), folds=0)
    assert unguarded.chosen == "step 10" and unguarded.selection == {} and "guard" not in unguarded.notes  # folds=0: no selection asked for


def test_the_final_fit_makes_the_folds_passes_within_the_schedule() -> None:
    assert final_fit_steps(10, 16, 32, 60) == 20  # two folds: twice the steps on twice the rows
    assert final_fit_steps(30, 16, 32, 60) == 60
    assert final_fit_steps(40, 16, 32, 60) == 60  # the schedule's learning rate is 0 past its end
    assert final_fit_steps(5, 24, 32, 60) == 7  # four folds: 5 × 32/24 = 6.7
    assert final_fit_steps(0, 16, 32, 60) == 0


def test_selection_is_cross_validated_and_the_final_fit_makes_the_chosen_steps_passes() -> None:
    """The selection rule: every candidate (the start, each evaluated step, each description-only
    task of another method) is scored on the held-out examples of 2 stratified folds — all 16, once
    each — and the highest accuracy wins, ties to the lower misfit, then to the earlier candidate
    (less training). A trained winner is refit on all examples for at least the passes its folds
    made — twice its steps (each fold trained on 8 of the 16), within the schedule's length — then
    until it classifies every example."""
    engine = make_engine("llama")
    target = "positive"
    rows = [Example("new", t, target) for t in TEXTS]
    config = TrainConfig(steps=12, batch_size=4, eval_every=4, seed=1)
    learned = learn(engine, "new", "prompt_tuning", SPEC, rows, {}, config)
    sel = learned.selection
    assert list(sel)[:4] == [START, "step 4", "step 8", "step 12"]
    assert {"plain zero-shot", "ip zero-shot"} <= set(sel)  # the tiny llama has a form module: IP qualifies
    assert all(v["rows"] == len(rows) for v in sel.values()) and learned.folds == 2
    best = max(sel.values(), key=lambda v: (v["accuracy"], -v["nll"]))
    assert learned.chosen == next(c for c, v in sel.items() if (v["accuracy"], -v["nll"]) == (best["accuracy"], -best["nll"]))
    # without the guard only trained steps compete, so a step is chosen and refit
    config = TrainConfig(steps=16, batch_size=4, eval_every=4, seed=1)
    trained = learn(engine, "new", "prompt_tuning", SPEC, rows, {}, config, guard=False)
    assert START not in trained.selection and trained.chosen.startswith("step ")
    least = min(16, 2 * int(trained.chosen.split()[1]))
    assert trained.steps >= least and f"{trained.steps} steps on all 16 examples: at least {least}" in trained.notes["final_fit"]
    assert trained.final_fit["accuracy"] == 1.0 or trained.steps == 16  # then on until it fits every example, or the schedule ends
    replay = recipe_for("prompt_tuning").few_shot(Workbench(engine), "replay", SPEC, [], {}, config.seed)[0].on("cpu")
    with engine.tasks.temporary(replay):
        train(engine, [replay], {"replay": [dataclasses.replace(e, task="replay") for e in rows]}, {}, recipe_for("prompt_tuning").trainables(replay), config, stop_at=trained.steps)
    assert torch.allclose(replay.params["prompt"].detach(), trained.task.params["prompt"], atol=1e-6)


def test_a_description_only_task_of_another_method_can_win_and_is_published_under_the_name() -> None:
    engine = make_engine("llama")
    plain = engine.tasks.new("p", "plain", SPEC)
    with engine.tasks.temporary(plain):
        answers = [r.label for r in engine.run([Request("p", t) for t in TEXTS])]
    rows = [Example("new", t, a) for t, a in zip(TEXTS, answers)]  # exactly what the plain backbone says
    learned = learn(engine, "new", "pha", SPEC, rows, {}, TrainConfig(steps=4, batch_size=4, eval_every=2, prototype_lr=50.0), guard=True)
    assert learned.selection["plain zero-shot"]["accuracy"] == 1.0
    if learned.chosen == "plain zero-shot":  # the pha start could tie it; the earlier candidate wins ties
        assert learned.task.method == "plain" and learned.task.name == "new" and "guard" in learned.notes
    else:
        assert learned.selection[learned.chosen]["accuracy"] == 1.0


def test_pha_starts_from_a_similarity_weighted_mix_and_refines_its_adapters() -> None:
    engine = make_engine("llama")
    peers = []
    for i in range(4):
        task = engine.tasks.new(f"peer-{i}", "pha", SPEC, seed=i)
        engine.tasks.add(task)
        peers.append(task)
    examples = [Example("new", t, "positive") for t in TEXTS]
    task, notes = recipe_for("pha").few_shot(Workbench(engine), "new", SPEC, examples, {}, seed=0)
    retrieval = notes["retrieval"]
    assert len(retrieval) == 3 and [r["similarity"] for r in retrieval] == sorted((r["similarity"] for r in retrieval), reverse=True)
    assert sum(r["weight"] for r in retrieval) == pytest.approx(1.0, abs=1e-3)
    by_name = {t.name: t for t in peers}
    mix = sum(r["weight"] * by_name[r["task"]].params["prototype"].detach() for r in retrieval)
    assert torch.allclose(task.params["prototype"].detach().cpu(), mix, atol=1e-3)
    assert set(task.params) == {"prototype", "adapter_gain", "adapter_shift"} and not task.params["adapter_gain"].any()
    # zero refinement is the prototype alone; a trained refinement moves the served adapters
    pha = engine.tasks.method("pha")
    plain_adapters = pha.generate(task.params["prototype"].float())
    for key, value in pha.static(task).items():
        assert torch.equal(value, plain_adapters[key])
    with torch.no_grad():
        task.params["adapter_shift"].add_(0.5)
    assert not torch.equal(pha.static(task)["up_bias"], plain_adapters["up_bias"])


def test_a_reservation_can_end_as_another_methods_task_but_a_published_task_keeps_its_method(tmp_path) -> None:
    from adapters_store.registry import Registry
    from server.errors import Conflict

    registry = Registry(f"sqlite:///{tmp_path / 'r.db'}")
    registry.reserve("t", "prompt_tuning")
    registry.publish_version("t", "plain", 1, "tasks/t/v1", "0" * 64)  # the guard chose the description-only task
    assert registry.get_task("t")["method"] == "plain"
    with pytest.raises(Conflict):
        registry.publish_version("t", "prompt_tuning", 2, "tasks/t/v2", "1" * 64)


def test_a_final_fit_that_fits_its_own_examples_worse_than_the_start_is_not_published() -> None:
    """The check on the final fit, by the selection's order (accuracy, then misfit; a tie keeps the
    fit), against every untrained candidate and never against a trained step."""
    selection = {START: {"accuracy": 0.72, "nll": 0.55, "rows": 32}, "step 10": {"accuracy": 0.78, "nll": 0.53, "rows": 32},
                 "ip zero-shot": {"accuracy": 0.66, "nll": 0.60, "rows": 32}}
    assert _untrained_beating(selection, {"accuracy": 0.65, "nll": 0.60, "rows": 32}) == START
    assert _untrained_beating(selection, {"accuracy": 0.72, "nll": 0.56, "rows": 32}) == START  # same accuracy, worse misfit
    assert _untrained_beating(selection, {"accuracy": 0.72, "nll": 0.55, "rows": 32}) is None  # a tie keeps the fit
    assert _untrained_beating(selection, {"accuracy": 0.75, "nll": 0.70, "rows": 32}) is None  # the trained step's 0.78 is no bar
    zero_best = {**selection, "ip zero-shot": {"accuracy": 0.9, "nll": 0.3, "rows": 32}}
    assert _untrained_beating(zero_best, {"accuracy": 0.8, "nll": 0.4, "rows": 32}) == "ip zero-shot"
    assert _untrained_beating({"step 10": selection["step 10"]}, {"accuracy": 0.0, "nll": 9.0, "rows": 32}) is None  # guard off: nothing untrained


def test_a_soup_publishes_the_average_of_the_final_fit_and_the_folds_fits() -> None:
    """With `soup` the published values are the uniform mean of the final fit's and each fold's
    (at its best held-out step), every fit replayed here on its own from the same start."""
    engine = make_engine("llama")
    rows = [Example("new", t, "positive" if i % 2 else "negative") for i, t in enumerate(TEXTS)]
    config = TrainConfig(steps=12, batch_size=4, eval_every=4, seed=1)
    final = learn(engine, "new", "prompt_tuning", SPEC, rows, {}, config, guard=False, soup=False)
    souped = learn(engine, "new", "prompt_tuning", SPEC, rows, {}, config, guard=False, soup=True)
    assert souped.chosen == final.chosen and souped.steps == final.steps and "soup" in souped.notes
    recipe = recipe_for("prompt_tuning")
    fits = [final.task.params["prompt"]]
    parts = _folds([dataclasses.replace(e, task="fold") for e in rows], 2, config.seed)
    for i, held in enumerate(parts):
        part = [e for j, p in enumerate(parts) if j != i for e in p]
        fold = recipe.few_shot(Workbench(engine), "fold", SPEC, [], {}, config.seed)[0].on("cpu")
        with engine.tasks.temporary(fold):
            train(engine, [fold], {"fold": part}, {"fold": held}, recipe.trainables(fold), config, eval_at_start=True)
        fits.append(fold.params["prompt"].detach())
    assert not torch.allclose(fits[1], fits[2])  # the folds trained on different halves
    assert torch.allclose(souped.task.params["prompt"], sum(fits) / 3, atol=1e-6)


def test_the_published_final_fit_is_scored_on_the_examples_it_trained_on() -> None:
    """A trained winner carries its fit on all k examples: the published task's own score on them."""
    engine = make_engine("llama")
    rows = [Example("new", t, "positive" if i % 2 else "negative") for i, t in enumerate(TEXTS)]
    learned = learn(engine, "new", "pha", SPEC, rows, {}, TrainConfig(steps=12, batch_size=4, eval_every=4, seed=1, prototype_lr=0.1))
    assert learned.chosen.startswith("step "), learned.selection  # this draw trains (seeded): a final fit to check
    with engine.tasks.temporary(learned.task):
        answers = [r.label for r in engine.run([Request("new", e.text) for e in rows])]
    assert learned.final_fit["rows"] == len(rows)
    assert learned.final_fit["accuracy"] == sum(a == e.target for a, e in zip(answers, rows)) / len(rows)
    best = max((v["accuracy"], -v["nll"]) for c, v in learned.selection.items() if not c.startswith("step "))
    assert (learned.final_fit["accuracy"], -learned.final_fit["nll"]) >= best and "guard" not in learned.notes
