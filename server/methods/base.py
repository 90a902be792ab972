"""The contract every method implements, and the registry that finds them by id.

A method is an `nn.Module` holding its SHARED state (ATTEMPT's source prompts and attention module,
IP's nets, PHA's retriever and hypernetwork, TPV's θ_init); per-task state lives in `Task.params`.
The engine groups a batch's rows by method and calls, per group:
1. `static(task)` once per task version (cached by the engine): input-independent tensors such as
   a soft prompt or PHA's generated adapters;
2. `modulate(group, ctx)`: write the group's prefixes / adapters into the BatchContext;
3. `modulate_from_form(group, ctx, form)` for methods with `uses_form` (IP): per-layer pooled
   states of the form module for the group's rows;
4. `extra_loss(group, ctx)` when training (PHA's retriever and prototype losses).
Nothing outside `server/methods/` branches on a method's id.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from server.batch import BatchContext
from server.data.spec import TaskSpec
from server.errors import InvalidRequest
from server.task import Task


@dataclass(frozen=True)
class BackboneDims:
    """The shapes a method needs from the backbone and the form module."""

    d_model: int
    """Backbone hidden size (d, or d_2 in seed 000)."""
    n_blocks: int
    """Blocks whose hidden states IP modulates (n_2)."""
    n_encoder_ffns: int
    """FFN sites that get PHA's task-shared adapters."""
    n_decoder_ffns: int
    """FFN sites that get PHA's generated adapters."""
    form_layers: int
    """Layers of the form module (n_1)."""
    form_dim: int
    """Hidden size of the form module (d_1)."""


@dataclass
class RowGroup:
    """The rows of one method within a batch."""

    rows: Tensor  # [g] long, indices into the batch
    tasks: list[Task]  # the distinct tasks of these rows
    task_slot: Tensor  # [g] long, index into `tasks`
    statics: list[dict[str, Tensor]]  # per distinct task: `Method.static(task)`
    embeds: Tensor  # [g, n, d] token embeddings of the rendered inputs, real tokens first
    mask: Tensor  # [g, n] long
    peers: list[Task]  # training only: every task of this method the engine knows (contrastive negatives)
    features: Tensor | None = None  # [g, d] pooled feature-site states (training, PHA)


class Method(nn.Module):
    """Base class: shared state + how this method's rows modulate a batch."""

    method_id: ClassVar[str]
    uses_form: ClassVar[bool] = False
    """True when the method needs per-layer form-module states (IP)."""
    wants_features: ClassVar[bool] = False
    """True when `extra_loss` needs the pooled feature-site state (PHA's retriever)."""

    def __init__(self, dims: BackboneDims, config: Any = None, embedding: Tensor | None = None) -> None:
        """Every method takes the backbone dims, its typed config (None = defaults) and, for
        vocabulary-sampled initialisation of shared prompts, the backbone's embedding table."""
        super().__init__()
        self.dims = dims

    def init_task(self, spec: TaskSpec, embedding: Tensor, generator: torch.Generator, init: dict[str, Any]) -> tuple[nn.ParameterDict, dict[str, Any]]:
        """Fresh per-task parameters and meta for a new task. `embedding` [vocab, d] is the
        backbone's input embedding table (read only, for vocabulary-sampled inits)."""
        if init:
            raise InvalidRequest(f"init: method {self.method_id} takes no init options, got {sorted(init)}")
        return nn.ParameterDict(), {}

    def resolve_init(self, init: dict[str, Any], tasks: dict[str, Task]) -> dict[str, Any]:
        """Turn an API `init` (names of other tasks, plain numbers) into what `init_task` takes."""
        return init

    def ready_without_training(self, spec: TaskSpec, init: dict[str, Any]) -> bool:
        """Whether a task created with this init (and no examples) is useful at once (HTTP 201)."""
        return False

    def render(self, spec: TaskSpec, text: str) -> str:
        return spec.render(text)

    def static(self, task: Task) -> dict[str, Tensor]:
        return {}

    def modulate(self, group: RowGroup, ctx: BatchContext) -> None:
        pass

    def modulate_from_form(self, group: RowGroup, ctx: BatchContext, form: Tensor) -> None:
        """form: [n1, g, d1] per-layer masked mean-pooled form-module states of the group's rows."""

    def extra_loss(self, group: RowGroup) -> Tensor | None:
        return None

    def load_shared(self, tensors: dict[str, Tensor]) -> None:
        """Load published shared state (a `state_dict()` read back from the store); strict."""
        self.load_state_dict(tensors, strict=True)

    def param_count(self) -> dict[str, int]:
        """Trainable parameter counts from the documented formulas (docs/methods.md):
        `shared` for the method's shared modules, `per_task` for one task."""
        raise NotImplementedError


def sample_vocab_rows(embedding: Tensor, n: int, generator: torch.Generator, first: int = 5000) -> Tensor:
    """n rows of the embedding table drawn from the first `first` vocabulary ids ([n, d], fp32):
    the soft-prompt init of Lester et al. and of ATTEMPT's reference code."""
    high = min(first, embedding.shape[0])
    ids = torch.randint(0, high, (n,), generator=generator)
    return embedding.detach()[ids.to(embedding.device)].float().cpu().clone()


def stack_prompts(prompts: list[Tensor], task_slot: Tensor) -> tuple[Tensor, Tensor]:
    """Per-task prompts (each [m_k, d]) -> per-row prompts [g, max m, d] and lengths [g]."""
    width = max(p.shape[0] for p in prompts)
    table = torch.stack([nn.functional.pad(p, (0, 0, 0, width - p.shape[0])) for p in prompts])  # [s, w, d]
    lengths = torch.tensor([p.shape[0] for p in prompts], device=task_slot.device)
    return table[task_slot], lengths[task_slot]


def add_static_prompts(group: RowGroup, ctx: BatchContext) -> None:
    """Prefix every row with its task's cached prompt (`static["prompt"]`): prompt tuning and TPV."""
    prompts, lengths = stack_prompts([s["prompt"] for s in group.statics], group.task_slot)
    ctx.add_prefix(group.rows, prompts, lengths)  # [g, m, d]


REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    if cls.method_id in REGISTRY:
        raise ValueError(f"method id {cls.method_id!r} registered twice")
    REGISTRY[cls.method_id] = cls
    return cls


def method_class(method_id: str) -> type[Method]:
    try:
        return REGISTRY[method_id]
    except KeyError:
        raise InvalidRequest(f"method: unknown method {method_id!r}; known: {sorted(REGISTRY)}") from None
