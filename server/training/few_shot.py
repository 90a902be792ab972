"""Few-shot task creation: a new task from k examples with its method's recipe and the one trainer.

`learn` is what a job runs (and what `taskserve eval --few-shot` measures):
1. the recipe makes the task's *start* from the examples (a TEXT-initialised prompt, the best
   fitting TPV sources, the retrieved PHA prototypes, a copy of IP's nets);
2. **selection by cross-validation**: the examples are dealt into `folds` stratified folds; for each,
   a copy of the start trains on the other folds and is scored on the held-out one at step 0 and
   every `eval_every` steps. Summed over the folds every example is held out once, so each
   candidate number of steps gets an accuracy (ties: the gold label's cross-entropy, `misfit`)
   over all k examples — far steadier than one carved validation set of k/4 rows;
3. **the zero-shot guard**: the same held-out rows score the untrained start (step 0) and the tasks
   other methods make from the description alone (the plain backbone, IP with a form module);
4. the best candidate is published: a final fit on all examples, or — when training does not beat
   them — the start, or the best description-only task (the job's notes say which and why). The
   final fit trains at least the *passes over each example* the folds made at the chosen step — a
   fold trains on k·(n−1)/n examples, so its step N is N·n/(n−1) steps on all k (twice N with two
   folds), within the schedule's length — and then on, evaluation point by evaluation point, until
   it classifies every example it trained on (or the schedule ends). Replaying N steps on twice the
   rows left fits undertrained, and a fit stopped at the matched passes alone still classified only
   26–30 of its 32 examples on nyt-sentiment seed 2 (test 0.670–0.900; docs/results.md);
5. **the final fit is checked too**: it is scored on the examples it trained on, an estimate in its
   favour, against the untrained candidates' scores on the same examples (they never trained on
   any). If it still loses — a refit that landed in a trough of an oscillating run, which the
   folds never saw — the best untrained candidate is published instead, and the notes say so.
   With too few examples to hold any out (fewer than two per fold, or a training part without
   some label), every step trains on all of them and this check is the only guard.
The task trains under a scratch name no client can ask for and is never visible until the caller
publishes it; nothing shared is written, so no other task changes.

`few_shot` is the building block without selection: train on given rows, keep the best step on
given validation rows.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from server.data.readers import LabeledText
from server.data.spec import TaskSpec
from server.data.splits import folds as deal_folds
from server.engine import Engine
from server.errors import TaskservError
from server.methods import method_ids, recipe_for
from server.task import Example, Task
from server.training.evaluate import evaluate
from server.training.trainer import Progress, TrainConfig, TrainResult, train
from server.training.workbench import Workbench

START = "start"


def few_shot(
    engine: Engine,
    name: str,
    method: str,
    spec: TaskSpec,
    train_rows: Sequence[Example],
    validation_rows: Sequence[Example],
    init: dict[str, Any],
    config: TrainConfig,
    on_progress: Callable[[Progress], None] | None = None,
    checkpoint: Path | None = None,
    should_stop: Callable[[], bool] | None = None,
    *,
    eval_at_start: bool = False,
) -> tuple[Task, TrainResult, dict[str, Any]]:
    """Create one new task and train it on `train_rows`, keeping the best step on
    `validation_rows` (the untrained start among them with `eval_at_start`); returns it (host
    tensors, public name), the result and the recipe's notes."""
    scratch = _scratch(name)
    rows = [Example(scratch, e.text, e.target) for e in train_rows]
    recipe = recipe_for(method)
    task, notes = recipe.few_shot(Workbench(engine), scratch, spec, rows, init, config.seed)
    validation = {scratch: [Example(scratch, e.text, e.target) for e in validation_rows]} if validation_rows else {}
    with engine.tasks.temporary(task):
        result = train(engine, [task], {scratch: rows}, validation, recipe.trainables(task), config, on_progress, checkpoint, should_stop, eval_at_start=eval_at_start)
    result.validation = {name: metrics for metrics in result.validation.values()}
    return frozen_copy(task, name), result, notes


