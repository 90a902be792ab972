"""Request and response bodies of the HTTP API (v1), grouped in schema families."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from server.data.spec import TaskSpec
from server.errors import InvalidRequest


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PredictRow(Strict):
    task: str = Field(min_length=1, max_length=64)
    text: str = Field(max_length=100_000)


class PredictOptions(Strict):
    max_new_tokens: int | None = Field(default=None, ge=1, le=1024)
    return_scores: bool = True


class PredictRequest(Strict):
    """Either one row (`task` + `text`) or `inputs` (rows may mix tasks)."""

    task: str | None = Field(default=None, min_length=1, max_length=64)
    text: str | None = Field(default=None, max_length=100_000)
    inputs: list[PredictRow] | None = Field(default=None, min_length=1, max_length=1024)
    options: PredictOptions = Field(default_factory=PredictOptions)

    @model_validator(mode="after")
    def _one_form(self) -> PredictRequest:
        single = self.task is not None or self.text is not None
        if single == (self.inputs is not None):
            raise ValueError("give either task + text or inputs")
        if single and (self.task is None or self.text is None):
            raise ValueError("task and text go together")
        return self

    def rows(self) -> list[PredictRow]:
        return self.inputs if self.inputs is not None else [PredictRow(task=self.task, text=self.text)]


class PredictResult(BaseModel):
    task: str
    output: str
    label: str | None = None
    scores: dict[str, float] | None = None
    task_version: int


class PredictResults(BaseModel):
    results: list[PredictResult]


class Example(Strict):
    text: str = Field(max_length=100_000)
    label: str | None = None
    target: str | None = None


class TrainOptions(Strict):
    """Few-shot training knobs (defaults fit a CPU: a 32-example job takes minutes)."""

    steps: int = Field(default=60, ge=1, le=5000)
    batch_size: int = Field(default=8, ge=1, le=64)
    lr: float | None = Field(default=None, gt=0, le=1)
    prompt_lr: float | None = Field(default=None, gt=0, le=10)
    seed: int = Field(default=0, ge=0)


class TaskCreate(Strict):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_.-]{0,63}$")
    method: Literal["prompt_tuning", "tpv", "attempt", "ip", "pha"]
    description: str = Field(default="", max_length=2000)
    labels: list[str] | None = Field(default=None, max_length=100)
    template: str | None = Field(default=None, max_length=4000)
    scoring: Literal["first", "sum", "mean"] = "first"
    examples: list[Example] | None = Field(default=None, max_length=10_000)
    init: dict[str, Any] = Field(default_factory=dict)
    train: TrainOptions = Field(default_factory=TrainOptions)

    def spec(self, seq2seq: bool) -> TaskSpec:
        """The task spec; decoder-only verbalizers get the leading space their tokens carry."""
        labels = tuple(self.labels or ())
        template = self.template or ("{text}" if seq2seq else "Input: {text}\nAnswer:")
        if labels and not seq2seq:
            labels = tuple(label if label.startswith(" ") else f" {label}" for label in labels)
        return TaskSpec(template=template, labels=labels, description=self.description, scoring=self.scoring)

    def training_rows(self, spec: TaskSpec) -> list[tuple[str, str]]:
        """(text, target verbalizer or target text) per example; InvalidRequest names the bad one."""
        given = [label.strip() for label in spec.labels]
        rows = []
        for i, example in enumerate(self.examples or []):
            if spec.is_classification:
                if example.label is None or example.label.strip() not in given:
                    raise InvalidRequest(f"examples[{i}].label: must be one of {given}, got {example.label!r}")
                rows.append((example.text, spec.labels[given.index(example.label.strip())]))
            else:
                if not example.target:
                    raise InvalidRequest(f"examples[{i}].target: a task without labels needs target texts")
                rows.append((example.text, example.target))
        return rows


class TaskPublic(BaseModel):
    name: str
    method: str
    status: str
    version: int | None
    served: bool
    error: str | None = None
    spec: dict[str, Any] | None = None


class TaskList(BaseModel):
    tasks: list[TaskPublic]


class TaskCreated(BaseModel):
    task: TaskPublic
    job: str | None = None


class JobPublic(BaseModel):
    id: str
    task: str
    status: str
    progress: dict[str, Any]
    metrics: dict[str, Any]
    error: str | None
