"""The training contract every method implements next to its serving module (`<id>/recipe.py`).

A recipe says what a new task starts from and what trains — for multi-task training of the shared
module (the seeds' first stage) and for few-shot task creation — and nothing about *how* training
runs: one trainer (`server/training/trainer.py`) serves every method. Recipes reach the engine
only through a `Workbench`, a handful of named operations the training layer provides, so the
methods layer never imports the engine.

Few-shot runs never write shared state: whatever a new task needs of it (IP's nets, a TPV source
vector, a PHA prototype) becomes the new task's own copy, so existing tasks never change.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol

import torch
from torch import Tensor, nn

from server.data.spec import TaskSpec
from server.task import Example, Task

if TYPE_CHECKING:  # pragma: no cover - typing only
    from server.methods.base import Method

Kind = Literal["prompt", "net", "prototype"]


@dataclass(frozen=True)
class Trainable:
    """A named parameter to train; `kind` picks its learning rate from the trainer's config."""

    name: str
    param: nn.Parameter
    kind: Kind = "net"


@dataclass
class Stage:
    """One training run of a multi-task plan: the tasks it touches and what trains."""

    name: str
    tasks: list[Task]
    trainables: list[Trainable]
    data: dict[str, str] = field(default_factory=dict)
    """Task name -> the data set its rows come from, where it is not the task's own name."""
    scratch: bool = False
    """The stage's tasks exist only for this stage (they are never published)."""
    finish: Callable[[], None] | None = None
    """Run once the stage has trained (e.g. ATTEMPT installs the trained source prompts)."""

    def data_of(self, task: str) -> str:
        return self.data.get(task, task)


@dataclass
class MultiTaskPlan:
    """What multi-task training produces: the (possibly new) shared module and the tasks."""

    module: Method
    tasks: list[Task]
    stages: list[Stage] = field(default_factory=list)
    trains_shared: bool = False
    """True when the shared module trains (it is then published as a new version)."""


class Workbench(Protocol):
    """What a recipe may ask of the engine it trains on (`server/training/workbench.py`)."""

    device: torch.device
    embedding: Tensor  # [vocab, d] the backbone's input embeddings (read only)

    def new_task(self, name: str, method: str, spec: TaskSpec, *, init: dict[str, Any] | None = None, seed: int = 0) -> Task:
        """A new task made with the method's current shared module; its params are fresh fp32
        leaves on `device`, ready to train."""

    def module(self, method: str) -> Method:
        """The method's current shared module."""

    def served(self, method: str) -> list[Task]:
        """The tasks the engine serves with the method's current shared module."""

    def task(self, name: str) -> Task | None:
        """A served task by name, None if there is none."""

    def misfit(self, task: Task, examples: Sequence[Example]) -> float:
        """How badly `task` (not necessarily served) fits labelled rows; lower is better."""

    def features(self, task: Task, texts: Sequence[str]) -> Tensor:
        """Pooled feature-site states of `texts` under `task`'s modulation: [n, d] fp32."""


class Recipe:
    """Defaults that fit a method whose per-task params are all it trains."""

    trains: ClassVar[bool] = True
    """False for a method with nothing to train (its tasks are always ready at once)."""
    per_task_kind: ClassVar[Kind] = "prompt"
    """Learning-rate group of the per-task params."""

    def __init__(self, method_id: str) -> None:
        self.method_id = method_id

    def few_shot(self, bench: Workbench, name: str, spec: TaskSpec, examples: Sequence[Example], init: dict[str, Any], seed: int) -> tuple[Task, dict[str, Any]]:
        """A new task (not yet served) whose `trainables` a few-shot run trains; plus what the
        job's notes should say about where it started."""
        return bench.new_task(name, self.method_id, spec, init=init, seed=seed), {}

    def trainables(self, task: Task) -> list[Trainable]:
        """What a few-shot run of `task` trains: its per-task params."""
        return [Trainable(f"{task.name}.{k}", p, self.per_task_kind) for k, p in task.params.items()]

    def multitask(self, bench: Workbench, specs: Mapping[str, TaskSpec], seed: int) -> MultiTaskPlan:
        """Per-task params from the current module, trained jointly; the module stays as it is."""
        tasks = [bench.new_task(n, self.method_id, s, seed=seed + i) for i, (n, s) in enumerate(specs.items())]
        return MultiTaskPlan(bench.module(self.method_id), tasks, [Stage("tasks", tasks, [t for task in tasks for t in self.trainables(task)])])


def shared_trainables(module: nn.Module, prefix: str, skip: tuple[str, ...] = ()) -> list[Trainable]:
    """A shared module's parameters as `net` trainables (names starting with `skip` left out)."""
    return [Trainable(f"{prefix}.{k}", p, "net") for k, p in module.named_parameters() if not k.startswith(skip)]


def served_name(task: str, method: str) -> str:
    """Every method's multi-task run publishes its own copy of each catalog task: `<task>-<method>`."""
    return f"{task}-{method}"
