"""Prototype-based HyperAdapter (seed 003): prototypes + a hypernetwork generate per-task adapters."""

from server.methods.pha.config import PHAConfig
from server.methods.pha.module import PrototypeHyperAdapter
from server.methods.pha.recipe import PHARecipe
from server.methods.registry import register

register(PrototypeHyperAdapter, PHARecipe)

__all__ = ["PHAConfig", "PrototypeHyperAdapter"]
