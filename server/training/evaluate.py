"""Metrics of a served task on labelled rows, through the same `Engine.run` path requests take."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from server.data.spec import clean_label
from server.engine import Engine
from server.task import Example, Request


def classification_metrics(gold: Sequence[str], predicted: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """Accuracy and macro-F1 over `labels` (a label never predicted nor gold counts as F1 0)."""
    n = len(gold)
    if n == 0:
        return {"accuracy": 0.0, "f1_macro": 0.0, "n": 0}
    accuracy = sum(g == p for g, p in zip(gold, predicted)) / n
    f1s = []
    for label in labels:
        tp = sum(g == label and p == label for g, p in zip(gold, predicted))
        fp = sum(g != label and p == label for g, p in zip(gold, predicted))
        fn = sum(g == label and p != label for g, p in zip(gold, predicted))
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return {"accuracy": accuracy, "f1_macro": sum(f1s) / len(f1s), "n": n}


def evaluate(engine: Engine, examples: Sequence[Example], batch_size: int = 32) -> dict[str, float]:
    """Rank-classification metrics of one task's examples (targets are its label verbalizers);
    for classification also `nll`, the gold label's mean cross-entropy among the labels."""
    if not examples:
        return {"accuracy": 0.0, "f1_macro": 0.0, "n": 0}
    task = engine.tasks[examples[0].task]
    results = []
    for start in range(0, len(examples), batch_size):
        results += engine.run([Request(e.task, e.text) for e in examples[start : start + batch_size]])
    gold = [clean_label(e.target) if task.spec.is_classification else e.target for e in examples]
    metrics = classification_metrics(gold, [r.label or r.output for r in results], task.spec.labels)
    if task.spec.is_classification:
        metrics["nll"] = -sum(math.log(max(r.scores[g], 1e-12)) for r, g in zip(results, gold)) / len(examples)
    return metrics


@torch.no_grad()
def misfit(engine: Engine, examples: Sequence[Example], metrics: dict[str, float] | None = None, batch_size: int = 32) -> float:
    """How badly one task fits labelled rows (lower is better). Classification: `evaluate`'s `nll`
    — what rank classification decides by; a prompt that merely puts mass on the label words gets
    no credit for it — taken from `metrics` when evaluate already ran. Generative: the targets'
    teacher-forced token loss, row-weighted over chunks of `batch_size` rows."""
    if not examples:
        return 0.0
    if engine.tasks[examples[0].task].spec.is_classification:
        return (metrics if metrics is not None else evaluate(engine, examples, batch_size))["nll"]
    chunks = [list(examples[i : i + batch_size]) for i in range(0, len(examples), batch_size)]
    return sum(float(engine.loss(c)["lm"]) * len(c) for c in chunks) / len(examples)
