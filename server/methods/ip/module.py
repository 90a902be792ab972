"""Inspirational Pointer (seed 000): the task description steers per-layer hidden-state scales.

- §3.2 sample modification: m = s + x, the description prepended to the input (also to the
  backbone's own input, §A.5.1).
- eq 1: τ = T(Σ_{i=1}^{n1} w_i v_i), v_i the masked mean-pooled state of form-module layer i
  (T5: the backbone's encoder, §3.3; decoder-only: the frozen MiniLM), T = FF + ReLU, τ ∈ R^t.
- eq 3: I_m = C(τ, L_m) with layer-id embeddings L_m ∈ R^t and C = c_2(ReLU(c_1 ·)),
  c_1 ∈ R^{t×t}, c_2 ∈ R^{t×d_2}; then h_m ← h_m + h_m ∘ I_m on every decoder block (T5, §3.4)
  or every layer (decoder-only, §A.5).
Interpretation: the text says C takes a *concatenation* of (τ, L_m), but c_1 ∈ R^{t×t} and the
§3.6 count (t·t for c_1) only fit a t-dim input, so C takes τ + L_m (a concatenation followed by a
linear map with tied halves). With that choice the §3.6 count holds for the weights,
    d_1·t + n_1 + t·n_2 + t·t + t·d_2,
and with the biases of T, c_1 and c_2 the exact count is t·(d_1 + d_2 + t + n_2 + 2) + n_1 + d_2.
c_2 starts at zero, so an untrained IP is the identity (I = 0).
A task may carry its own fine-tuned copy of the nets (a few-shot task, see recipe.py); rows gather
their task's nets, so tasks with and without copies still share one batch.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from server.batch import BatchContext
from server.data.spec import TaskSpec
from server.errors import InvalidRequest
from server.methods.base import BackboneDims, Method, RowGroup, Vocabulary
from server.methods.ip.config import IPConfig
from server.task import Task

NET_KEYS = ("w", "T_w", "T_b", "L", "c1_w", "c1_b", "c2_w", "c2_b")


class InspirationalPointer(Method):
    method_id = "ip"
    config_class = IPConfig
    config: IPConfig
    uses_form = True

    def __init__(self, dims: BackboneDims, config: IPConfig | None = None, embedding: Tensor | None = None) -> None:
        super().__init__(dims, config)
        self.nets = self.new_nets()

    def new_nets(self) -> nn.ParameterDict:
        t, d1, n1, n2, d2 = self.config.task_dim, self.dims.form_dim, self.dims.form_layers, self.dims.n_blocks, self.dims.d_model
        g = torch.Generator().manual_seed(self.config.seed)

        def uniform(*shape: int, fan_in: int) -> nn.Parameter:  # nn.Linear's default init, seeded
            bound = fan_in**-0.5
            return nn.Parameter((torch.rand(*shape, generator=g) * 2 - 1) * bound)

        return nn.ParameterDict({
            "w": nn.Parameter(torch.full((n1,), 1.0 / n1)),  # linear composition weights
            "T_w": uniform(t, d1, fan_in=d1),  # [t, d1]
            "T_b": uniform(t, fan_in=d1),
            "L": nn.Parameter(torch.randn(n2, t, generator=g) * 0.02),  # layer-id embeddings [n2, t]
            "c1_w": uniform(t, t, fan_in=t),
            "c1_b": uniform(t, fan_in=t),
            "c2_w": nn.Parameter(torch.zeros(d2, t)),  # zero: I = 0 at start
            "c2_b": nn.Parameter(torch.zeros(d2)),
        })

    def init_task(self, spec: TaskSpec, vocab: Vocabulary, generator: torch.Generator, init: dict[str, Any]) -> tuple[nn.ParameterDict, dict[str, Any]]:
        """init = {} (use the shared nets: ready at once from the description) or
        {"copy_nets": True} (a per-task copy initialised from the shared nets, for fine-tuning)."""
        unknown = set(init) - {"copy_nets"}
        if unknown:
            raise InvalidRequest(f"init: ip takes only 'copy_nets', got {sorted(unknown)}")
        if not spec.description:
            raise InvalidRequest("description: an ip task needs a task description")
        if init.get("copy_nets"):
            return nn.ParameterDict({k: nn.Parameter(v.detach().clone()) for k, v in self.nets.items()}), {}
        return nn.ParameterDict(), {}

    def ready_without_training(self, spec: TaskSpec, init: dict[str, Any]) -> bool:
        return bool(spec.description)  # zero-shot transfer through the description (seed 000 §4.5.2)

    def render(self, spec: TaskSpec, text: str) -> str:
        return spec.render(text, with_description=True)

    def static(self, task: Task) -> dict[str, Tensor]:
        return {k: task.params[k] for k in NET_KEYS} if "T_w" in task.params else dict(self.nets)

    def task_delta(self, form: Tensor, nets: dict[str, Tensor]) -> Tensor:
        """form [n1, g, d1] pooled states, nets gathered per row ([g, ...] each) -> I [g, n2, d2]."""
        v = torch.einsum("ngd,gn->gd", form, nets["w"])  # Σ w_i v_i, [g, d1]
        tau = torch.relu(torch.einsum("gd,gtd->gt", v, nets["T_w"]) + nets["T_b"])  # eq 1, [g, t]
        mixed = tau.unsqueeze(1) + nets["L"]  # C's input τ + L_m, [g, n2, t]
        hidden = torch.relu(torch.einsum("gnt,gut->gnu", mixed, nets["c1_w"]) + nets["c1_b"].unsqueeze(1))  # [g, n2, t]
        return torch.einsum("gnt,gdt->gnd", hidden, nets["c2_w"]) + nets["c2_b"].unsqueeze(1)  # eq 3, [g, n2, d2]

    def modulate_from_form(self, group: RowGroup, ctx: BatchContext, form: Tensor) -> None:
        nets = {k: torch.stack([s[k] for s in group.statics])[group.task_slot].float() for k in NET_KEYS}
        ctx.add_hidden_scale(group.rows, self.task_delta(form.float(), nets))

    def param_count(self) -> dict[str, int]:
        t, d1, n1, n2, d2 = self.config.task_dim, self.dims.form_dim, self.dims.form_layers, self.dims.n_blocks, self.dims.d_model
        shared = t * (d1 + d2 + t + n2 + 2) + n1 + d2
        return {"shared": shared, "per_task": 0, "per_task_with_copy": shared}
