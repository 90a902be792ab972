"""How TPV trains (seed 001): task vectors τ = θ_tuned − θ_init, all from one θ_init per origin.

- few-shot: τ starts from a weighted sum of existing task vectors (eq 7) — the ones in
  `init.vectors`, or the `top_k` served tpv tasks of the same origin whose prompts classify the
  examples better than θ_init alone (lower misfit: the gold label's cross-entropy among the
  labels), weighted by softmax(−misfit); τ = 0 when none does — then it is prompt-tuned. The job's
  notes name the sources and their misfits.
- multi-task: one τ per mix task from θ_init, trained jointly (the base recipe); θ_init is frozen.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch

from server.data.spec import TaskSpec
from server.methods.recipe import Recipe, Workbench
from server.task import Example, Task


class TPVRecipe(Recipe):
    per_task_kind = "prompt"
    top_k = 2
    """How many existing task vectors a few-shot task may start from."""
    probe_rows = 16
    """Examples a candidate source is scored on."""

    def few_shot(self, bench: Workbench, name: str, spec: TaskSpec, examples: Sequence[Example], init: dict[str, Any], seed: int) -> tuple[Task, dict[str, Any]]:
        notes: dict[str, Any] = {}
        if not init.get("vectors"):
            module = bench.module(self.method_id)
            origin = init.get("origin", module.config.default_origin)
            fits, baseline = self._rank_by_fit(bench, spec, examples, origin)
            # only sources that fit the examples better than θ_init alone transfer anything
            chosen = [(n, m) for n, m in fits if m < baseline][: self.top_k]
            notes["init_from"] = {"theta_init": {"misfit": round(baseline, 4)}}
            if chosen:
                # weights softmax(−misfit): a source that fits the examples worse contributes less
                weights = torch.softmax(-torch.tensor([m for _, m in chosen]), dim=0).tolist()
                init = {**init, "vectors": [(module.vector(bench.task(n)), w) for (n, _), w in zip(chosen, weights)]}
                notes["init_from"] = {n: {"misfit": round(m, 4), "weight": round(w, 4)} for (n, m), w in zip(chosen, weights)}
        return bench.new_task(name, self.method_id, spec, init=init, seed=seed), notes

    @torch.no_grad()
    def _rank_by_fit(self, bench: Workbench, spec: TaskSpec, examples: Sequence[Example], origin: str) -> tuple[list[tuple[str, float]], float]:
        """Served tpv tasks of `origin` (current module), best first, by their prompt's misfit on
        the new examples under the new task's spec; plus the misfit of θ_init alone (τ = 0)."""
        rows = list(examples[: self.probe_rows])
        candidates = [t for t in bench.served(self.method_id) if t.meta["origin"] == origin]
        null = bench.new_task("tpv-probe.tmp", self.method_id, spec, init={"origin": origin})
        scored = [(t.name, bench.misfit(dataclasses.replace(t, name=null.name, spec=spec), rows)) for t in candidates]
        return sorted(scored, key=lambda item: item[1]), bench.misfit(null, rows)
