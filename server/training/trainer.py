"""One training loop for every method: only the parameters handed in get gradients.

The backbone is frozen; what trains is whatever the caller (a recipe) passes: per-task tensors
(soft prompts, task vectors, PHA prototypes, per-task IP nets) and/or shared modules (IP nets,
PHA's retriever + hypernetwork + shared adapters, ATTEMPT's attention module). The seeds' recipe:
AdamW with linear warmup then linear decay, gradient clipping, lr 0.3 for soft prompts and 3e-4
for networks, mini-batches that mix tasks (ATTEMPT §3.3), validation with best-checkpoint
selection (accuracy; ties go to the lower validation misfit), bf16 autocast where bf16 is native (`autocast`). Optionally
(`average`) an exponential moving average of the weights is what is evaluated and kept. A periodic
checkpoint (atomic) lets a restarted job resume.
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from server.configs import require
from server.engine import Engine
from server.errors import Cancelled, InvalidRequest
from server.settings import bf16_native
from server.methods.recipe import Trainable
from server.task import Example, Task
from server.training import checkpoints
from server.training.evaluate import evaluate, misfit

__all__ = ["Cancelled", "Progress", "TrainConfig", "TrainResult", "Trainable", "train"]


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 300
    """Optimiser steps (each one mini-batch)."""
    batch_size: int = 8
    """Rows per mini-batch; tasks are drawn uniformly per row, then a row of that task."""
    lr: float = 1e-3
    """Networks (IP nets, PHA hypernetwork, ATTEMPT attention). Seeds 000 and 003 use 3e-4 over
    tens of thousands of steps; our CPU budgets are hundreds of steps, so the default is higher."""
    prompt_lr: float | None = None
    """Soft prompts and task vectors, absolute. None (the default): `prompt_lr_relative` × the RMS
    of the backbone's embedding entries — Adam moves each entry by about the learning rate per step,
    so the step is a fixed share of a token embedding's scale on any backbone. (Lester et al., ATTEMPT
    and TPV use 0.3 on T5; on SmolLM2, whose entries have RMS 0.136, 0.3 made prompt rows grow ~10×
    beyond any token embedding and collapse to one label.)"""
    prompt_lr_relative: float = 0.03
    """The soft-prompt learning rate in units of the embedding RMS, when `prompt_lr` is None."""
    prototype_lr: float = 1e-2
    """A new PHA task's prototype when it trains alone against the frozen hypernetwork (few-shot)."""
    warmup_ratio: float = 0.06
    """Share of the steps over which the learning rate rises linearly from 0; it then decays linearly to 0."""
    weight_decay: float = 1e-5
    """AdamW's decoupled weight decay."""
    max_grad_norm: float = 1.0
    """Gradients are clipped to this global L2 norm."""
    eval_every: int = 50
    """Validate (and consider the step for best-step selection) every this many steps, and at the end."""
    eval_rows: int = 200
    """Validation rows per task per evaluation (the first ones: the same rows every time)."""
    checkpoint_every: int = 50
    """Write the resumable checkpoint every this many steps, and at the end."""
    seed: int = 0
    """Seed of the mini-batch draws (with the step number), so a resumed run draws what the uninterrupted one would."""
    autocast: Literal["auto", "bfloat16", "off"] = "auto"
    """Mixed precision of the training forward and backward (the trained values, their gradients and
    the optimiser state stay fp32; validation runs without it): `auto` is bf16 autocast where bf16 is
    native — CUDA, a CPU with AVX-512-BF16 / AMX (~1.4x faster jobs there) — as the server's
    `train_autocast` resolves it (`settings.bf16_native`); `bfloat16` turns it on anywhere."""
    average: float = 0.0
    """Decay of an exponential moving average of the trained values (Polyak averaging). When > 0
    the average, not the last iterate, is what each evaluation scores, what best-step selection
    keeps and what the run returns; 0 (the default) keeps the raw iterates."""

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "eval_every", "eval_rows", "checkpoint_every"):
            require(getattr(self, name) >= 1, name, "must be >= 1")
        for name in ("lr", "prompt_lr_relative", "prototype_lr", "max_grad_norm"):
            require(getattr(self, name) > 0, name, "must be > 0")
        require(self.prompt_lr is None or self.prompt_lr > 0, "prompt_lr", "must be > 0 or None")
        require(0 <= self.warmup_ratio < 1, "warmup_ratio", "must be in [0, 1)")
        require(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        require(self.seed >= 0, "seed", "must be >= 0")
        require(0 <= self.average < 1, "average", "must be in [0, 1)")
        require(self.autocast in ("auto", "bfloat16", "off"), "autocast", "must be auto, bfloat16 or off")

    @classmethod
    def for_job(cls, *, steps: int = 60, batch_size: int = 8, lr: float | None = None, prompt_lr: float | None = None, seed: int = 0) -> TrainConfig:
        """What a few-shot job trains with (`POST /v1/tasks`'s train options; also what
        `taskserve eval --few-shot` measures): six evaluation points for the selection."""
        return cls(
            steps=steps, batch_size=batch_size, lr=lr or cls.lr, prompt_lr=prompt_lr,
            eval_every=max(5, steps // 6), checkpoint_every=max(10, steps // 10), seed=seed,
        )

    def mixed_precision(self, device: torch.device) -> bool:
        """Whether training steps on `device` run under bf16 autocast."""
        return self.autocast == "bfloat16" or (self.autocast == "auto" and bf16_native(device.type))

    def prompt_lr_for(self, embedding: torch.Tensor) -> float:
        """The soft-prompt learning rate on a backbone with this input embedding table [vocab, d]."""
        if self.prompt_lr is not None:
            return self.prompt_lr
        return self.prompt_lr_relative * float(embedding.detach().float().pow(2).mean().sqrt())


@dataclass
class Progress:
    step: int
    total: int
    loss: float
    metrics: dict[str, float] | None = None  # validation average, when just evaluated


@dataclass
class TrainResult:
    steps: int
    best_step: int
    best_score: float | None
    """Mean validation accuracy at the selected step (None without validation rows)."""
    validation: dict[str, dict[str, float]] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)


def train(
    engine: Engine,
    tasks: Sequence[Task],
    train_rows: Mapping[str, Sequence[Example]],
    validation_rows: Mapping[str, Sequence[Example]],
    trainables: Sequence[Trainable],
    config: TrainConfig = TrainConfig(),
    on_progress: Callable[[Progress], None] | None = None,
    checkpoint: Path | None = None,
    should_stop: Callable[[], bool] | None = None,
    *,
    eval_at_start: bool = False,
    stop_at: int | None = None,
    stop_when: Callable[[int, dict[str, float]], bool] | None = None,
) -> TrainResult:
    """Train `trainables` on the tasks' rows (the tasks must be in the engine). On return the
    parameters hold the best validation step's values (the last step's without validation rows)
    and the engine serves them. `eval_at_start` validates the untrained start too (step 0 in the
    history, a candidate for the best step); `stop_at` stops after that many steps of the schedule
    made for `config.steps` (a final fit that replays a selected prefix of a longer run);
    `stop_when(steps_done, validation)`, asked after each validation, ends training there — a
    stopping rule, so the values returned are the last step's, not the best validation step's."""
    names = [t.name for t in tasks if train_rows.get(t.name)]
    if not names:
        raise InvalidRequest("examples: training needs at least one task with training rows")
    last = min(config.steps, stop_at) if stop_at is not None else config.steps
    for t in trainables:
        t.param.requires_grad_(True)
    lrs = {"prompt": config.prompt_lr_for(engine.backbone.embedding.weight), "net": config.lr, "prototype": config.prototype_lr}
    groups = [{"params": [t.param for t in trainables if t.kind == kind], "lr": lr} for kind, lr in lrs.items()]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=config.weight_decay)
    warmup = max(1, int(config.warmup_ratio * config.steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min((s + 1) / warmup, max(0.0, (config.steps - s) / max(1, config.steps - warmup))))
    state = _State(best_score=None, best_step=0, best_values=None, history=[])
    average = _Average(trainables, config.average) if config.average else None
    start = _resume(checkpoint, trainables, optimizer, schedule, state, average) if checkpoint else 0
    device = engine.backbone.device
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if config.mixed_precision(device) else contextlib.nullcontext()

    def validate(done: int, loss_value: float) -> dict[str, float]:
        with average.installed() if average else contextlib.nullcontext():
            return _validated(done, loss_value)

    def _validated(done: int, loss_value: float) -> dict[str, float]:
        _refresh(engine, tasks)
        per_task = {n: evaluate(engine, list(validation_rows[n])[: config.eval_rows]) for n in names if validation_rows.get(n)}
        score = sum(m["accuracy"] for m in per_task.values()) / max(1, len(per_task))
        val_loss = sum(misfit(engine, list(validation_rows[n])[: config.eval_rows], m) for n, m in per_task.items()) / max(1, len(per_task))
        rows = sum(int(m["n"]) for m in per_task.values())
        state.history.append({"step": done, "loss": loss_value, "val_accuracy": score, "val_loss": val_loss, "val_rows": rows})
        # accuracy on a few validation rows ties often: the lower misfit (evaluate.misfit) breaks the tie
        if state.best_score is None or (score, -val_loss) > (state.best_score, -state.best_loss):
            state.best_score, state.best_loss, state.best_step = score, val_loss, done
            state.best_values = [t.param.detach().clone() for t in trainables]
        return {"val_accuracy": score, "val_loss": val_loss}

    if eval_at_start and validation_rows and start == 0:
        with torch.no_grad():
            validate(0, math.nan)
    if stop_when is not None and state.history and state.history[-1]["step"] == start and stop_when(start, state.history[-1]):
        last = start  # resumed where the rule had already stopped it
    loss_value = math.nan
    for step in range(start, last):
        if should_stop is not None and should_stop():
            raise Cancelled("training was cancelled")
        batch = _mixed_batch(train_rows, names, config.batch_size, random.Random(config.seed * 1_000_003 + step))
        with autocast:
            loss = engine.loss(batch)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([t.param for t in trainables], config.max_grad_norm)
        optimizer.step()
        schedule.step()
        if average:
            average.update()
        loss_value = float(loss.detach())
        done = step + 1
        metrics = None
        if validation_rows and (done % config.eval_every == 0 or done == last):
            metrics = validate(done, loss_value)
        if on_progress is not None:
            on_progress(Progress(done, last, loss_value, metrics))
        if checkpoint and (done % config.checkpoint_every == 0 or done == last):
            _save(checkpoint, done, trainables, optimizer, schedule, state, average)
        if stop_when is not None and metrics is not None and stop_when(done, metrics):
            last = done
            break
    keep_best = state.best_values is not None and stop_when is None  # a stopping rule keeps where it stopped
    if keep_best:
        _assign(trainables, state.best_values)
    elif average:
        _assign(trainables, average.values)
    for t in trainables:
        t.param.requires_grad_(False)
    _refresh(engine, tasks)
    validation = {n: evaluate(engine, list(validation_rows[n])[: config.eval_rows]) for n in names if validation_rows.get(n)}
    best = state.best_step if keep_best else last
    return TrainResult(last, best, state.best_score, validation, state.history)


@dataclass
class _State:
    best_score: float | None
    best_step: int
    best_values: list[torch.Tensor] | None
    history: list[dict[str, Any]]
    best_loss: float = math.inf


class _Average:
    """An exponential moving average of the trained values, updated after every optimiser step;
    `installed()` puts it in the parameters for a while (an evaluation), then the iterates return."""

    def __init__(self, trainables: Sequence[Trainable], decay: float) -> None:
        self.trainables, self.decay = trainables, decay
        self.values = [t.param.detach().clone() for t in trainables]

    @torch.no_grad()
    def update(self) -> None:
        for value, t in zip(self.values, self.trainables):
            value.lerp_(t.param.detach(), 1 - self.decay)

    @contextlib.contextmanager
    def installed(self):
        iterates = [t.param.detach().clone() for t in self.trainables]
        _assign(self.trainables, self.values)
        try:
            yield
        finally:
            _assign(self.trainables, iterates)


@torch.no_grad()
def _assign(trainables: Sequence[Trainable], values: Sequence[torch.Tensor]) -> None:
    """Copy `values` into the trainables' parameters, in order."""
    for t, value in zip(trainables, values):
        t.param.copy_(value)


def _mixed_batch(rows: Mapping[str, Sequence[Example]], names: list[str], size: int, rng: random.Random) -> list[Example]:
    """Tasks drawn uniformly per row, then a row of that task: small tasks are not drowned out."""
    return [rng.choice(rows[rng.choice(names)]) for _ in range(size)]


def _refresh(engine: Engine, tasks: Sequence[Task]) -> None:
    """The engine's cached per-task tensors (statics) follow the trained values."""
    for task in tasks:
        engine.tasks.refresh(task.name)


AVERAGE = "average:"  # checkpoint value names of the moving average (no trainable's name has a colon)


def _save(path: Path, step: int, trainables: Sequence[Trainable], optimizer, schedule, state: _State, average: _Average | None) -> None:
    bookkeeping = {"best_score": state.best_score, "best_step": state.best_step, "history": state.history, "best_loss": state.best_loss}
    values = {t.name: t.param for t in trainables} | ({AVERAGE + t.name: v for t, v in zip(trainables, average.values)} if average else {})
    checkpoints.save(path, step, values, optimizer.state_dict(), schedule.state_dict(), bookkeeping, state.best_values)


def _resume(path: Path, trainables: Sequence[Trainable], optimizer, schedule, state: _State, average: _Average | None) -> int:
    saved = checkpoints.load(path)
    if saved is None:
        return 0
    _assign(trainables, [saved["values"][t.name].to(t.param.device) for t in trainables])
    if average:
        average.values = [saved["values"][AVERAGE + t.name].to(t.param.device) for t in trainables]
    optimizer.load_state_dict(saved["optimizer"])
    schedule.load_state_dict(saved["schedule"])
    book = saved["state"]
    state.best_score, state.best_step, state.history = book["best_score"], book["best_step"], book["history"]
    state.best_loss = book.get("best_loss", math.inf)
    if saved["best"] is not None:
        state.best_values = [v.to(t.param.device) for v, t in zip(saved["best"], trainables)]
    return saved["step"]
