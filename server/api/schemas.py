"""Request and response bodies of the HTTP API (v1), grouped in schema families. `TaskCreate`
lives with the task-creation rules (`server.creation`), which the worker shares."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field, model_validator

from server.creation import ExampleIn, Strict, TaskCreate, TrainOptions

__all__ = ["ExampleIn", "JobList", "JobPublic", "TaskPrompt", "PredictRequest", "PredictResult", "PredictResults", "PredictRow", "TaskCreate", "TaskCreated", "TaskList", "TaskPublic", "TrainOptions"]


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


class TaskPrompt(BaseModel):
    name: str
    method: str
    version: int
    seq2seq: bool
    """Whether the backbone is encoder-decoder (a PEFT export then writes SEQ_2_SEQ_LM)."""
    backbone: str
    """The served backbone's fingerprint."""
    prompt: list[list[float]]
    """[m, d] the soft prompt the task prepends to every input."""


class JobPublic(BaseModel):
    id: str
    task: str
    status: str
    progress: dict[str, Any]
    metrics: dict[str, Any]
    error: str | None


class JobList(BaseModel):
    jobs: list[JobPublic]
