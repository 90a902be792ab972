"""Few-shot task creation: a new task from k examples with its method's recipe and the one
trainer. The task trains under a scratch name no client can ask for and is never visible until
the caller publishes it; nothing shared is written, so no other task changes."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from server.data.spec import TaskSpec
from server.engine import Engine
from server.methods import recipe_for
from server.task import Example, Task
from server.training.trainer import Progress, TrainConfig, TrainResult, train
from server.training.workbench import Workbench


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
) -> tuple[Task, TrainResult, dict[str, Any]]:
    """Create and train one new task; returns it (host tensors, public name), the training result
    and the recipe's notes. The engine serves it only while it trains."""
    scratch = f"{name[:52]}.training"  # never a name a client can ask for while it trains
    rows = [Example(scratch, e.text, e.target) for e in train_rows]
    recipe = recipe_for(method)
    task, notes = recipe.few_shot(Workbench(engine), scratch, spec, rows, init, config.seed)
    validation = {scratch: [Example(scratch, e.text, e.target) for e in validation_rows]} if validation_rows else {}
    with engine.tasks.temporary(task):
        result = train(engine, [task], {scratch: rows}, validation, recipe.trainables(task), config, on_progress, checkpoint, should_stop)
    result.validation = {name: metrics for metrics in result.validation.values()}
    return frozen_copy(task, name), result, notes


def frozen_copy(task: Task, name: str) -> Task:
    """A trained task as it is published: host tensors, no gradients, under its public name."""
    params = nn.ParameterDict({k: nn.Parameter(p.detach().cpu().clone(), requires_grad=False) for k, p in task.params.items()})
    return dataclasses.replace(task, name=name, params=params)
