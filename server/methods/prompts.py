"""Soft-prompt helpers shared by the prompt-family methods (prompt tuning, TPV, ATTEMPT): the two
initialisations of a prompt, and stacking per-task prompts for a batch."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from server.batch import BatchContext
from server.data.spec import TaskSpec
from server.methods.base import RowGroup, Vocabulary


def sample_vocab_rows(embedding: Tensor, n: int, generator: torch.Generator, first: int = 5000) -> Tensor:
    """n rows of the embedding table drawn from the first `first` vocabulary ids ([n, d], fp32):
    the soft-prompt init of Lester et al. and of ATTEMPT's reference code."""
    high = min(first, embedding.shape[0])
    ids = torch.randint(0, high, (n,), generator=generator)
    return embedding.detach()[ids.to(embedding.device)].float().cpu().clone()


def init_text(spec: TaskSpec) -> str:
    """What a prompt is initialised from when the task is described: its description and its
    labels (PEFT's TEXT init uses a task description the same way); '' when there is no description."""
    if not spec.description.strip():
        return ""
    return " ".join([spec.description.strip(), *spec.labels])


def text_rows(vocab: Vocabulary, text: str, n: int) -> Tensor:
    """n rows from the embeddings of `text`'s tokens, the tokens repeated until n rows (truncated
    if longer) — PEFT's PROMPT_TUNING TEXT init. [n, d] fp32 on the CPU."""
    ids = vocab.encode(text)
    if not ids:
        raise ValueError(f"the init text {text!r} has no tokens")
    ids = (ids * (-(-n // len(ids))))[:n]
    return vocab.embedding.detach()[torch.tensor(ids, device=vocab.embedding.device)].float().cpu().clone()


def initial_prompt(vocab: Vocabulary, spec: TaskSpec, n: int, generator: torch.Generator, *, text_init: bool, first: int) -> Tensor:
    """A new task's prompt [n, d]: from its description and labels (`text_init` and a description),
    else n embeddings sampled from the first `first` vocabulary ids."""
    text = init_text(spec) if text_init else ""
    return text_rows(vocab, text, n) if text else sample_vocab_rows(vocab.embedding, n, generator, first)


def stack_prompts(prompts: list[Tensor], task_slot: Tensor) -> tuple[Tensor, Tensor]:
    """Per-task prompts (each [m_k, d]) -> per-row prompts [g, max m, d] and lengths [g]."""
    width = max(p.shape[0] for p in prompts)
    table = torch.stack([nn.functional.pad(p, (0, 0, 0, width - p.shape[0])) for p in prompts])  # [s, w, d]
    lengths = torch.tensor([p.shape[0] for p in prompts], device=task_slot.device)
    return table[task_slot], lengths[task_slot]


def add_static_prompts(group: RowGroup, ctx: BatchContext) -> None:
    """Prefix every row with its task's prompt (`static["prompt"]`): prompt tuning and TPV. Where
    the engine cached the prompt's keys and values (`static["prefix_kv"]`, decoder-only serving),
    those go in instead, and the prompt costs nothing per request."""
    if all("prefix_kv" in s for s in group.statics):
        ctx.add_cached_prefix(group.rows, [s["prefix_kv"] for s in group.statics], group.task_slot)
        return
    prompts, lengths = stack_prompts([s["prompt"] for s in group.statics], group.task_slot)
    ctx.add_prefix(group.rows, prompts, lengths)  # [g, m, d]
