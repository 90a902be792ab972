"""A servable task: its spec, its method, and its per-task tensors (one version of it)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from server.data.spec import TaskSpec
from server.errors import InvalidRequest

TASK_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")


def check_task_name(name: str) -> str:
    if not TASK_NAME.match(name) or ".." in name:
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
