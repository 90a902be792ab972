"""Soft-prompt helpers shared by the prompt-family methods (prompt tuning, TPV, ATTEMPT)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from server.batch import BatchContext
from server.methods.base import RowGroup


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
