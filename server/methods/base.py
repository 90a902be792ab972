"""The serving contract every method implements.

A method is an `nn.Module` holding its SHARED state (ATTEMPT's source prompts and attention module,
IP's nets, PHA's retriever and hypernetwork, TPV's θ_init); per-task state lives in `Task.params`.
The engine groups a batch's rows by (method, shared-module version) and calls, per group:
1. `static(task)` once per task version (cached by the engine): input-independent tensors such as
   a soft prompt or PHA's generated adapters;
2. `modulate(group, ctx)`: write the group's prefixes / hidden scales / adapters into the BatchContext;
3. `modulate_from_form(group, ctx, form)` for methods with `uses_form` (IP): per-layer pooled
   states of the form module for the group's rows;
4. `extra_loss(group)` when training (PHA's retriever and prototype losses).
How a method trains lives next to it (`recipe.py` in its package, contract in `methods/recipe.py`);
`methods/registry.py` registers both under the method's id. Code outside `server/methods/` never
names a method: it asks the registry, or the method itself, through this contract.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from server.batch import BatchContext
from server.data.spec import TaskSpec
from server.errors import Incompatible, InvalidRequest
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

    @property
    def n_ffns(self) -> int:
        """Every FFN site, encoder ones first (the site index of `BatchContext.add_adapters`)."""
        return self.n_encoder_ffns + self.n_decoder_ffns


@dataclass(frozen=True)
class Vocabulary:
    """The backbone's input vocabulary as a method may use it to make a task: the embedding table
    (read only) and the tokenizer."""

    embedding: Tensor  # [vocab, d]
    encode: Callable[[str], list[int]]
    """Text -> token ids (no special tokens)."""


@dataclass
class RowGroup:
    """The rows of one method (at one shared-module version) within a batch."""

    rows: Tensor  # [g] long, indices into the batch
    tasks: list[Task]  # the distinct tasks of these rows (device copies)
    task_slot: Tensor  # [g] long, index into `tasks`
    statics: list[dict[str, Tensor]]  # per distinct task: `Method.static(task)`
    embeds: Tensor  # [g, n, d] token embeddings of the rendered inputs, real tokens first
    mask: Tensor  # [g, n] long
    peers: list[Task]  # training only: every task of this module the engine knows (contrastive negatives)
    features: Tensor | None = None  # [g, d] pooled feature-site states (training, when `wants_features`)


class Method(nn.Module):
    """Base class: shared state + how this method's rows modulate a batch."""

    method_id: ClassVar[str]
    config_class: ClassVar[type]
    """The typed config (a frozen dataclass validating in `__post_init__`) the constructor takes."""
    uses_form: ClassVar[bool] = False
    """True when the method needs per-layer form-module states (IP)."""
    wants_features: ClassVar[bool] = False
    """True when `extra_loss` needs the pooled feature-site state (PHA's retriever)."""
    static_prefix: ClassVar[bool] = False
    """True when `static(task)["prompt"]` is the whole prefix of every row of the task, whatever the
    input: on a causal backbone the engine then computes its keys/values once per task version."""
    prefix_only: ClassVar[bool] = False
    """True when everything the method does to a row is a prefix of input embeddings (soft prompts;
    the plain backbone): such rows can run on an engine that takes prompt embeddings (vLLM)."""
    peft_type: ClassVar[str | None] = None
    """The HF PEFT adapter type whose checkpoints are exactly this method's tasks (prompt tuning:
    `PROMPT_TUNING`), for comparisons and import/export; None where PEFT has no counterpart."""

    def __init__(self, dims: BackboneDims, config: Any = None, embedding: Tensor | None = None) -> None:
        """Every method takes the backbone dims, its typed config (None = defaults) and, for
        vocabulary-sampled initialisation of shared prompts, the backbone's embedding table."""
        super().__init__()
        self.dims = dims
        self.config = config if config is not None else self.config_class()

    def init_task(self, spec: TaskSpec, vocab: Vocabulary, generator: torch.Generator, init: dict[str, Any]) -> tuple[nn.ParameterDict, dict[str, Any]]:
        """Fresh per-task parameters and meta for a new task; `vocab` gives the backbone's embedding
        table and tokenizer (for prompts sampled from the vocabulary or made from the description)."""
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

    def prefix_positions(self, task: Task) -> int:
        """How many positions a row of this task gets before its tokens in the first pass (a soft
        prompt's length; none for hidden-state methods). The engine splits a batch into passes by
        the length rows really run at; a `static_prefix` whose keys/values are cached adds none."""
        return 0

    def modulate(self, group: RowGroup, ctx: BatchContext) -> None:
        pass

    def modulate_from_form(self, group: RowGroup, ctx: BatchContext, form: Tensor) -> None:
        """form: [n1, g, d1] per-layer masked mean-pooled form-module states of the group's rows."""

    def extra_loss(self, group: RowGroup) -> Tensor | None:
        return None

    def fixed_prompt(self, task: Task) -> Tensor:
        """The soft prompt [m, d] a task of this method prepends to every input — what an export
        to a PEFT PROMPT_TUNING checkpoint writes. Methods without one say why."""
        raise Incompatible(f"{self.method_id} tasks do not modulate the backbone with a fixed soft prompt: there is no PEFT prompt-tuning checkpoint to export")

    def load_shared(self, tensors: dict[str, Tensor]) -> None:
        """Load published shared state (a `state_dict()` read back from the store); strict."""
        self.load_state_dict(tensors, strict=True)

    def param_count(self) -> dict[str, int]:
        """Trainable parameter counts from the documented formulas (docs/methods.md):
        `shared` for the method's shared modules, `per_task` for one task."""
        raise NotImplementedError
