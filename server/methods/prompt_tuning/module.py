"""Prompt tuning (Lester et al., 2021): a per-task soft prompt P ∈ R^{m×d} prepended to the input.

max_P p_θ(y | [P; X])  — eq 1 of seed 002 (ATTEMPT restates it). On T5 the prompt goes in front of
the encoder input; on a decoder-only model in front of the prompt tokens. This matches HF PEFT's
PROMPT_TUNING exactly (DESIGN.md: PEFT prepends the first n rows of its table to the encoder input
on seq2seq, the decoder is untouched). Parameters per task: m·d. A described task's prompt starts
as the embeddings of its description and labels (PEFT's TEXT init), else as vocabulary samples.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from server.batch import BatchContext
from server.data.spec import TaskSpec
from server.errors import InvalidRequest
from server.methods.base import Method, RowGroup, Vocabulary
from server.methods.prompt_tuning.config import PromptConfig
from server.methods.prompts import add_static_prompts, initial_prompt
from server.task import Task


class PromptTuning(Method):
    method_id = "prompt_tuning"
    prefix_only = True
    config_class = PromptConfig
    config: PromptConfig
    peft_type = "PROMPT_TUNING"
    static_prefix = True

    def init_task(self, spec: TaskSpec, vocab: Vocabulary, generator: torch.Generator, init: dict[str, Any]) -> tuple[nn.ParameterDict, dict[str, Any]]:
        if "prompt" in init:  # an explicit prompt, e.g. imported from a PEFT checkpoint
            prompt = torch.as_tensor(init["prompt"], dtype=torch.float32)
            if prompt.ndim != 2 or prompt.shape[1] != self.dims.d_model:
                raise InvalidRequest(f"init.prompt: expected shape [m, {self.dims.d_model}], got {list(prompt.shape)}")
        elif init:
            raise InvalidRequest(f"init: prompt_tuning takes only 'prompt', got {sorted(init)}")
        else:
            c = self.config
            prompt = initial_prompt(vocab, spec, c.n_virtual, generator, text_init=c.text_init, first=c.init_vocab)
        return nn.ParameterDict({"prompt": nn.Parameter(prompt)}), {}

    def ready_without_training(self, spec: TaskSpec, init: dict[str, Any]) -> bool:
        return "prompt" in init  # an explicit (e.g. imported) prompt

    def static(self, task: Task) -> dict[str, Tensor]:
        return {"prompt": task.params["prompt"]}  # [m, d]

    def prefix_positions(self, task: Task) -> int:
        return task.params["prompt"].shape[0]

    def fixed_prompt(self, task: Task) -> Tensor:
        return task.params["prompt"].detach()  # [m, d]

    def modulate(self, group: RowGroup, ctx: BatchContext) -> None:
        add_static_prompts(group, ctx)

    def param_count(self) -> dict[str, int]:
        return {"shared": 0, "per_task": self.config.n_virtual * self.dims.d_model}
