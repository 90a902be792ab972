"""Per-method recipes: what a new task starts from and what trains, for multi-task training of the
shared modules and for few-shot task creation. The trainer is the same for all of them.

Few-shot (a new task from k examples; existing tasks' outputs never change, because nothing
shared is written — new shared state is always a new task's own copy):
- `prompt_tuning`: a soft prompt from the default (vocabulary-sampled) initialisation.
- `tpv`: τ initialised from a weighted sum of existing task vectors (seed 001 eq 7) — the ones in
  `init.vectors`, or the `top_k` existing tpv tasks whose prompts classify the examples better
  than θ_init alone (label cross-entropy), weighted by softmax(−misfit); τ = 0 when none does —
  then prompt-tuned; the artifact stores τ = θ_tuned − θ_init.
- `attempt`: a new target prompt over the frozen source prompts and attention module (eq 4).
- `ip`: a per-task copy of the IP nets initialised from the shared ones (`copy_nets`), fine-tuned.
- `pha`: the prototype nearest to the examples (eq 10, mean cosine similarity of their retrieval
  vectors) initialises the new prototype; only the prototype trains, the hypernetwork and shared
  adapters stay frozen — the generated adapters follow the prototype.

Multi-task (the seeds' first stage, on a mix of tasks):
- `prompt_tuning` / `tpv`: per-task prompts / task vectors from one θ_init (no shared module);
- `attempt`: source prompts first (one prompt per mix task), then the attention module with the
  mix tasks' target prompts over those frozen sources (ATTEMPT §3.3);
- `ip`: the shared nets, tasks described only by their descriptions;
- `pha`: retriever, prototypes, hypernetwork and shared adapters jointly, with eq 9's losses.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from server.data.spec import TaskSpec
from server.engine import Engine, Example, Request
from server.errors import InvalidRequest
from server.methods import Method
from server.task import Task
from server.training.evaluate import misfit
from server.training.trainer import Progress, TrainConfig, Trainable, TrainResult, train


@dataclass
class Stage:
    """One training run: the tasks it touches and what trains."""

    name: str
    tasks: list[Task]
    trainables: list[Trainable]


@dataclass
class MultiTaskPlan:
    """What multi-task training produces: the (possibly new) shared module and the tasks."""

    module: Method
    tasks: list[Task]
    stages: list[Stage] = field(default_factory=list)
    trains_shared: bool = False
    """True when the shared module trains (it is then published as a new version)."""


class Recipe:
    method_id: ClassVar[str]
    per_task_kind: ClassVar[str] = "prompt"

    def few_shot(self, engine: Engine, name: str, spec: TaskSpec, examples: Sequence[Example], init: dict[str, Any], seed: int) -> tuple[Task, dict[str, Any]]:
        """A new task (not yet added) whose per-task params a few-shot run trains; plus notes for the job."""
        return engine.new_task(name, self.method_id, spec, init=init, seed=seed), {}

    def multitask(self, engine: Engine, specs: Mapping[str, TaskSpec], seed: int) -> MultiTaskPlan:
        tasks = [engine.new_task(n, self.method_id, s, seed=seed + i) for i, (n, s) in enumerate(specs.items())]
        return MultiTaskPlan(engine.method(self.method_id), tasks, [Stage("tasks", tasks, [t for task in tasks for t in self.per_task(engine, task)])])

    def per_task(self, engine: Engine, task: Task) -> list[Trainable]:
        """The task's params, moved onto the engine's device as trainable leaves (the engine's
        resident copy then shares them, so the loss reaches them)."""
        for key, p in list(task.params.items()):
            task.params[key] = nn.Parameter(p.detach().to(engine.backbone.device).float().clone(), requires_grad=True)
        return [Trainable(f"{task.name}.{k}", p, self.per_task_kind) for k, p in task.params.items()]


def _shared(module: nn.Module, prefix: str, skip: tuple[str, ...] = ()) -> list[Trainable]:
    return [Trainable(f"{prefix}.{k}", p, "net") for k, p in module.named_parameters() if not k.startswith(skip)]


class PromptTuningRecipe(Recipe):
    method_id = "prompt_tuning"


class TPVRecipe(Recipe):
    method_id = "tpv"
    top_k = 2

    def few_shot(self, engine, name, spec, examples, init, seed):
        notes: dict[str, Any] = {}
        if not init.get("vectors"):
            origin = init.get("origin", engine.method("tpv").config.default_origin)
            fits, baseline = self._rank_by_fit(engine, spec, examples, origin)
            # only sources that fit the examples better than θ_init alone transfer anything
            chosen = [(n, m) for n, m in fits if m < baseline][: self.top_k]
            notes["init_from"] = {"theta_init": {"misfit": round(baseline, 4)}}
            if chosen:
                # weights softmax(−misfit): a source that fits the examples worse contributes less
                weights = torch.softmax(-torch.tensor([m for _, m in chosen]), dim=0).tolist()
                method = engine.method("tpv")
                init = {**init, "vectors": [(method.vector(engine.tasks[n]), w) for (n, _), w in zip(chosen, weights)]}
                notes["init_from"] = {n: {"misfit": round(m, 4), "weight": round(w, 4)} for (n, m), w in zip(chosen, weights)}
        return engine.new_task(name, "tpv", spec, init=init, seed=seed), notes

    @torch.no_grad()
    def _rank_by_fit(self, engine: Engine, spec: TaskSpec, examples: Sequence[Example], origin: str) -> tuple[list[tuple[str, float]], float]:
        """Existing tpv tasks of `origin` (current module version), best first, by their prompt's
        misfit on the new examples (`evaluate.misfit`); plus the misfit of θ_init alone (τ = 0),
        the no-transfer start."""
        candidates = [t for t in engine.tasks.values() if t.method == "tpv" and t.module_version == engine.module_versions["tpv"] and t.meta["origin"] == origin]
        null = engine.new_task("tpv-probe.tmp", "tpv", spec, init={"origin": origin})

        def probe(task: Task) -> float:
            engine.add_task(task)
            try:
                return misfit(engine, [Example(task.name, e.text, e.target) for e in examples[:16]])
            finally:
                engine.remove_task(task.name)

        scored = [(t.name, probe(dataclasses.replace(t, name=null.name, spec=spec))) for t in candidates]
        return sorted(scored, key=lambda item: item[1]), probe(null)


class AttemptRecipe(Recipe):
    method_id = "attempt"

    def multitask(self, engine, specs, seed):
        """Sources: one prompt per mix task — the mix's prompt-tuned tasks when the engine serves
        them (`<task>-prompt_tuning`, ATTEMPT's own recipe), else trained here by prompt tuning;
        then the attention module and the targets over the frozen sources."""
        old = engine.method("attempt")
        module = type(old)(old.dims, config=dataclasses.replace(old.config, n_sources=len(specs)), embedding=engine.backbone.embedding.weight)
        module.to(engine.backbone.device)
        targets = [engine.new_task(n, "attempt", s, seed=seed + 100 + i) for i, (n, s) in enumerate(specs.items())]
        attention = Stage("attention", targets, _shared(module, "attempt", skip=("sources",)) + [t for task in targets for t in self.per_task(engine, task)])
        tuned = [engine.tasks.get(served_name(n, "prompt_tuning")) for n in specs]
        if all(t is not None and t.params["prompt"].shape[0] == old.config.n_virtual for t in tuned):
            self.install_sources(module, tuned)
            return MultiTaskPlan(module, targets, [attention], trains_shared=True)
        sources = [engine.new_task(f"{n}.source", "prompt_tuning", s, seed=seed + i) for i, (n, s) in enumerate(specs.items())]
        for task in sources:  # sources have the attempt prompt length
            task.params["prompt"] = nn.Parameter(task.params["prompt"][: old.config.n_virtual].clone())
        return MultiTaskPlan(module, targets, [
            Stage("sources", sources, [t for task in sources for t in PromptTuningRecipe().per_task(engine, task)]),
            attention,
        ], trains_shared=True)

    @staticmethod
    def install_sources(module: Method, sources: Sequence[Task]) -> None:
        with torch.no_grad():
            module.sources.copy_(torch.stack([t.params["prompt"].detach().to(module.sources.device) for t in sources]))


class IPRecipe(Recipe):
    method_id = "ip"
    per_task_kind = "net"

    def few_shot(self, engine, name, spec, examples, init, seed):
        task = engine.new_task(name, "ip", spec, init={**init, "copy_nets": True}, seed=seed)
        return task, {"init": "a copy of the shared IP nets"}

    def multitask(self, engine, specs, seed):
        module = engine.method("ip")
        tasks = [engine.new_task(n, "ip", s) for n, s in specs.items()]
        return MultiTaskPlan(module, tasks, [Stage("nets", tasks, _shared(module, "ip"))], trains_shared=True)


class PHARecipe(Recipe):
    method_id = "pha"
    per_task_kind = "prototype"

    def few_shot(self, engine, name, spec, examples, init, seed):
        notes: dict[str, Any] = {"trains": "the prototype only; hypernetwork and shared adapters frozen"}
        peers = [t for t in engine.tasks.values() if t.method == "pha" and t.module_version == engine.module_versions["pha"]]
        if "prototype" not in init and peers:
            method = engine.method("pha")
            features = engine.features([Request(peers[0].name, e.text) for e in examples[:32]])  # [n, d]
            prototypes = torch.stack([t.params["prototype"].detach() for t in peers]).to(features.device)
            nearest = peers[method.retrieve(features, prototypes)]
            init = {**init, "prototype": nearest.params["prototype"].detach().float().cpu().clone()}
            notes["init_from"] = nearest.name
        return engine.new_task(name, "pha", spec, init=init, seed=seed), notes

    def multitask(self, engine, specs, seed):
        module = engine.method("pha")
        tasks = [engine.new_task(n, "pha", s, seed=seed + i) for i, (n, s) in enumerate(specs.items())]
        trainables = _shared(module, "pha") + [dataclasses.replace(t, kind="net") for task in tasks for t in self.per_task(engine, task)]
        return MultiTaskPlan(module, tasks, [Stage("joint", tasks, trainables)], trains_shared=True)


def served_name(task: str, method: str) -> str:
    """Every method's multi-task run publishes its own copy of each catalog task: `<task>-<method>`."""
    return f"{task}-{method}"


RECIPES: dict[str, Recipe] = {r.method_id: r for r in (PromptTuningRecipe(), TPVRecipe(), AttemptRecipe(), IPRecipe(), PHARecipe())}


def recipe(method_id: str) -> Recipe:
    try:
        return RECIPES[method_id]
    except KeyError:
        raise InvalidRequest(f"method: no training recipe for {method_id!r}; known: {sorted(RECIPES)}") from None


def few_shot(
    engine: Engine,
    name: str,
    method: str,
    spec: TaskSpec,
    train_rows: Sequence[Example],
    validation_rows: Sequence[Example],
    init: dict[str, Any],
    config: TrainConfig,
    on_progress=None,
    checkpoint=None,
    should_stop=None,
) -> tuple[Task, TrainResult, dict[str, Any]]:
    """Create and train one new task from a few examples. The task is added to `engine` under a
    temporary name while it trains, and removed afterwards: the caller publishes it."""
    scratch = f"{name[:52]}.training"  # never a name a client can ask for while it trains
    rows = [Example(scratch, e.text, e.target) for e in train_rows]
    chosen = recipe(method)
    task, notes = chosen.few_shot(engine, scratch, spec, rows, init, config.seed)
    trainables = chosen.per_task(engine, task)
    engine.add_task(task)
    try:
        validation = {scratch: [Example(scratch, e.text, e.target) for e in validation_rows]}
        result = train(engine, [task], {scratch: rows}, validation if validation_rows else {}, trainables, config, on_progress, checkpoint, should_stop)
    finally:
        engine.remove_task(scratch)
    result.validation = {name: metrics for metrics in result.validation.values()}
    return frozen_copy(task, name), result, notes


def frozen_copy(task: Task, name: str) -> Task:
    """A trained task as it is published: host tensors, no gradients, under its public name."""
    params = nn.ParameterDict({k: nn.Parameter(p.detach().cpu().clone(), requires_grad=False) for k, p in task.params.items()})
    return dataclasses.replace(task, name=name, params=params)


__all__ = ["Progress", "RECIPES", "Recipe", "Stage", "MultiTaskPlan", "few_shot", "recipe"]
