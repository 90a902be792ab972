"""A method defined only for the reliability drills: the plain backbone, except that some tasks'
forwards fail or wait — the way a real engine's forward can (tests/drills/test_traffic_faults.py).

Loaded as a plugin (`TASKSERVE_PLUGINS=plugins.drill_faults`), so the server's real engine runs it
inside its real batches; nothing of taskserve is mocked. A task misbehaves only while it is armed
— while the file `$DRILL_GATES/<task name>` exists — so it loads like any task (the server's load
probe runs one row through it) and the drill arms it once it is served. Armed, by its name:

- `oom-*`: `modulate` raises `torch.OutOfMemoryError`, what the CUDA allocator raises when a batch
  does not fit — the failure happens mid-batch, after scheduling, inside the forward.
- `fail-*`: `modulate` raises a RuntimeError (a bug, a broken device: any other failure).
- `hold-*`: `modulate` waits until the file is removed (at most 120 s, then it raises), so a drill
  keeps the engine busy for exactly as long as it needs rows queued behind it, and releases it on a
  condition rather than after a sleep.
- any other name: the plain backbone, armed or not.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from server.batch import BatchContext
from server.data.spec import TaskSpec
from server.methods import Method, RowGroup, register
from server.methods.recipe import Recipe

METHOD = "drill_faults"
GATES = "DRILL_GATES"


@dataclass(frozen=True)
class FaultsConfig:
    """No options: what a task does is chosen by its name."""


class Faults(Method):
    method_id = METHOD
    config_class = FaultsConfig

    def ready_without_training(self, spec: TaskSpec, init: dict[str, Any]) -> bool:
        return True

    def modulate(self, group: RowGroup, ctx: BatchContext) -> None:
        for task in group.tasks:
            armed = Path(os.environ[GATES]) / task.name
            if task.name.startswith("oom-") and armed.exists():
                raise torch.OutOfMemoryError(f"drill: task {task.name!r} does not fit on the device (injected)")
            if task.name.startswith("fail-") and armed.exists():
                raise RuntimeError(f"drill: task {task.name!r} broke the forward (injected)")
            if task.name.startswith("hold-"):
                deadline = time.monotonic() + 120
                while armed.exists():
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"drill: nobody released {armed}")
                    time.sleep(0.01)

    def param_count(self) -> dict[str, int]:
        return {"shared": 0, "per_task": 0}


class FaultsRecipe(Recipe):
    trains = False


register(Faults, FaultsRecipe)
