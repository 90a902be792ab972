"""How ATTEMPT trains (seed 002 §3.3).

- multi-task: the source prompts come first, one per mix task — the mix's prompt-tuned tasks when
  the engine serves them (`<task>-prompt_tuning` from a prompt-tuning multi-task run, ATTEMPT's own
  recipe), else trained here by prompt tuning in a `sources` stage of scratch tasks; then the
  attention module G and the mix tasks' target prompts train over the frozen sources. The new
  module (with as many sources as mix tasks) is published as a new version.
- few-shot: a new target prompt over the frozen sources and attention module (eq 4); only the
  target trains.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from server.data.spec import TaskSpec
from server.methods.recipe import MultiTaskPlan, Recipe, Stage, Workbench, served_name, shared_trainables
from server.task import Task

SOURCE_METHOD = "prompt_tuning"


class AttemptRecipe(Recipe):
    per_task_kind = "prompt"

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
