"""ATTEMPT (seed 002): attentional mixtures of soft prompts, computed per instance."""

from server.methods.attempt.config import AttemptConfig
from server.methods.attempt.module import Attempt
from server.methods.attempt.recipe import AttemptRecipe
from server.methods.registry import register

register(Attempt, AttemptRecipe)

__all__ = ["Attempt", "AttemptConfig"]
