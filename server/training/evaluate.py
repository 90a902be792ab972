"""Metrics of a served task on labelled rows, through the same `Engine.run` path requests take."""

from __future__ import annotations

from collections.abc import Sequence

from server.engine import Engine, Example, Request


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
    """Rank-classification metrics of one task's examples (targets are its label verbalizers)."""
    if not examples:
        return {"accuracy": 0.0, "f1_macro": 0.0, "n": 0}
    task = engine.tasks[examples[0].task]
    predicted: list[str] = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        predicted += [r.label or r.output for r in engine.run([Request(e.task, e.text) for e in chunk])]
    return classification_metrics([e.target for e in examples], predicted, task.spec.labels)
