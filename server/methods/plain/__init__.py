"""`plain`: the frozen backbone alone with the task's template and labels — a zero-shot task.

No per-task or shared parameters and no modulation: its rows are the identity rows of the
per-instance contract. It serves zero-shot baselines (`taskserve eval --zero-shot`) and tasks
that need no training at all; a `POST /v1/tasks` with `method: plain` is ready at once (201).
"""

from server.methods.plain.module import Plain, PlainConfig, PlainRecipe
from server.methods.registry import register

register(Plain, PlainRecipe)

__all__ = ["Plain", "PlainConfig"]
