"""Task creation: what `POST /v1/tasks` accepts, and what a job then trains — one set of rules,
used by the API (validate, then answer 201 with a ready task or 202 with a queued job) and by the
worker (train exactly what was accepted, from the job's stored request).

- A request with `examples` is a training job, for methods whose recipe trains; its rows, limits
  and train options are checked before the job is queued (422 naming the field).
- Without examples the task must be useful at once (`Method.ready_without_training`: IP from a
  description, TPV as a sum of existing vectors, a plain task, an explicit prompt).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from server.data.readers import LabeledText
from server.data.spec import TaskSpec, clean_label
from server.engine import Engine
from server.errors import InputTooLong, InvalidRequest
from server.methods import method_ids, recipe_for
from server.settings import Settings
from server.task import TASK_NAME_SCHEMA, Example, Task
from server.training.few_shot import learn
from server.training.trainer import Progress, TrainConfig


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ExampleIn(Strict):
    text: str = Field(max_length=100_000)
    label: str | None = None
    target: str | None = None


class TrainOptions(Strict):
    """Few-shot training knobs (defaults fit a CPU: a 32-example job takes minutes)."""

    steps: int = Field(default=60, ge=1, le=5000)
    batch_size: int = Field(default=8, ge=1, le=64)
    folds: int = Field(default=2, ge=0, le=8, description="cross-validation folds choosing the steps (and whether to train at all); 0: train all steps, no selection")
    lr: float | None = Field(default=None, gt=0, le=1)
    prompt_lr: float | None = Field(default=None, gt=0, le=10)
    seed: int = Field(default=0, ge=0)


Label = Annotated[str, Field(pattern=r"[^\s\x1c-\x1f]", description="a label; kept without surrounding whitespace, so it needs one other character")]
"""The pattern: one character `str.strip` keeps (not whitespace, nor the separators \\x1c-\\x1f, which Python strips
and Unicode regex engines do not count as whitespace)."""


def _registered_methods(schema: dict[str, Any]) -> None:
    schema["enum"] = method_ids()  # read when the schema is generated: plugins registered by then appear


class TaskCreate(Strict):
    name: str = Field(**TASK_NAME_SCHEMA, description="lowercase letters, digits, '_', '.' and '-', starting with a letter or digit, no '..'")
    method: str = Field(json_schema_extra=_registered_methods)
    description: str = Field(default="", max_length=2000)
    labels: list[Label] | None = Field(default=None, max_length=100, json_schema_extra={"uniqueItems": True})  # distinct: TaskSpec checks
    template: str | None = Field(default=None, max_length=4000, pattern=r"\{text\}", description="the input's template; must contain {text}")
    scoring: Literal["first", "sum", "mean"] = "first"
    examples: list[ExampleIn] | None = Field(default=None, max_length=10_000)
    init: dict[str, Any] = Field(default_factory=dict)
    train: TrainOptions = Field(default_factory=TrainOptions)

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        if value not in method_ids():
            raise ValueError(f"unknown method {value!r}; known: {method_ids()}")
        return value

    def spec(self, seq2seq: bool) -> TaskSpec:
        """The task's spec; without a template, the default one, which carries the description."""
        labels = tuple(self.labels or ())
        if self.template is None:
            return TaskSpec.default(self.description, labels, seq2seq=seq2seq, scoring=self.scoring)
        return TaskSpec(template=self.template, labels=labels, description=self.description, scoring=self.scoring)

    def training_rows(self, spec: TaskSpec) -> list[LabeledText]:
        """(text, label or target text) per example; InvalidRequest names the bad one."""
        rows = []
        for i, example in enumerate(self.examples or []):
            if spec.is_classification:
                if example.label is None or clean_label(example.label) not in spec.labels:
                    raise InvalidRequest(f"examples[{i}].label: must be one of {list(spec.labels)}, got {example.label!r}")
                rows.append(LabeledText(example.text, clean_label(example.label)))
            else:
                if not example.target:
                    raise InvalidRequest(f"examples[{i}].target: a task without labels needs target texts")
                rows.append(LabeledText(example.text, example.target))
        return rows

    def train_config(self) -> TrainConfig:
        t = self.train
        try:
            return TrainConfig.for_job(steps=t.steps, batch_size=t.batch_size, lr=t.lr, prompt_lr=t.prompt_lr, seed=t.seed)
        except ValueError as exc:
            raise InvalidRequest(f"train.{exc}") from None


