"""The named operations a method's recipe may use on the engine it trains on (the `Workbench`
protocol of `server/methods/recipe.py`): recipes never reach into the engine."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from server.data.spec import TaskSpec
from server.engine import Engine
from server.methods import Method
from server.task import Example, Request, Task
from server.training.evaluate import misfit


class Workbench:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.device: torch.device = engine.backbone.device
        self.embedding: Tensor = engine.backbone.embedding.weight

    def new_task(self, name: str, method: str, spec: TaskSpec, *, init: dict[str, Any] | None = None, seed: int = 0) -> Task:
        return self.engine.tasks.new(name, method, spec, init=init, seed=seed).on(self.device)

    def module(self, method: str) -> Method:
        return self.engine.tasks.method(method)

    def served(self, method: str) -> list[Task]:
        current = self.engine.tasks.versions[method]
        return [t for t in self.engine.tasks.values() if t.method == method and t.module_version == current]

    def task(self, name: str) -> Task | None:
        return self.engine.tasks.get(name)

    def misfit(self, task: Task, examples: Sequence[Example]) -> float:
        with self.engine.tasks.temporary(task):
            return misfit(self.engine, [Example(task.name, e.text, e.target) for e in examples])

    def features(self, task: Task, texts: Sequence[str]) -> Tensor:
        if task.name in self.engine.tasks:
            return self.engine.features([Request(task.name, text) for text in texts])
        with self.engine.tasks.temporary(task):
            return self.engine.features([Request(task.name, text) for text in texts])
