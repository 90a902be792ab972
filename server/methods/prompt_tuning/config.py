"""Prompt tuning's options."""

from __future__ import annotations

from dataclasses import dataclass

from server.configs import require


@dataclass(frozen=True)
class PromptConfig:
    n_virtual: int = 100
    """Soft prompt length m (seed papers: 100)."""
    init_vocab: int = 5000
    """Without a description, initial rows are sampled from the embeddings of the first `init_vocab` token ids."""
    text_init: bool = True
    """A described task's prompt starts as the embeddings of its description and labels (PEFT's TEXT init)."""

    def __post_init__(self) -> None:
        require(self.n_virtual >= 1, "n_virtual", "must be >= 1")
        require(self.init_vocab >= 1, "init_vocab", "must be >= 1")
