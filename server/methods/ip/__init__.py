"""Inspirational Pointer (seed 000): the task description steers per-layer hidden-state scales."""

from server.methods.ip.config import IPConfig
from server.methods.ip.module import InspirationalPointer
from server.methods.ip.recipe import IPRecipe
from server.methods.registry import register

register(InspirationalPointer, IPRecipe)

__all__ = ["IPConfig", "InspirationalPointer"]
