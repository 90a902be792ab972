"""The plain backbone as a method: nothing to store, nothing to modulate, nothing to train."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from server.data.spec import TaskSpec
from server.methods.base import Method
from server.methods.recipe import Recipe


@dataclass(frozen=True)
class PlainConfig:
    """No options: the backbone is used as it is."""


class Plain(Method):
    method_id = "plain"
    prefix_only = True
    config_class = PlainConfig

    def ready_without_training(self, spec: TaskSpec, init: dict[str, Any]) -> bool:
        return True

    def param_count(self) -> dict[str, int]:
        return {"shared": 0, "per_task": 0}


class PlainRecipe(Recipe):
    trains: ClassVar[bool] = False
