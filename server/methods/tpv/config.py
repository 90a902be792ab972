"""TPV's options."""

from __future__ import annotations

from dataclasses import dataclass

from server.configs import require


@dataclass(frozen=True)
class TPVConfig:
    n_virtual: int = 100
    """Soft prompt length m (seed 001 uses 100)."""
    init_vocab: int = 5000
    """θ_init rows are sampled from the embeddings of the first `init_vocab` token ids."""
    default_origin: str = "origin-0"
    """Origin id used when a task names none."""
    origin_seed: int = 0
    """Seed of the default origin's θ_init, so every process derives the same one."""
    text_init: bool = True
    """A described task's prompt starts at its description's and labels' embeddings (τ = E(text) − θ_init)."""

    def __post_init__(self) -> None:
        require(self.n_virtual >= 1, "n_virtual", "must be >= 1")
        require(self.init_vocab >= 1, "init_vocab", "must be >= 1")
        require(bool(self.default_origin), "default_origin", "must be a non-empty id")