@dataclass
class Creation:
    """An accepted request: the task's spec, its resolved init and, for a job, its training rows."""

    body: TaskCreate
    spec: TaskSpec
    init: dict[str, Any]
    rows: list[LabeledText] | None = None

    @property
    def trains(self) -> bool:
        return self.rows is not None


def prepare(body: TaskCreate, engine: Engine, settings: Settings) -> Creation:
    """Check a creation request against the engine and the settings' limits (422s name the field)."""
    spec = body.spec(engine.backbone.is_encoder_decoder)
    method = engine.tasks.method(body.method)
    try:  # init is method-specific free-form JSON: malformed values are the caller's error, not a 500
        init = method.resolve_init(body.init, engine.tasks.snapshot())
    except (TypeError, ValueError) as exc:
        raise InvalidRequest(f"init: {exc}") from None
    if not body.examples:
        if not method.ready_without_training(spec, init):
            raise InvalidRequest(f"examples: a {body.method} task with this init needs training examples")
        return Creation(body, spec, init)
    if not recipe_for(body.method).trains:
        raise InvalidRequest(f"examples: {body.method} tasks do not train; leave the examples out")
    rows = body.training_rows(spec)
    if not 2 <= len(rows) <= settings.max_examples:
        raise InvalidRequest(f"examples: give between 2 and {settings.max_examples} examples, got {len(rows)}")
    size = sum(len(r.text.encode()) + len(r.label.encode()) for r in rows)
    if size > settings.max_examples_bytes:
        raise InputTooLong(f"examples: {size} bytes of text, limit {settings.max_examples_bytes} (TASKSERVE_MAX_EXAMPLES_BYTES)")
    if body.train.steps > settings.max_train_steps:
        raise InvalidRequest(f"train.steps: at most {settings.max_train_steps}")
    body.train_config()  # options that fit no TrainConfig are refused now, not when the job runs
    return Creation(body, spec, init, rows)


def ready_task(creation: Creation, engine: Engine) -> Task:
    """The task of a request that needs no training (version 1, not yet published)."""
    try:
        return engine.tasks.new(creation.body.name, creation.body.method, creation.spec, init=creation.init)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise InvalidRequest(f"init: {exc}") from None


def train_job(
    creation: Creation,
    engine: Engine,
    *,
    on_progress: Callable[[str, Progress], None] | None = None,
    checkpoints: Path | None = None,
    should_stop: Callable[[], bool] | None = None,
    autocast: str = "auto",
) -> tuple[Task, dict[str, Any]]:
    """Train an accepted job's task (`training.few_shot.learn`: selection by cross-validation over
    the examples, the zero-shot guard); returns the task to publish (host tensors) and the metrics
    its job and manifest record — what the selection weighed, what it chose and why. `autocast`:
    the worker's `train_autocast` (TrainConfig.autocast)."""
    body = creation.body
    rows = [Example(body.name, r.text, r.label) for r in creation.rows or []]
    config = replace(body.train_config(), autocast=autocast)
    started = time.monotonic()
    learned = learn(
        engine, body.name, body.method, creation.spec, rows, creation.init, config,
        folds=body.train.folds, on_progress=on_progress, checkpoints=checkpoints, should_stop=should_stop,
    )
    metrics = {
        "examples": len(rows),
        "folds": learned.folds,
        "chosen": learned.chosen,
        "method": learned.task.method,
        "steps_trained": learned.steps,
        "validation": learned.validation,
        "selection": learned.selection,
        **({"final_fit": learned.final_fit} if learned.final_fit else {}),
        "seconds": round(time.monotonic() - started, 1),
        "training_dtype": "bfloat16 autocast" if config.mixed_precision(engine.backbone.device) else str(engine.backbone.dtype).removeprefix("torch."),
        **({"notes": learned.notes} if learned.notes else {}),
    }
    return learned.task, metrics
