"""How ATTEMPT trains (seed 002 §3.3).

- multi-task: the source prompts come first, one per mix task — the mix's prompt-tuned tasks when
  the engine serves them (`<task>-prompt_tuning` from a prompt-tuning multi-task run, ATTEMPT's own
  recipe), else trained here by prompt tuning in a `sources` stage of scratch tasks; then the
  attention module G and the mix tasks' target prompts train over the frozen sources. The new
  module (with as many sources as mix tasks) is published as a new version.
- few-shot: a new target prompt and the task's own copy of the attention module G, started from
  the shared one, train over the frozen sources: "P_target as well as the attention module G are
  updated" (§3.2.2; the "no prior transfer" ablation of §4.3 is G trained from scratch instead).
  The shared G and the tasks trained with it never change.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from server.data.spec import TaskSpec
from server.methods.attempt.module import ATTENTION
from server.methods.recipe import MultiTaskPlan, Recipe, Stage, Trainable, Workbench, served_name, shared_trainables
from server.task import Example, Task

SOURCE_METHOD = "prompt_tuning"


class AttemptRecipe(Recipe):
    per_task_kind = "prompt"

    def few_shot(self, bench: Workbench, name: str, spec: TaskSpec, examples: Sequence[Example], init: dict[str, Any], seed: int) -> tuple[Task, dict[str, Any]]:
        task = bench.new_task(name, self.method_id, spec, init={"own_attention": True, **init}, seed=seed)
        trains = "the target prompt and the task's own copy of the attention module G" if ATTENTION[0] in task.params else "the target prompt"
        return task, {"trains": f"{trains}; the source prompts frozen"}

    def trainables(self, task: Task) -> list[Trainable]:
        """The target prompt at the prompts' learning rate; a task's own G at the networks' (as G trains in the multi-task stage)."""
        return [Trainable(f"{task.name}.{k}", p, "net" if k in ATTENTION else "prompt") for k, p in task.params.items()]

    def multitask(self, bench: Workbench, specs: Mapping[str, TaskSpec], seed: int) -> MultiTaskPlan:
        old = bench.module(self.method_id)
        module = type(old)(old.dims, config=dataclasses.replace(old.config, n_sources=len(specs)), embedding=bench.embedding)
        module.to(bench.device)
        targets = [bench.new_task(n, self.method_id, s, seed=seed + 100 + i) for i, (n, s) in enumerate(specs.items())]
        attention = Stage("attention", targets, shared_trainables(module, self.method_id, skip=("sources",)) + [t for task in targets for t in self.trainables(task)])
        tuned = [bench.task(served_name(n, SOURCE_METHOD)) for n in specs]
        if all(t is not None and t.params["prompt"].shape[0] == old.config.n_virtual for t in tuned):
            install_sources(module, tuned)
            return MultiTaskPlan(module, targets, [attention], trains_shared=True)
        sources = [bench.new_task(f"{n}.source", SOURCE_METHOD, s, seed=seed + i) for i, (n, s) in enumerate(specs.items())]
        for task in sources:  # the sources have ATTEMPT's prompt length
            task.params["prompt"] = nn.Parameter(task.params["prompt"][: old.config.n_virtual].detach().clone())
        stage = Stage(
            "sources", sources, [t for task in sources for t in self.trainables(task)],
            data={task.name: name for task, name in zip(sources, specs)}, scratch=True,
            finish=lambda: install_sources(module, sources),
        )
        return MultiTaskPlan(module, targets, [stage, attention], trains_shared=True)


def install_sources(module: nn.Module, sources: Sequence[Task]) -> None:
    """The trained prompts become the module's frozen source prompts P_1..P_t."""
    with torch.no_grad():
        module.sources.copy_(torch.stack([t.params["prompt"].detach().to(module.sources.device) for t in sources]))