@dataclass
class Learned:
    """What `learn` publishes, and what its selection saw."""

    task: Task
    """The task to publish (host tensors, public name); its method is the request's, or that of
    the description-only task the guard preferred."""
    chosen: str
    """`step N` (trained for N steps), `start` (the untrained start) or `<method> zero-shot`."""
    steps: int
    """Steps the published task trained (0 unless a trained step was chosen): at least the chosen
    fold step scaled to the same passes over all the examples (`final_fit_steps`), then until the
    fit classified every example (or the schedule ended)."""
    selection: dict[str, dict[str, float]]
    """Every candidate's held-out accuracy, misfit (`nll`) and row count, in the order weighed."""
    notes: dict[str, Any] = field(default_factory=dict)
    folds: int = 0
    """Folds of the cross-validation (0: none — too few examples to hold any out, then only the
    final-fit check weighs the training against the untrained candidates, or none asked for)."""
    final_fit: dict[str, float] = field(default_factory=dict)
    """The final fit's accuracy, misfit and row count on the examples it trained on (the first
    `eval_rows` of them, as every validation in the trainer; with `soup`, the soup's on all of
    them; empty when no trained step was chosen)."""

    @property
    def validation(self) -> dict[str, float]:
        return self.selection.get(self.chosen, {})


def learn(
    engine: Engine,
    name: str,
    method: str,
    spec: TaskSpec,
    examples: Sequence[Example],
    init: dict[str, Any],
    config: TrainConfig,
    *,
    folds: int = 2,
    guard: bool = True,
    soup: bool = False,
    on_progress: Callable[[str, Progress], None] | None = None,
    checkpoints: Path | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> Learned:
    """A new task from `examples` with selection by cross-validation and the zero-shot guard (see
    the module docstring). `on_progress(phase, progress)` sees every step, `progress.step` counting
    across phases; `checkpoints` (a folder) makes a restarted run resume phase by phase. `soup`
    publishes the uniform average of the final fit's trained values and the folds' (each at its
    best held-out step) — a model soup (Wortsman et al., 2022) of fits from one start (an
    experiment, off by default: docs/results.md)."""
    scratch = _scratch(name)
    rows = [Example(scratch, e.text, e.target) for e in examples]
    recipe = recipe_for(method)
    start, notes = recipe.few_shot(Workbench(engine), scratch, spec, rows, init, config.seed)
    parts = _folds(rows, folds, config.seed)
    total = config.steps * (len(parts) + 1)
    done_before = 0

    def run(phase: str, task: Task, train_part: list[Example], held: list[Example], **kwargs: Any) -> TrainResult:
        nonlocal done_before
        offset = done_before

        def progress(p: Progress) -> None:
            if on_progress is not None:
                on_progress(phase, dataclasses.replace(p, step=offset + p.step, total=total))

        checkpoint = checkpoints / phase.replace(" ", "-") if checkpoints else None
        with engine.tasks.temporary(task):
            result = train(engine, [task], {scratch: train_part}, {scratch: held} if held else {}, recipe.trainables(task), config, progress, checkpoint, should_stop, **kwargs)
        done_before += result.steps
        return result

    if not parts:  # too few examples to hold any out: all the steps on all of them, no step to weigh
        task = start.on(engine.backbone.device)
        result = run("train", task, rows, [])
        trained = f"step {result.steps}"
        if not guard or folds < 2:  # folds=0: the caller asked for no selection at all
            return Learned(frozen_copy(task, name), trained, result.steps, {}, notes)
        # the final-fit check is the one guard left: the untrained candidates never trained on any example
        selection = {START: _scores(engine, start, rows), **_zero_shot_candidates(engine, method, spec, rows)}
        return _checked(engine, name, start, task, _scores(engine, task, rows), trained, result.steps, selection, notes, 0)

    curves, fold_values = [], []
    for i, held in enumerate(parts):
        train_part = [e for j, part in enumerate(parts) if j != i for e in part]
        fold = start.on(engine.backbone.device)
        curves.append(run(f"fold {i + 1}", fold, train_part, held, eval_at_start=True).history)
        if soup:  # the fold's values at its best held-out step (the trainer keeps them)
            fold_values.append([t.param.detach().clone() for t in recipe.trainables(fold)])
    selection = _pool(curves)
    if guard:
        selection.update(_zero_shot_candidates(engine, method, spec, rows))
    else:
        selection = {k: v for k, v in selection.items() if k != START}
    chosen = max(selection, key=lambda c: (selection[c]["accuracy"], -selection[c]["nll"]))  # the first of equals: less training
    fold_steps = int(chosen.removeprefix("step ")) if chosen.startswith("step ") else 0
    fold_rows = statistics.fmean(len(rows) - len(held) for held in parts)
    least = final_fit_steps(fold_steps, fold_rows, len(rows), config.steps)
    total = done_before + (config.steps if least else 0)  # now known, at most: the final fit may stop sooner
    if on_progress is not None:
        on_progress("selected", Progress(done_before, total, math.nan, {"chosen": chosen, **selection[chosen]}))
    if not least:
        return _untrained(engine, name, start, chosen, selection, notes, len(parts))
    task = start.on(engine.backbone.device)
    fitted = run("final", task, rows, rows, stop_when=lambda done, own: done >= least and own["val_accuracy"] >= 1.0)
    final_fit = _as_scores(fitted.validation[scratch])  # the trainer scored the fit on its own examples as it ended
    notes["final_fit"] = (f"{fitted.steps} steps on all {len(rows)} examples: at least {least} (the passes over each example the folds made in "
                          f"{fold_steps} steps on {fold_rows:g}, within the schedule's {config.steps}), then on until it fit every example"
                          + ("" if final_fit["accuracy"] >= 1.0 else " — it had not by the schedule's end"))
    if soup:
        for i, trainable in enumerate(recipe.trainables(task)):
            trainable.param.data.copy_(torch.stack([trainable.param.detach(), *(values[i] for values in fold_values)]).mean(0))
        final_fit = _scores(engine, task, rows)  # the soup's fit of the examples, what the check weighs
        notes["soup"] = f"published the average of the final fit and the {len(fold_values)} folds' fits (each at its best held-out step)"
    return _checked(engine, name, start, task, final_fit, chosen, fitted.steps, selection, notes, len(parts), guard)


def final_fit_steps(fold_steps: int, fold_rows: float, rows: int, schedule: int) -> int:
    """The final fit's least steps on all `rows` examples for a candidate the folds reached in `fold_steps`
    steps on `fold_rows` each: the same passes over each example (same batch size), so
    `fold_steps · rows / fold_rows`, at most the `schedule`'s length — where its learning rate is 0."""
    return min(schedule, round(fold_steps * rows / fold_rows))


def _checked(engine: Engine, name: str, start: Task, fit: Task, final_fit: dict[str, float], chosen: str, steps: int,
             selection: dict[str, dict[str, float]], notes: dict[str, Any], folds: int, guard: bool = True) -> Learned:
    """The final fit `fit` (`steps` on all the examples, for the candidate `chosen`; `final_fit`: its
    scores on them) published, unless it fits the examples it trained on worse than an untrained
    candidate fits them (step 5 of the module docstring): that candidate is published then, and the
    notes say why."""
    fallback = _untrained_beating(selection, final_fit) if guard else None
    if fallback is None:
        return Learned(frozen_copy(fit, name), chosen, steps, selection, notes, folds, final_fit)
    notes["guard"] = (f"the final fit ({steps} steps on all {final_fit['rows']} examples) scores {final_fit['accuracy']:.3f} on the examples it trained on, "
                      f"below the {fallback}'s {selection[fallback]['accuracy']:.3f} on the same examples: the {fallback} is published")
    return dataclasses.replace(_untrained(engine, name, start, fallback, selection, notes, folds), final_fit=final_fit)


def _untrained(engine: Engine, name: str, start: Task, chosen: str, selection: dict[str, dict[str, float]], notes: dict[str, Any], folds: int) -> Learned:
    """An untrained candidate published: the start, or `<method> zero-shot` (a task of that method
    made from the description alone)."""
    if chosen == START:
        published = frozen_copy(start, name)
        notes.setdefault("guard", "training did not beat the untrained start on the held-out examples: the start is published")
    else:
        zero_method = chosen.removesuffix(" zero-shot")
        published = frozen_copy(engine.tasks.new(name, zero_method, start.spec), name)
        notes.setdefault("guard", f"training did not beat the {zero_method} task made from the description alone on the held-out examples: that task is published")
    return Learned(published, chosen, 0, selection, notes, folds)


def _scratch(name: str) -> str:
    return f"{name[:52]}.training"  # never a name a client can ask for while it trains


def _folds(rows: list[Example], n: int, seed: int) -> list[list[Example]]:
    """Stratified folds of the examples, or [] when some training part would lack a label."""
    labelled = [LabeledText(e.text, e.target) for e in rows]
    if n < 2 or len(labelled) < 2 * n:
        return []
    parts = deal_folds(labelled, n, seed)
    labels = {e.label for e in labelled}
    for i in range(n):
        if {e.label for j, part in enumerate(parts) if j != i for e in part} != labels:
            return []
    task = rows[0].task
    return [[Example(task, e.text, e.label) for e in part] for part in parts]


def _pool(curves: list[list[dict[str, Any]]]) -> dict[str, dict[str, float]]:
    """Per evaluated step, accuracy and misfit over all held-out rows of all folds (row-weighted)."""
    steps = sorted({h["step"] for h in curves[0]}.intersection(*({h["step"] for h in c} for c in curves[1:])))
    pooled = {}
    for step in steps:
        points = [next(h for h in curve if h["step"] == step) for curve in curves]
        n = sum(p["val_rows"] for p in points)
        pooled[START if step == 0 else f"step {step}"] = {
            "accuracy": sum(p["val_accuracy"] * p["val_rows"] for p in points) / n,
            "nll": sum(p["val_loss"] * p["val_rows"] for p in points) / n,
            "rows": n,
        }
    return pooled


def _zero_shot_candidates(engine: Engine, method: str, spec: TaskSpec, rows: list[Example]) -> dict[str, dict[str, float]]:
    """The tasks other methods make from the description alone (`ready_without_training`), scored
    on every example (each is held out for them: they never trained)."""
    out = {}
    for other in method_ids():
        if other == method or not engine.tasks.method(other).ready_without_training(spec, {}):
            continue
        try:
            probe = engine.tasks.new(f"{rows[0].task[:40]}.{other}-zs"[:64], other, spec)
        except TaskservError:  # e.g. no form module for IP on this backbone
            continue
        out[f"{other} zero-shot"] = _scores(engine, probe, rows)
    return out


def _scores(engine: Engine, task: Task, rows: list[Example]) -> dict[str, float]:
    """`task`'s accuracy, misfit (`nll`) and row count on labelled rows (it need not be served)."""
    with engine.tasks.temporary(task):
        return _as_scores(evaluate(engine, [Example(task.name, e.text, e.target) for e in rows]))


def _as_scores(metrics: dict[str, float]) -> dict[str, float]:
    """`evaluate`'s metrics as a candidate's scores: accuracy, misfit (`nll`), row count."""
    return {"accuracy": metrics["accuracy"], "nll": metrics["nll"], "rows": metrics["n"]}


def _untrained_beating(selection: dict[str, dict[str, float]], final_fit: dict[str, float]) -> str | None:
    """The best untrained candidate (the start, a description-only task) when it fits the examples
    better than the final fit fits the examples it trained on — by the selection's order: accuracy,
    then the lower misfit; a tie keeps the final fit. None when the final fit holds."""
    untrained = {c: v for c, v in selection.items() if not c.startswith("step ")}
    if not untrained:
        return None
    best = max(untrained, key=lambda c: (untrained[c]["accuracy"], -untrained[c]["nll"]))
    return best if (untrained[best]["accuracy"], -untrained[best]["nll"]) > (final_fit["accuracy"], -final_fit["nll"]) else None


def frozen_copy(task: Task, name: str) -> Task:
    """A trained task as it is published: host tensors, no gradients, under its public name."""
    params = nn.ParameterDict({k: nn.Parameter(p.detach().cpu().clone(), requires_grad=False) for k, p in task.params.items()})
    return dataclasses.replace(task, name=name, params=params)
