"""What `taskserve train` and `taskserve eval` run on the real data: multi-task training of a
method's shared modules (published into the store with its tasks), the backbone's zero-shot
baseline, evaluation of served tasks, and few-shot transfer to held-out tasks.

Every task's rows come from the data catalog with one seeded split, so the zero-shot baseline,
multi-task training and few-shot transfer are measured on the same test rows.
"""

from __future__ import annotations

import dataclasses
import shutil
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapters_store.store import Store
from server.data import catalog
from server.data.readers import LabeledText
from server.data.spec import TaskSpec
from server.data.splits import few_shot as sample_few_shot, split
from server.engine import Engine
from server.methods import PLAIN, recipe_for
from server.methods.recipe import served_name
from server.task import Example
from server.training.evaluate import evaluate
from server.training.few_shot import frozen_copy, learn
from server.training.trainer import Progress, TrainConfig, train
from server.training.workbench import Workbench

ProgressFn = Callable[[str, Progress], None]


@dataclass
class TaskData:
    spec: TaskSpec
    train: list[Example]
    validation: list[Example]
    test: list[Example]


def load_task_data(name: str, data_dir: Path, *, seed: int = 0, max_test: int = 300, as_name: str | None = None) -> TaskData:
    """A catalog task's spec and its seeded train/validation/test rows (targets are labels)."""
    data = catalog.load(name, data_dir)
    spec = catalog.spec(data.task)
    parts = split(data.examples, seed=seed, max_test=max_test)

    def rows(part) -> list[Example]:
        return [Example(as_name or name, e.text, e.label) for e in part]

    return TaskData(spec, rows(parts.train), rows(parts.validation), rows(parts.test))


def multitask(
    engine: Engine,
    store: Store,
    method: str,
    names: Sequence[str],
    data: dict[str, TaskData],
    config: TrainConfig,
    *,
    eval_rows: int = 300,
    on_progress: ProgressFn | None = None,
    publish: bool = True,
    checkpoints: Path | None = None,
) -> dict[str, Any]:
    """Train `method` on the tasks jointly; publish the shared module (a new version, when it
    trained) and the tasks with their test metrics. Returns the per-task report. With
    `checkpoints` (a folder) every stage checkpoints there and a rerun of the same command resumes
    where the last one stopped (the plan is seeded, so it is rebuilt identically); the folder is
    removed once everything is published. The published tasks are then served by `engine` under
    their published names, as a process attached to the store would serve them."""
    plan = recipe_for(method).multitask(Workbench(engine), {n: data[n].spec for n in names}, config.seed)
    version = engine.tasks.versions[method]
    if plan.trains_shared:  # tasks are served with the version about to be published
        version = store.registry.current_modules().get(method, 0) + 1
        engine.tasks.set_module(method, version, plan.module)
        for task in plan.tasks:
            task.module_version = version
    started = time.monotonic()
    history: dict[str, Any] = {}
    for stage in plan.stages:
        for task in stage.tasks:
            engine.tasks.add(task)
        rows = {t.name: [dataclasses.replace(e, task=t.name) for e in data[stage.data_of(t.name)].train] for t in stage.tasks}
        validation = {t.name: [dataclasses.replace(e, task=t.name) for e in data[stage.data_of(t.name)].validation] for t in stage.tasks}
        progress = (lambda p, s=stage.name: on_progress(s, p)) if on_progress else None
        checkpoint = checkpoints / f"{method}-{stage.name}" if checkpoints else None
        result = train(engine, stage.tasks, rows, validation, stage.trainables, config, progress, checkpoint)
        history[stage.name] = {"best_step": result.best_step, "best_val_accuracy": result.best_score, "history": result.history}
        if stage.finish is not None:
            stage.finish()
        if stage.scratch:
            for task in stage.tasks:
                engine.tasks.remove(task.name)
    seconds = time.monotonic() - started
    report: dict[str, Any] = {"method": method, "tasks": {}, "train_seconds": round(seconds, 1), "stages": history, "config": dataclasses.asdict(config)}
    for task in plan.tasks:
        test = evaluate(engine, data[task.name].test[:eval_rows])
        report["tasks"][task.name] = {"test": test}
    if publish:
        if plan.trains_shared:
            published = store.publish_module(plan.module, engine.backbone.fingerprint, engine.form_fingerprint, {"tasks": list(names), "train_seconds": round(seconds, 1)})
            assert published == version, "another process published this method's module meanwhile"
        for task in plan.tasks:
            frozen = frozen_copy(task, served_name(task.name, method))
            frozen.version = store.registry.next_version(frozen.name)
            store.publish(frozen, engine.backbone.fingerprint, {"trained_with": method, **report["tasks"][task.name]})
            engine.tasks.add(frozen)  # served here too: a method trained next in this process may build on it (ATTEMPT's sources)
        report["module_version"] = version
        if checkpoints:
            for stage in plan.stages:
                shutil.rmtree(checkpoints / f"{method}-{stage.name}", ignore_errors=True)
    return report


