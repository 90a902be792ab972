"""How TPV trains (seed 001): task vectors τ = θ_tuned − θ_init, all from one θ_init per origin.

- few-shot: τ starts from a weighted sum of existing task vectors (eq 7) — the ones in
  `init.vectors`, or the `top_k` served tpv tasks of the same origin whose prompts classify the
  examples better than the best start without them (lower misfit: the gold label's cross-entropy
  among the labels), weighted by softmax(−misfit); when none does, from the better of θ_init alone
  (τ = 0) and, for a described task, its description's embeddings — then it is prompt-tuned. The
  job's notes name the starts, the sources and their misfits.
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
            rows = list(examples[: self.probe_rows])
            starts = {"theta_init": {"origin": origin, "start": "theta_init"}}
            if spec.description and module.config.text_init:
                starts["text"] = {"origin": origin, "start": "text"}
            probe = "tpv-probe.tmp"
            base = {s: bench.misfit(bench.new_task(probe, self.method_id, spec, init=i), rows) for s, i in starts.items()}
            best_start = min(base, key=base.__getitem__)
            candidates = [t for t in bench.served(self.method_id) if t.meta["origin"] == origin]
            fits = sorted(((t.name, bench.misfit(dataclasses.replace(t, name=probe, spec=spec), rows)) for t in candidates), key=lambda item: item[1])
            # only sources that fit the examples better than the best start of their own transfer anything
            chosen = [(n, m) for n, m in fits if m < base[best_start]][: self.top_k]
            notes["starts"] = {s: {"misfit": round(m, 4)} for s, m in base.items()}
            if chosen:
                # weights softmax(−misfit): a source that fits the examples worse contributes less
                weights = torch.softmax(-torch.tensor([m for _, m in chosen]), dim=0).tolist()
                init = {**init, "vectors": [(module.vector(bench.task(n)), w) for (n, _), w in zip(chosen, weights)]}
                notes["init_from"] = {n: {"misfit": round(m, 4), "weight": round(w, 4)} for (n, m), w in zip(chosen, weights)}
            else:
                init = {**init, **starts[best_start]}
                notes["init_from"] = {best_start: {"misfit": round(base[best_start], 4)}}
        return bench.new_task(name, self.method_id, spec, init=init, seed=seed), notes
