"""Task Prompt Vectors (seed 001): τ = θ_tuned − θ_init of a soft prompt, and their arithmetic."""

from server.methods.registry import register
from server.methods.tpv.config import TPVConfig
from server.methods.tpv.module import TaskPromptVectors, TaskVector, combine
from server.methods.tpv.recipe import TPVRecipe

register(TaskPromptVectors, TPVRecipe)

__all__ = ["TPVConfig", "TaskPromptVectors", "TaskVector", "combine"]