def zero_shot(engine: Engine, data: dict[str, TaskData], eval_rows: int = 300) -> dict[str, dict[str, float]]:
    """The frozen backbone alone: rank classification with the task's description before its
    template (the seeds' zero-shot baseline; catalog specs carry it), through the engine (a plain task)."""
    out = {}
    for name, task_data in data.items():
        with engine.tasks.temporary(engine.tasks.new(f"zero-shot.{name}"[:64], PLAIN, task_data.spec)) as probe:
            out[name] = evaluate(engine, [dataclasses.replace(e, task=probe.name) for e in task_data.test[:eval_rows]])
    return out


def evaluate_served(engine: Engine, data: dict[str, TaskData], eval_rows: int = 300) -> dict[str, dict[str, dict[str, float]]]:
    """Test metrics of the served copies of the catalog tasks: task -> method -> metrics."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for name, d in data.items():
        for method in engine.tasks.versions:
            served = served_name(name, method)
            if served in engine.tasks:
                out.setdefault(name, {})[method] = evaluate(engine, [dataclasses.replace(e, task=served) for e in d.test[:eval_rows]])
    return out


def few_shot_transfer(
    engine: Engine,
    methods: Sequence[str],
    data: dict[str, TaskData],
    ks: Sequence[int],
    seeds: Sequence[int],
    config: TrainConfig,
    eval_rows: int = 300,
    on_result: Callable[[dict[str, Any]], None] | None = None,
    *,
    default_request: bool = True,
    folds: int = 2,
    done: set[tuple[str, str, int, int]] = frozenset(),
    on_progress: ProgressFn | None = None,
) -> list[dict[str, Any]]:
    """For each held-out task, method, k and seed: a new task from k label-balanced training rows,
    made exactly as a job makes it (`few_shot.learn`: the recipe's start, selection by
    cross-validation, the zero-shot guard) on top of whatever shared modules and tasks the engine
    holds, then scored on the test rows. `default_request`: the task is posed as a user's default
    request would pose it (description + labels, the default template and scoring) rather than
    with the catalog's template. Runs in `done` ((task, method, k, seed)) are skipped (resuming)."""
    results = []
    for name, task_data in data.items():
        pool = [LabeledText(e.text, e.target) for e in task_data.train]
        spec = TaskSpec.default(task_data.spec.description, task_data.spec.labels, seq2seq=engine.backbone.is_encoder_decoder) if default_request else task_data.spec
        for method in methods:
            for k in ks:
                for seed in seeds:
                    if (name, method, k, seed) in done:
                        continue
                    rows = [Example(name, e.text, e.label) for e in sample_few_shot(pool, k, seed)]
                    started = time.monotonic()
                    progress = (lambda phase, p, run=f"{name} {method} k={k} s={seed}": on_progress(f"{run} {phase}", p)) if on_progress else None
                    learned = learn(engine, f"fs-{method}-{k}-{seed}-{name}"[:60], method, spec, rows, {}, dataclasses.replace(config, seed=seed), folds=folds, on_progress=progress)
                    with engine.tasks.temporary(learned.task):
                        test = evaluate(engine, [dataclasses.replace(e, task=learned.task.name) for e in task_data.test[:eval_rows]])
                    record = {
                        "task": name, "method": method, "k": k, "seed": seed, "test": test, "seconds": round(time.monotonic() - started, 1),
                        "chosen": learned.chosen, "published_method": learned.task.method, "steps_trained": learned.steps,
                        "selection": learned.selection, "final_fit": learned.final_fit, "notes": learned.notes, "request": "default" if default_request else "catalog",
                    }
                    results.append(record)
                    if on_result:
                        on_result(record)
    return results


def summarize_few_shot(results: Sequence[dict[str, Any]]) -> dict[str, dict[str, dict[int, tuple[float, float]]]]:
    """task -> method -> k -> (mean, std) of test accuracy over seeds."""
    table: dict[str, dict[str, dict[int, list[float]]]] = {}
    for r in results:
        table.setdefault(r["task"], {}).setdefault(r["method"], {}).setdefault(r["k"], []).append(r["test"]["accuracy"])
    return {t: {m: {k: (statistics.fmean(v), statistics.pstdev(v)) for k, v in ks.items()} for m, ks in ms.items()} for t, ms in table.items()}
