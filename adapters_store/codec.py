"""Tasks and shared method modules to and from published artifacts (tensors in safetensors,
everything else in the manifest). The store knows tasks as data (`server.task.Task`) and modules
only as their state dict and config; it never builds a method or touches an engine."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from torch import nn

from adapters_store import artifacts
from server.data.spec import TaskSpec
from server.errors import CorruptArtifact, Incompatible
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
        "module_version": task.module_version,
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
    try:
        spec = dict(manifest["spec"])
        spec["labels"] = tuple(spec.get("labels", ()))
        params = nn.ParameterDict({k: nn.Parameter(v, requires_grad=False) for k, v in tensors.items()})
        return Task(
            name=manifest["name"], method=manifest["method"], spec=TaskSpec(**spec), params=params, version=int(manifest["version"]), meta=manifest.get("meta", {}),
            module_version=int(manifest.get("module_version", 0)),
        )
    except (KeyError, TypeError, ValueError) as exc:  # a manifest missing a field, or one of the wrong type
        raise CorruptArtifact(f"{folder}: malformed task manifest ({type(exc).__name__}: {exc})") from exc


def module_manifest(method: nn.Module, version: int, fingerprint: str, form_fingerprint: str | None, metrics: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "kind": "module",
        "method": method.method_id,
        "version": version,
        "config": dataclasses.asdict(method.config) if dataclasses.is_dataclass(method.config) else {},
        "dims": dataclasses.asdict(method.dims),
        "backbone_fingerprint": fingerprint,
        "form_fingerprint": form_fingerprint if method.uses_form else None,
        "metrics": metrics or {},
    }


def publish_module(root: Path, method: nn.Module, version: int, fingerprint: str, form_fingerprint: str | None, metrics: dict[str, Any] | None = None) -> dict[str, Any]:
    tensors = {k: v.detach().float() for k, v in method.state_dict().items()}
    manifest = module_manifest(method, version, fingerprint, form_fingerprint, metrics)
    return artifacts.publish(artifacts.shared_dir(root, method.method_id, version), tensors, manifest)


def read_module(folder: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """A published shared module's tensors and manifest (checksum verified); building the module
    from them, and checking it fits an engine, is the engine side's (`server.store_sync`)."""
    tensors, manifest = artifacts.load(folder)
    if manifest.get("kind") != "module":
        raise CorruptArtifact(f"{folder}: not a shared-module artifact")
    return tensors, manifest
