"""PHA's options."""

from __future__ import annotations

from dataclasses import dataclass

from server.configs import require


@dataclass(frozen=True)
class PHAConfig:
    proto_dim: int = 64
    """d', size of prototypes, retrieval vectors and layer embeddings (reference code: 64)."""
    retriever_hidden: int = 128
    """h_r, hidden size of the retriever G."""
    mixer_hidden: int = 128
    """h_c, hidden size of the project network C."""
    mixed_dim: int = 64
    """d_h, size of the mixed embedding I_i^m fed to the hypernetwork (appendix A: 64)."""
    bottleneck: int = 64
    """b, adapter bottleneck of generated and shared adapters."""
    temperature: float = 0.1
    """Temperature of both contrastive losses."""
    loss_weight: float = 0.1
    """λ in eq 9."""
    seed: int = 0
    """Seed of the shared modules' initialisation."""

    def __post_init__(self) -> None:
        for name in ("proto_dim", "retriever_hidden", "mixer_hidden", "mixed_dim", "bottleneck"):
            require(getattr(self, name) >= 1, name, "must be >= 1")
        require(self.temperature > 0, "temperature", "must be > 0")
        require(self.loss_weight >= 0, "loss_weight", "must be >= 0")
