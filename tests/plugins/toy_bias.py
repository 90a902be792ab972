"""A sixth method defined only in the tests: a per-task learned bias on the last hidden state.

It exists to prove that a method is one registration: loaded as a plugin (`TASKSERVE_PLUGINS=
plugins.toy_bias`), it is served in batches mixed with the built-in methods, trained by the
worker from examples and accepted by the CLI, with no file outside this one changed.

The bias is written through the per-instance contract's adapter kind: on the last FFN site, an
adapter with zero down-projection is ReLU(x·0 + 0)·0 + b = b, so every row of a task gets
h_L ← h_L + b_task added to the residual stream that becomes the last hidden state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from server.batch import BatchContext
from server.configs import require
from server.data.spec import TaskSpec
from server.methods import Method, RowGroup, register
from server.methods.base import Vocabulary
from server.methods.recipe import Recipe
from server.task import Task


@dataclass(frozen=True)
class BiasConfig:
    init_scale: float = 0.0
    """Standard deviation of a new task's bias (0: a new task is the plain backbone)."""

    def __post_init__(self) -> None:
        require(self.init_scale >= 0, "init_scale", "must be >= 0")


class LastHiddenBias(Method):
    method_id = "toy_bias"
    config_class = BiasConfig
    config: BiasConfig

    def init_task(self, spec: TaskSpec, vocab: Vocabulary, generator: torch.Generator, init: dict[str, Any]) -> tuple[nn.ParameterDict, dict[str, Any]]:
        bias = torch.randn(self.dims.d_model, generator=generator) * self.config.init_scale
        return nn.ParameterDict({"bias": nn.Parameter(bias)}), {}

    def static(self, task: Task) -> dict[str, Tensor]:
        return {"bias": task.params["bias"]}  # [d]

    def modulate(self, group: RowGroup, ctx: BatchContext) -> None:
        bias = torch.stack([s["bias"] for s in group.statics]).float()  # [s, d]
        s, d = bias.shape
        zeros = bias.new_zeros
        site = self.dims.n_ffns - 1  # the last FFN: its output joins the residual stream of the last block
        ctx.add_adapters([site], group.rows, group.task_slot, zeros(s, 1, d, 1), zeros(s, 1, 1), zeros(s, 1, 1, d), bias.unsqueeze(1))

    def param_count(self) -> dict[str, int]:
        return {"shared": 0, "per_task": self.dims.d_model}


class BiasRecipe(Recipe):
    """Few-shot and multi-task: the per-task bias trains (the base recipe) at the soft-prompt rate —
    like a prompt row it is one input-independent vector in the model's hidden space."""

    per_task_kind = "prompt"


register(LastHiddenBias, BiasRecipe)
