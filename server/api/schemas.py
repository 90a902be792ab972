"""Request and response bodies of the HTTP API (v1), grouped in schema families. `TaskCreate`
lives with the task-creation rules (`server.creation`), which the worker shares."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Discriminator, Field, Tag

from adapters_store.registry import JOB_STATES
from server.creation import ExampleIn, Strict, TaskCreate, TrainOptions
from server.engine import EngineConfig

__all__ = ["ExampleIn", "JobList", "JobPublic", "JobStatus", "TaskPrompt", "PredictMany", "PredictOne", "PredictRequest", "PredictResult", "PredictResults", "PredictRow", "TaskCreate", "TaskCreated", "TaskList", "TaskPublic", "TrainOptions"]


MAX_NEW_TOKENS = EngineConfig.max_new_tokens
"""The engine refuses more new tokens per row than this (a 422): the schemas say so."""


class PredictRow(Strict):
    task: str = Field(min_length=1, max_length=64)
    text: str = Field(max_length=100_000)


class PredictOptions(Strict):
    max_new_tokens: int | None = Field(default=None, ge=1, le=MAX_NEW_TOKENS)
    return_scores: bool = True


class PredictOne(PredictRow):
    """One row: `task` + `text`."""

    options: PredictOptions = Field(default_factory=PredictOptions)

    def rows(self) -> list[PredictRow]:
        return [self]


class PredictMany(Strict):
    """`inputs`: rows that may mix tasks."""

    inputs: list[PredictRow] = Field(min_length=1, max_length=1024)
    options: PredictOptions = Field(default_factory=PredictOptions)

    def rows(self) -> list[PredictRow]:
        return self.inputs


ONE, MANY = "one row (task + text)", "rows (inputs)"  # the forms' tags: 422 messages start with the form checked


def _predict_form(body: Any) -> str:
    return MANY if isinstance(body, dict) and "inputs" in body else ONE


PredictRequest = Annotated[Annotated[PredictOne, Tag(ONE)] | Annotated[PredictMany, Tag(MANY)], Discriminator(_predict_form)]
"""Either one row (`task` + `text`) or `inputs`: two closed objects, so the schema states the either/or
(`oneOf`), and a body with `inputs` is checked as the many-row form only (its errors name that form's fields)."""


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


JobStatus = Literal[JOB_STATES]  # type: ignore[valid-type]  # the statuses `GET /v1/jobs?status=` filters on


class JobPublic(BaseModel):
    id: str
    task: str
    status: str
    progress: dict[str, Any]
    metrics: dict[str, Any]
    error: str | None


class JobList(BaseModel):
    jobs: list[JobPublic]
