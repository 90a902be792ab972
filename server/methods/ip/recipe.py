"""How IP trains (seed 000).

- multi-task: the shared nets (T, w, L_m, C) on the mix, every task described only by its
  description — no per-task parameters; the trained nets are published as a new module version.
- few-shot: a per-task copy of the nets initialised from the shared ones (`copy_nets`), fine-tuned
  on the examples; the shared nets are never written. Without examples an IP task is ready at once
  from its description (zero-shot transfer, §4.5.2).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from server.data.spec import TaskSpec
from server.methods.recipe import MultiTaskPlan, Recipe, Stage, Workbench, shared_trainables
from server.task import Example, Task


class IPRecipe(Recipe):
    per_task_kind = "net"

    def few_shot(self, bench: Workbench, name: str, spec: TaskSpec, examples: Sequence[Example], init: dict[str, Any], seed: int) -> tuple[Task, dict[str, Any]]:
        task = bench.new_task(name, self.method_id, spec, init={**init, "copy_nets": True}, seed=seed)
        return task, {"init": "a copy of the shared IP nets"}

    def multitask(self, bench: Workbench, specs: Mapping[str, TaskSpec], seed: int) -> MultiTaskPlan:
        module = bench.module(self.method_id)
        tasks = [bench.new_task(n, self.method_id, s) for n, s in specs.items()]
        return MultiTaskPlan(module, tasks, [Stage("nets", tasks, shared_trainables(module, self.method_id))], trains_shared=True)
