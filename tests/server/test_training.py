"""The trainer and multi-task training on tiny models: checkpoints resume exactly, every method's
multi-task run publishes what a fresh process then serves identically, and evaluation metrics."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from adapters_store.store import Store
from helpers import METHODS, SMALL_CONFIGS, make_engine
from server.data.spec import TaskSpec
from server.engine import Example, Request
from server.training.evaluate import classification_metrics
from server.training.experiments import TaskData, multitask
from server.methods import recipe_for
from server.methods.prompt_tuning import PromptConfig
from server.methods.recipe import served_name
from server.store_sync import attach
from server.training.workbench import Workbench
from server.errors import CorruptArtifact
from server.training.trainer import Cancelled, TrainConfig, train

SPEC = TaskSpec(template="Review: {text}\nSentiment:", labels=(" negative", " positive"), description="Tell me the sentiment:", scoring="sum")


def rows(task: str, n: int, flip: bool = False) -> list[Example]:
    return [Example(task, f"{'aaaa' if i % 2 else 'zzzz'} {task} {i}", " positive" if (i % 2) != flip else " negative") for i in range(n)]


def test_classification_metrics_by_hand() -> None:
    m = classification_metrics(["a", "a", "b", "b"], ["a", "b", "b", "b"], ["a", "b"])
    assert m["accuracy"] == 0.75 and m["n"] == 4
    assert m["f1_macro"] == pytest.approx((2 / 3 + 0.8) / 2)  # F1(a) = 2·1/(2+0+1), F1(b) = 2·2/(4+1+0)


@pytest.mark.parametrize("average", [0.0, 0.8])
def test_checkpoint_resume_reproduces_the_uninterrupted_run(tmp_path: Path, average: float) -> None:
    def run(checkpoint: Path | None, stop_after: int | None = None) -> torch.Tensor:
        engine = make_engine("llama")
        task = engine.tasks.new("t", "prompt_tuning", SPEC, seed=1).on(engine.backbone.device)
        trainables = recipe_for("prompt_tuning").trainables(task)
        engine.tasks.add(task)
        calls = {"n": 0}

        def stop() -> bool:
            calls["n"] += 1
            return stop_after is not None and calls["n"] > stop_after

        config = TrainConfig(steps=10, batch_size=4, checkpoint_every=5, eval_every=5, seed=3, average=average)
        try:
            # averaged: no validation, so the run returns the average itself (which the checkpoint must carry)
            validation = {} if average else {"t": rows("t", 4)}
            train(engine, [task], {"t": rows("t", 12)}, validation, trainables, config, checkpoint=checkpoint, should_stop=stop)
        except Cancelled:
            return None
        return task.params["prompt"].detach().clone()

    straight = run(None)
    assert run(tmp_path / "ckpt.pt", stop_after=7) is None  # killed after step 7; the checkpoint holds step 5
    assert json.loads((tmp_path / "ckpt.pt" / "state.json").read_text())["step"] == 5  # a safetensors + JSON folder, no pickle
    resumed = run(tmp_path / "ckpt.pt")
    assert torch.allclose(resumed, straight, atol=1e-6)
    assert not torch.equal(straight, make_engine("llama").tasks.new("t", "prompt_tuning", SPEC, seed=1).params["prompt"])


def test_with_averaging_the_run_returns_the_moving_average_of_its_iterates() -> None:
    """average = β: after every step a ← β·a + (1 − β)·θ, from a = the start; without validation
    rows the run ends holding a, not the last iterate θ."""
    engine = make_engine("llama")
    task = engine.tasks.new("t", "prompt_tuning", SPEC, seed=1).on(engine.backbone.device)
    engine.tasks.add(task)
    iterates = [task.params["prompt"].detach().clone()]
    config = TrainConfig(steps=6, batch_size=4, seed=3, average=0.7)
    train(engine, [task], {"t": rows("t", 12)}, {}, recipe_for("prompt_tuning").trainables(task), config,
          on_progress=lambda p: iterates.append(task.params["prompt"].detach().clone()))
    expected = iterates[0]
    for theta in iterates[1:]:
        expected = 0.7 * expected + 0.3 * theta
    assert len(iterates) == 7 and not torch.allclose(expected, iterates[-1], atol=1e-4)
    assert torch.allclose(task.params["prompt"], expected, atol=1e-6)


def test_bf16_autocast_runs_the_matmuls_in_bf16_and_trains_fp32_values() -> None:
    """autocast="bfloat16" on CPU: the backbone's linear layers compute in bf16 during the training
    steps only (validation and serving stay in the engine's dtype); the prompt, its gradient and
    the optimiser state stay fp32, and the training loss falls."""
    engine = make_engine("llama")
    task = engine.tasks.new("t", "prompt_tuning", SPEC, seed=1).on(engine.backbone.device)
    engine.tasks.add(task)
    train_rows = rows("t", 12)
    linear = next(m for m in engine.backbone.model.modules() if isinstance(m, torch.nn.Linear))
    seen: list[torch.dtype] = []
    linear.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    before = float(engine.loss(train_rows)["lm"])
    per_step = len(seen)  # the layer's calls in one loss (the prompt pass, and the label pass of longer labels)
    assert set(seen) == {torch.float32}  # outside training: the engine's fp32
    config = TrainConfig(steps=20, batch_size=4, seed=3, autocast="bfloat16", prompt_lr=0.3)
    train(engine, [task], {"t": train_rows}, {}, recipe_for("prompt_tuning").trainables(task), config)
    steps = seen[per_step : per_step * 21]
    assert steps == [torch.bfloat16] * (20 * per_step) and set(seen[per_step * 21 :]) <= {torch.float32}  # any evaluation after them: fp32
    assert task.params["prompt"].dtype == torch.float32
    assert float(engine.loss(train_rows)["lm"]) < before - 0.1


@pytest.mark.parametrize("method", METHODS)
def test_multitask_publishes_modules_and_tasks_a_fresh_process_serves_identically(method: str, tmp_path: Path) -> None:
    engine = make_engine("llama")
    store = Store(tmp_path)
    attach(store, engine)
    before = {m: {k: v.clone() for k, v in engine.tasks.method(m).state_dict().items()} for m in METHODS}
    data = {name: TaskData(SPEC, rows(name, 16, flip=(name == "b")), rows(name, 4, flip=(name == "b")), rows(name, 6, flip=(name == "b"))) for name in ("a", "b")}
    report = multitask(engine, store, method, ["a", "b"], data, TrainConfig(steps=6, batch_size=4, eval_every=3))
    assert set(report["tasks"]) == {"a", "b"} and report["tasks"]["a"]["test"]["n"] == 6
    shared_trained = method in ("attempt", "ip", "pha")
    assert store.registry.current_modules()[method] == (2 if shared_trained else 1)
    after = engine.tasks.method(method).state_dict()
    if shared_trained:
        assert any(not torch.equal(before[method][k].cpu(), after[k].cpu()) for k in after if k in before[method] and before[method][k].shape == after[k].shape) or method == "attempt"
    fresh = make_engine("llama")
    assert not attach(Store(tmp_path), fresh).failed
    for name in ("a", "b"):
        served = served_name(name, method)
        want = engine.run([Request(name, "aaaa film")])[0].scores
        assert fresh.run([Request(served, "aaaa film")])[0].scores == pytest.approx(want, abs=1e-5)
    if method == "attempt":  # the sources are the prompts trained in the first stage, one per task
        assert fresh.tasks.method("attempt").sources.shape[0] == 2


def test_attempt_takes_its_source_prompts_from_the_prompt_tuned_mix() -> None:
    engine = make_engine("llama")
    n_virtual = engine.tasks.method("attempt").config.n_virtual
    prompts = {name: torch.randn(n_virtual, engine.backbone.d_model) for name in ("a", "b")}
    for name, prompt in prompts.items():
        engine.tasks.add(engine.tasks.new(served_name(name, "prompt_tuning"), "prompt_tuning", SPEC, init={"prompt": prompt}))
    plan = recipe_for("attempt").multitask(Workbench(engine), {"a": SPEC, "b": SPEC}, seed=0)
    assert [stage.name for stage in plan.stages] == ["attention"]
    assert torch.equal(plan.module.sources.cpu(), torch.stack([prompts["a"], prompts["b"]]))


def test_attempt_trained_after_prompt_tuning_in_one_process_takes_the_published_prompts(tmp_path: Path) -> None:
    """`taskserve train --method all`: prompt tuning publishes the mix's tasks and serves them, so
    ATTEMPT, next, installs them as its sources instead of training its own (prompts of its length)."""
    engine = make_engine("llama", prompt_tuning=PromptConfig(n_virtual=SMALL_CONFIGS["attempt"].n_virtual))
    store = Store(tmp_path)
    attach(store, engine)
    data = {name: TaskData(SPEC, rows(name, 8), rows(name, 4), rows(name, 4)) for name in ("a", "b")}
    multitask(engine, store, "prompt_tuning", ["a", "b"], data, TrainConfig(steps=2, batch_size=4, eval_every=2))
    plan = recipe_for("attempt").multitask(Workbench(engine), {"a": SPEC, "b": SPEC}, seed=0)
    assert [stage.name for stage in plan.stages] == ["attention"]
    fresh = make_engine("llama")
    attach(Store(tmp_path), fresh)  # what the store holds, read back
    published = [fresh.tasks[served_name(n, "prompt_tuning")].params["prompt"].cpu() for n in ("a", "b")]
    assert torch.equal(plan.module.sources.cpu(), torch.stack(published))


def test_best_step_is_the_highest_validation_accuracy_then_the_lowest_validation_loss() -> None:
    engine = make_engine("llama")
    task = engine.tasks.new("t", "prompt_tuning", SPEC, seed=1).on(engine.backbone.device)
    trainables = recipe_for("prompt_tuning").trainables(task)
    engine.tasks.add(task)
    result = train(engine, [task], {"t": rows("t", 12)}, {"t": rows("t", 4)}, trainables, TrainConfig(steps=12, batch_size=4, eval_every=2, seed=0))
    history = result.history
    assert len(history) == 6 and all("val_loss" in h for h in history)
    best = max(history, key=lambda h: (h["val_accuracy"], -h["val_loss"]))
    assert result.best_step == best["step"]
    assert result.validation["t"]["accuracy"] == best["val_accuracy"]  # the kept parameters are that step's


def test_a_stopping_rule_ends_training_where_it_says_keeps_those_values_and_a_resume_stays_stopped(tmp_path: Path) -> None:
    """`stop_when`, asked after each validation, ends the run there with that step's values (not the
    best validation step's); a run resumed from the checkpoint of a stopped run trains no further."""
    def run(stop_when=None, stop_at=None, checkpoint=None):
        engine = make_engine("llama")
        task = engine.tasks.new("t", "prompt_tuning", SPEC, seed=1).on(engine.backbone.device)
        engine.tasks.add(task)
        config = TrainConfig(steps=12, batch_size=4, eval_every=2, checkpoint_every=2, seed=0)
        result = train(engine, [task], {"t": rows("t", 12)}, {"t": rows("t", 4)} if stop_when else {}, recipe_for("prompt_tuning").trainables(task),
                       config, checkpoint=checkpoint, stop_at=stop_at, stop_when=stop_when)
        return result, task.params["prompt"].detach().clone()

    asked = []
    stopped, values = run(stop_when=lambda done, v: asked.append(done) or done >= 6, checkpoint=tmp_path / "ckpt")
    assert asked == [2, 4, 6] and stopped.steps == 6 and stopped.best_step == 6 and [h["step"] for h in stopped.history] == [2, 4, 6]
    assert torch.allclose(values, run(stop_at=6)[1], atol=1e-6)  # step 6's values, whatever validation preferred
    resumed, again = run(stop_when=lambda done, v: done >= 6, checkpoint=tmp_path / "ckpt")
    assert resumed.steps == 6 and torch.equal(again, values)


UNDESCRIBED = dataclasses.replace(SPEC, description="")  # θ_init is the only start without transfer


def _trained_tpv(engine, name: str, label: str, spec: TaskSpec = UNDESCRIBED) -> None:
    """A tpv source that learned to answer `label` (a tiny random model learns the label prior)."""
    task = engine.tasks.new(name, "tpv", spec, seed=0).on(engine.backbone.device)
    trainables = recipe_for("tpv").trainables(task)
    engine.tasks.add(task)
    train(engine, [task], {name: [Example(name, f"text {i}", label) for i in range(8)]}, {}, trainables, TrainConfig(steps=20, batch_size=8, prompt_lr=0.3))
    engine.tasks.add(task)


def test_tpv_few_shot_starts_from_the_sources_that_fit_the_examples_better_than_theta_init() -> None:
    engine = make_engine("llama")
    examples = [Example("new", f"new text {i}", " negative") for i in range(16)]
    _trained_tpv(engine, "fits", " negative")
    _trained_tpv(engine, "opposite", " positive")  # fits the examples worse than θ_init alone
    _, notes = recipe_for("tpv").few_shot(Workbench(engine), "new", UNDESCRIBED, examples, {}, seed=0)
    assert list(notes["init_from"]) == ["fits"] and notes["init_from"]["fits"]["weight"] == pytest.approx(1.0)

    engine.tasks.remove("fits")
    task, notes = recipe_for("tpv").few_shot(Workbench(engine), "new", UNDESCRIBED, examples, {}, seed=0)
    assert list(notes["init_from"]) == ["theta_init"]
    assert not task.params["tau"].any()  # no source fits: the prompt starts at θ_init (τ = 0)


def test_tpv_few_shot_of_a_described_task_starts_from_the_better_of_theta_init_and_its_description() -> None:
    engine = make_engine("llama")
    examples = [Example("new", f"new text {i}", "negative") for i in range(16)]
    task, notes = recipe_for("tpv").few_shot(Workbench(engine), "new", SPEC, examples, {}, seed=0)
    starts = notes["starts"]
    assert set(starts) == {"theta_init", "text"}
    best = min(starts, key=lambda s: starts[s]["misfit"])
    assert list(notes["init_from"]) == [best]
    theta = engine.tasks.method("tpv").theta_init("origin-0").detach().cpu()
    text_prompt = engine.tasks.new("t", "tpv", SPEC).params["tau"].detach() + theta
    want = text_prompt if best == "text" else theta
    assert torch.allclose(task.params["tau"].detach().cpu() + theta, want, atol=1e-6)


def test_a_pickle_planted_as_a_checkpoint_is_refused_and_never_runs(tmp_path: Path) -> None:
    """Resuming never unpickles: a file whose unpickling would run code (here: create a marker)
    planted where the checkpoint is expected is refused, and its payload never runs."""
    import pickle

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    engine = make_engine("llama")
    task = engine.tasks.new("t", "prompt_tuning", SPEC, seed=1).on(engine.backbone.device)
    engine.tasks.add(task)
    trainables = recipe_for("prompt_tuning").trainables(task)
    config = TrainConfig(steps=4, batch_size=4, checkpoint_every=2, eval_every=2)
    as_file = tmp_path / "ckpt-file"
    as_file.write_bytes(pickle.dumps(Payload()))  # the old single-file .pt format, a pickle
    as_folder = tmp_path / "ckpt-folder"
    as_folder.mkdir()
    (as_folder / "state.json").write_text('{"step": 2}')
    (as_folder / "tensors.safetensors").write_bytes(pickle.dumps(Payload()))
    for planted in (as_file, as_folder):
        with pytest.raises(CorruptArtifact, match="refused"):
            train(engine, [task], {"t": rows("t", 8)}, {}, trainables, config, checkpoint=planted)
    assert not marker.exists()


def test_no_server_code_unpickles() -> None:
    root = Path(__file__).parents[2]
    found = [f"{p.relative_to(root)}: {line.strip()}" for folder in ("server", "adapters_store", "client") for p in (root / folder).rglob("*.py")
             for line in p.read_text().splitlines() if "torch.load(" in line or "import pickle" in line or "pickle.load" in line]
    assert not found, found
