"""How prompt tuning trains: per-task soft prompts, nothing shared.

- few-shot: a new prompt from the default (vocabulary-sampled) initialisation, prompt-tuned;
- multi-task: one prompt per mix task from one initialisation, trained jointly on mixed batches.
Both are the base `Recipe`'s defaults.
"""

from __future__ import annotations

from server.methods.recipe import Recipe


class PromptTuningRecipe(Recipe):
    per_task_kind = "prompt"
