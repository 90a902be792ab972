"""IP's options."""

from __future__ import annotations

from dataclasses import dataclass

from server.configs import require


@dataclass(frozen=True)
class IPConfig:
    task_dim: int = 200
    """t, the task-embedding size (seed 000 §4.2: 200)."""
    seed: int = 0
    """Seed of the nets' initialisation."""

    def __post_init__(self) -> None:
        require(self.task_dim >= 1, "task_dim", "must be >= 1")
