"""How PHA trains (seed 003).

- multi-task: retriever G, prototypes k_i, hypernetwork H, layer embeddings and the task-shared
  encoder adapters jointly, with eq 9's losses (the engine adds them through `extra_loss`); the
  trained module is published as a new version.
- few-shot: eq 10 retrieves the served prototype nearest to the examples (mean cosine similarity
  of their retrieval vectors) to initialise the new prototype; only the prototype trains, so the
  generated adapters follow it while the hypernetwork and shared adapters stay frozen. The job's
  notes name the retrieved task.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from server.data.spec import TaskSpec
from server.methods.recipe import MultiTaskPlan, Recipe, Stage, Workbench, shared_trainables
from server.task import Example, Task


class PHARecipe(Recipe):
    per_task_kind = "prototype"
    retrieval_rows = 32
    """Examples whose retrieval vectors choose the starting prototype."""

    def few_shot(self, bench: Workbench, name: str, spec: TaskSpec, examples: Sequence[Example], init: dict[str, Any], seed: int) -> tuple[Task, dict[str, Any]]:
        notes: dict[str, Any] = {"trains": "the prototype only; hypernetwork and shared adapters frozen"}
        peers = bench.served(self.method_id)
        if "prototype" not in init and peers:
            module = bench.module(self.method_id)
            features = bench.features(peers[0], [e.text for e in examples[: self.retrieval_rows]])  # [n, d]
            prototypes = torch.stack([t.params["prototype"].detach() for t in peers]).to(features.device)  # [p, d']
            nearest = peers[module.retrieve(features, prototypes)]
            init = {**init, "prototype": nearest.params["prototype"].detach().float().cpu().clone()}
            notes["init_from"] = nearest.name
        return bench.new_task(name, self.method_id, spec, init=init, seed=seed), notes

    def multitask(self, bench: Workbench, specs: Mapping[str, TaskSpec], seed: int) -> MultiTaskPlan:
        module = bench.module(self.method_id)
        tasks = [bench.new_task(n, self.method_id, s, seed=seed + i) for i, (n, s) in enumerate(specs.items())]
        # prototypes train with the networks' learning rate here (jointly, as in the paper)
        trainables = shared_trainables(module, self.method_id) + [dataclasses.replace(t, kind="net") for task in tasks for t in self.trainables(task)]
        return MultiTaskPlan(module, tasks, [Stage("joint", tasks, trainables)], trains_shared=True)
