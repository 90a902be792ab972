"""ATTEMPT's options."""

from __future__ import annotations

from dataclasses import dataclass

from server.configs import require


@dataclass(frozen=True)
class AttemptConfig:
    n_virtual: int = 100
    """Prompt length m of the source and target prompts (seed 002: 100)."""
    n_sources: int = 6
    """Number of source prompts t (seed 002 trains six: MNLI, SST-2, QQP, QNLI, SQuAD, ReCoRD)."""
    bottleneck: int = 100
    """r, the down-projection size of the attention module (reference code: 100)."""
    temperature_k: float = 1.0
    """K in the logit scale 1/(d·e^K) (seed 002 uses K = 1)."""
    init_vocab: int = 5000
    """Source prompts, and target prompts of undescribed tasks, start as embeddings of the first `init_vocab` ids."""
    text_init: bool = True
    """A described task's target prompt starts as the embeddings of its description and labels."""
    seed: int = 0
    """Seed of the source-prompt and attention-module initialisation."""

    def __post_init__(self) -> None:
        for name in ("n_virtual", "n_sources", "bottleneck", "init_vocab"):
            require(getattr(self, name) >= 1, name, "must be >= 1")
