"""A `Task` to and from a published artifact (its params as tensors, everything else in the manifest)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from torch import nn

from adapters_store import artifacts
from server.data.spec import TaskSpec
from server.errors import Incompatible
from server.task import Task

FORMAT = 1


def task_manifest(task: Task, fingerprint: str, metrics: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "kind": "task",
        "name": task.name,
        "version": task.version,
        "method": task.method,
        "spec": dataclasses.asdict(task.spec),
        "meta": task.meta,
        "backbone_fingerprint": fingerprint,
        "metrics": metrics or {},
    }


def publish_task(root: Path, task: Task, fingerprint: str, metrics: dict[str, Any] | None = None) -> dict[str, Any]:
    tensors = {k: p.detach().float() for k, p in task.params.items()}
    return artifacts.publish(artifacts.task_dir(root, task.name, task.version), tensors, task_manifest(task, fingerprint, metrics))


def load_task(folder: Path, fingerprint: str) -> Task:
    """The task in `folder`; refuses a checksum mismatch (CorruptArtifact) or another backbone (Incompatible)."""
    tensors, manifest = artifacts.load(folder)
    if manifest.get("backbone_fingerprint") != fingerprint:
        raise Incompatible(
            f"task {manifest.get('name')!r} v{manifest.get('version')} was made for backbone "
            f"{manifest.get('backbone_fingerprint')}, this server runs {fingerprint}"
        )
    spec = dict(manifest["spec"])
    spec["labels"] = tuple(spec.get("labels", ()))
    params = nn.ParameterDict({k: nn.Parameter(v, requires_grad=False) for k, v in tensors.items()})
    return Task(name=manifest["name"], method=manifest["method"], spec=TaskSpec(**spec), params=params, version=int(manifest["version"]), meta=manifest.get("meta", {}))
