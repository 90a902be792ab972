"""Task Prompt Vectors (seed 001): τ = θ_tuned − θ_init of a soft prompt, and their arithmetic.

- eq 5: τ_t = θ_t − θ_init, the element-wise difference of a tuned soft prompt and its init;
- eqs 6–7: new prompts from arithmetic on vectors, θ = θ_init + Σ_k λ_k τ_k.
Arithmetic is only meaningful between vectors that share one θ_init (their *origin*): every vector
carries its origin id and `TaskVector.__add__` refuses to mix origins (reference code
kinit-sk/task-prompt-vectors keeps one init per prompt family for the same reason).
The θ_init of each origin is a seeded sample of vocabulary embeddings, kept as a frozen buffer of
this method (shared state) and stored with the method's shared artifact.
Parameters per task: m·d (τ); shared: m·d per origin (frozen, not trained).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from server.batch import BatchContext
from server.data.spec import TaskSpec
from server.errors import Incompatible, InvalidRequest, NotFound
from server.methods.base import BackboneDims, Method, RowGroup, Vocabulary
from server.methods.prompts import add_static_prompts, init_text, sample_vocab_rows, text_rows
from server.methods.tpv.config import TPVConfig
from server.task import Task


@dataclass(frozen=True)
class TaskVector:
    """τ with the id of the θ_init it was measured against."""

    origin: str
    tau: Tensor  # [m, d]

    def _check(self, other: TaskVector) -> None:
        if other.origin != self.origin:
            raise Incompatible(f"task vectors from different origins ({self.origin!r} vs {other.origin!r}) cannot be combined")
        if other.tau.shape != self.tau.shape:
            raise Incompatible(f"task vectors of shapes {list(self.tau.shape)} and {list(other.tau.shape)} cannot be combined")

    def __add__(self, other: TaskVector) -> TaskVector:
        self._check(other)
        return TaskVector(self.origin, self.tau + other.tau)

    def __sub__(self, other: TaskVector) -> TaskVector:
        return self + (-other)

    def __neg__(self) -> TaskVector:
        return TaskVector(self.origin, -self.tau)

    def __mul__(self, weight: float) -> TaskVector:
        return TaskVector(self.origin, self.tau * weight)

    __rmul__ = __mul__


def combine(weighted: list[tuple[TaskVector, float]]) -> TaskVector:
    """Σ_k λ_k τ_k (seed 001 eqs 6–7); raises Incompatible across origins."""
    if not weighted:
        raise InvalidRequest("init.combine: needs at least one task vector")
    total = weighted[0][0] * weighted[0][1]
    for vector, weight in weighted[1:]:
        total = total + vector * weight
    return total


class TaskPromptVectors(Method):
    method_id = "tpv"
    prefix_only = True
    config_class = TPVConfig
    config: TPVConfig
    static_prefix = True

    def __init__(self, dims: BackboneDims, config: TPVConfig | None = None, embedding: Tensor | None = None) -> None:
        super().__init__(dims, config)
        self.origins = nn.ParameterDict()  # origin id -> θ_init [m, d], frozen
        if embedding is not None:
            generator = torch.Generator().manual_seed(self.config.origin_seed)
            self.add_origin(self.config.default_origin, sample_vocab_rows(embedding, self.config.n_virtual, generator, self.config.init_vocab))

    def add_origin(self, origin: str, theta_init: Tensor) -> None:
        if origin in self.origins:
            if not torch.equal(self.origins[origin].detach().cpu(), theta_init.detach().cpu().float()):
                raise Incompatible(f"origin {origin!r} already exists with a different θ_init")
            return
        self.origins[origin] = nn.Parameter(theta_init.float(), requires_grad=False)

    def load_shared(self, tensors: dict[str, Tensor]) -> None:
        for key, value in tensors.items():  # origins are keyed by id: create the slots first
            origin = key.removeprefix("origins.")
            if origin not in self.origins:
                self.origins[origin] = nn.Parameter(torch.empty_like(value), requires_grad=False)
        super().load_shared(tensors)

    def theta_init(self, origin: str) -> Tensor:
        if origin not in self.origins:
            raise Incompatible(f"tpv origin {origin!r} is unknown; known: {sorted(self.origins)}")
        return self.origins[origin]

    def vector(self, task: Task) -> TaskVector:
        return TaskVector(task.meta["origin"], task.params["tau"].detach())

    def init_task(self, spec: TaskSpec, vocab: Vocabulary, generator: torch.Generator, init: dict[str, Any]) -> tuple[nn.ParameterDict, dict[str, Any]]:
        """init = {"vectors": [(TaskVector, λ), ...]} (τ = Σ λ_k τ_k, seed 001 eq 7), else the
        prompt starts at θ_init (τ = 0) or — for a described task, unless {"start": "theta_init"} —
        at its description's and labels' embeddings (τ = E(text) − θ_init); optional {"origin": id}."""
        unknown = set(init) - {"vectors", "origin", "start"}
        if unknown:
            raise InvalidRequest(f"init: tpv takes 'vectors', 'origin' and 'start', got {sorted(unknown)}")
        if init.get("start", "text") not in ("text", "theta_init"):
            raise InvalidRequest(f"init.start: 'text' or 'theta_init', got {init['start']!r}")
        origin = init.get("origin", self.config.default_origin)
        theta = self.theta_init(origin).detach().float().cpu()
        text = init_text(spec) if self.config.text_init and init.get("start", "text") == "text" else ""
        if init.get("vectors"):
            vector = combine(init["vectors"])
            if vector.origin != origin:
                raise Incompatible(f"init.vectors have origin {vector.origin!r}, the task asks for {origin!r}")
            tau = vector.tau.detach().float().cpu().clone()
        elif text:
            tau = text_rows(vocab, text, theta.shape[0]) - theta
        else:
            tau = torch.zeros_like(theta)
        return nn.ParameterDict({"tau": nn.Parameter(tau)}), {"origin": origin}

    def resolve_init(self, init: dict[str, Any], tasks: dict[str, Task]) -> dict[str, Any]:
        """{"combine": {"task_a": 1.0, "task_b": 0.5}} -> {"vectors": [(τ_a, 1.0), (τ_b, 0.5)]}."""
        if "combine" not in init:
            return init
        weighted = []
        for name, weight in dict(init["combine"]).items():
            task = tasks.get(name)
            if task is None:
                raise NotFound(f"init.combine: task {name!r} does not exist")
            if task.method != self.method_id:
                raise Incompatible(f"init.combine: task {name!r} is a {task.method} task, not a tpv one")
            weighted.append((self.vector(task), float(weight)))
        rest = {k: v for k, v in init.items() if k != "combine"}
        origins = {v.origin for v, _ in weighted}
        if "origin" not in rest and len(origins) == 1:
            rest["origin"] = origins.pop()
        return {**rest, "vectors": weighted}

    def ready_without_training(self, spec: TaskSpec, init: dict[str, Any]) -> bool:
        return bool(init.get("vectors"))  # τ = Σ λ_k τ_k needs no training (seed 001 eq 7)

    def static(self, task: Task) -> dict[str, Tensor]:
        return {"prompt": self.theta_init(task.meta["origin"]) + task.params["tau"]}  # [m, d]

    def prefix_positions(self, task: Task) -> int:
        return self.theta_init(task.meta["origin"]).shape[0]

    def fixed_prompt(self, task: Task) -> Tensor:
        """θ_init + τ: a TPV task is one fixed prompt once its vector is applied."""
        return self.static(task)["prompt"].detach()

    def modulate(self, group: RowGroup, ctx: BatchContext) -> None:
        add_static_prompts(group, ctx)

    def param_count(self) -> dict[str, int]:
        return {"shared": 0, "per_task": self.config.n_virtual * self.dims.d_model}
