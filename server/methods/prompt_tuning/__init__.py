"""Prompt tuning (Lester et al., 2021): a per-task soft prompt prepended to the input."""

from server.methods.prompt_tuning.config import PromptConfig
from server.methods.prompt_tuning.module import PromptTuning
from server.methods.prompt_tuning.recipe import PromptTuningRecipe
from server.methods.registry import register

register(PromptTuning, PromptTuningRecipe)

__all__ = ["PromptConfig", "PromptTuning"]
