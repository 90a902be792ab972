"""What a task *is*, independent of how it is learned: template, labels, description, scoring rule.

The template and the scoring rule are part of the spec on purpose (DESIGN.md: on binary sentiment
SmolLM2's zero-shot accuracy moves from 0.54 to 0.85 with the template and first-token scoring), so a
task is always served and evaluated with the same ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from server.errors import InvalidRequest

Scoring = Literal["first", "sum", "mean"]


def clean_label(text: str) -> str:
    """A label as taskserve keeps it: without surrounding whitespace (how a label is *scored*, e.g.
    with a leading space after a decoder-only prompt, is `Backbone.label_ids`'s business)."""
    return text.strip()


@dataclass(frozen=True)
class TaskSpec:
    """How inputs of one task are rendered and how its outputs are read."""

    template: str = "{text}"
    """Input template; `{text}` is the request text, `{description}` (optional) the description."""
    labels: tuple[str, ...] = ()
    """Labels for rank classification, as the user writes them ("positive"; surrounding whitespace
    is dropped). `Backbone.label_ids` turns one into the tokens it is scored by. Empty tuple = a
    generative task."""
    description: str = ""
    """Human-language task description (seed 000, §3.2 / Table 6); IP prepends it to the input."""
    scoring: Scoring = "first"
    """Rank-classification rule: log-prob of the label's first token, the summed, or the
    length-normalised (mean) log-likelihood of all its tokens."""
    metric: str = "accuracy"
    """Evaluation metric name (accuracy, f1_macro, ...)."""
    max_new_tokens: int = 32
    """Default generation bound for generative tasks."""
    extra: dict[str, str] = field(default_factory=dict, compare=False, hash=False)
    """Free-form metadata kept with the spec (source data set, attribution)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", tuple(clean_label(label) for label in self.labels))
        if "{text}" not in self.template:
            raise InvalidRequest("template: must contain the {text} placeholder")
        if len(set(self.labels)) != len(self.labels):
            raise InvalidRequest("labels: labels must be distinct")
        if any(not label for label in self.labels):
            raise InvalidRequest("labels: labels must be non-empty")
        if self.scoring not in ("first", "sum", "mean"):
            raise InvalidRequest(f"scoring: must be first, sum or mean, not {self.scoring!r}")
        if self.max_new_tokens < 1:
            raise InvalidRequest("max_new_tokens: must be >= 1")

    @property
    def is_classification(self) -> bool:
        return bool(self.labels)

    @classmethod
    def default(cls, description: str = "", labels: tuple[str, ...] = (), *, seq2seq: bool, scoring: Scoring = "first") -> TaskSpec:
        """The spec of a task created with only a description and labels (`POST /v1/tasks` without a
        template): the description on its own line before the input, so every method sees it."""
        if seq2seq:
            template = "{description}\n{text}" if description else "{text}"
        else:
            template = "{description}\nInput: {text}\nAnswer:" if description else "Input: {text}\nAnswer:"
        return cls(template=template, labels=labels, description=description, scoring=scoring)

    def render(self, text: str, *, with_description: bool = False) -> str:
        """The backbone input for `text`. `with_description` prepends the description when the
        template does not place it itself (IP's sample modification m = s + x, seed 000 §3.2)."""
        prompt = self.template.replace("{description}", self.description).replace("{text}", text)
        if with_description and self.description and "{description}" not in self.template:
            prompt = f"{self.description}\n{prompt}"
        return prompt
