"""How PHA trains (seed 003).

- multi-task: retriever G, prototypes k_i, hypernetwork H, layer embeddings and the task-shared
  encoder adapters jointly, with eq 9's losses (the engine adds them through `extra_loss`); the
  trained module is published as a new version.
- few-shot: eq 10 scores the served prototypes against the examples (mean cosine similarity of
  their retrieval vectors, the examples rendered as the new task renders them — description
  included); the new prototype starts as the similarity-weighted mix of the `top_k` best,
  softmax(similarity / temperature), so one wrong nearest prototype no longer decides alone. The
  prototype trains together with per-task gains and shifts on the generated adapters' outputs
  (`refine`), which let a task leave its prototype's adapters where the prototype alone cannot
  fit; the hypernetwork and shared adapters stay frozen. The job's notes list the retrieval.
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
    top_k = 3
    """Prototypes mixed into a new task's start."""

    def few_shot(self, bench: Workbench, name: str, spec: TaskSpec, examples: Sequence[Example], init: dict[str, Any], seed: int) -> tuple[Task, dict[str, Any]]:
        notes: dict[str, Any] = {"trains": "the prototype and per-task gains/shifts of the generated adapters; hypernetwork and shared adapters frozen"}
        init = {"refine": True, **init}
        peers = bench.served(self.method_id)
        if "prototype" not in init and peers:
            module = bench.module(self.method_id)
            probe = dataclasses.replace(peers[0], name=f"{name[:40]}.retrieval", spec=spec)  # the new task's rendering, any pha task's modulation
            features = bench.features(probe, [e.text for e in examples[: self.retrieval_rows]])  # [n, d]
            prototypes = torch.stack([t.params["prototype"].detach() for t in peers]).to(features.device)  # [p, d']
            sims = module.similarities(features, prototypes).detach()  # [p]; retrieval picks a start, no gradient
            top = sims.topk(min(self.top_k, len(peers)))
            weights = torch.softmax(top.values / module.config.temperature, dim=0)  # [k]
            init = {**init, "prototype": (weights.unsqueeze(1) * prototypes[top.indices]).sum(0).float().cpu()}
            notes["retrieval"] = [{"task": peers[i].name, "similarity": round(float(v), 4), "weight": round(float(w), 4)} for i, v, w in zip(top.indices.tolist(), top.values, weights)]
        return bench.new_task(name, self.method_id, spec, init=init, seed=seed), notes

    def multitask(self, bench: Workbench, specs: Mapping[str, TaskSpec], seed: int) -> MultiTaskPlan:
        module = bench.module(self.method_id)
        tasks = [bench.new_task(n, self.method_id, s, seed=seed + i) for i, (n, s) in enumerate(specs.items())]
        # prototypes train with the networks' learning rate here (jointly, as in the paper)
        trainables = shared_trainables(module, self.method_id) + [dataclasses.replace(t, kind="net") for task in tasks for t in self.trainables(task)]
        return MultiTaskPlan(module, tasks, [Stage("joint", tasks, trainables)], trains_shared=True)
