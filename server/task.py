"""A servable task (its spec, its method and its per-task tensors, one version of it) and the rows
that address tasks by name: `Request` (serve) and `Example` (train / evaluate)."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from server.data.spec import TaskSpec
from server.errors import InvalidRequest

TASK_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
TASK_NAME_SCHEMA = {"pattern": r"^[a-z0-9](?:\.?[a-z0-9_-])*\.?$", "max_length": 64}
"""The same rule for the API schema (pydantic Field kwargs): TASK_NAME without '..', written without
look-arounds so that every JSON Schema engine, and the clients and fuzzers generating from it, read it."""


def check_task_name(name: str) -> str:
    if not TASK_NAME.fullmatch(name) or ".." in name:  # fullmatch: `$` alone also matches before a final newline
        raise InvalidRequest(f"name: {name!r} must match {TASK_NAME.pattern} (and contain no '..')")
    return name


@dataclass(eq=False)
class Task:
    """One version of a task. `params` are the method's per-task tensors (trainable when training);
    `meta` holds small non-tensor state such as a TPV vector's origin id."""

    name: str
    method: str
    spec: TaskSpec
    params: nn.ParameterDict = field(default_factory=nn.ParameterDict)
    version: int = 1
    meta: dict[str, Any] = field(default_factory=dict)
    module_version: int = 0
    """Version of the method's shared module this task was made with (0: the engine's built-in
    initialisation, never published). A task is only ever served with that module version."""

    def __post_init__(self) -> None:
        check_task_name(self.name)

    @property
    def key(self) -> tuple[str, int]:
        return (self.name, self.version)

    def on(self, device: torch.device | str) -> Task:
        """This task with its params copied to `device` as fresh fp32 leaves (what a trainer
        optimises; the engine serves a task's tensors as they are when they are on its device)."""
        params = nn.ParameterDict({k: nn.Parameter(p.detach().to(device).float().clone(), requires_grad=False) for k, p in self.params.items()})
        return dataclasses.replace(self, params=params)


@dataclass(frozen=True)
class Request:
    """One row to serve: a task's name and the input text (and, for a generative task, how to
    generate: `sampling` (a `server.decoding.Sampling`, None: greedy) and a `sink` that receives
    each piece of text as it is produced (streaming))."""

    task: str
    text: str
    max_new_tokens: int | None = None
    """Generative tasks: at most this many new tokens (None: the task's default)."""
    sampling: Any = None
    sink: Any = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class Example:
    """A training or evaluation row: `target` is a label (classification) or a target text."""

    task: str
    text: str
    target: str
