"""Tasks and shared method modules to and from published artifacts (tensors in safetensors,
everything else in the manifest)."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any

from torch import nn

from adapters_store import artifacts
from adapters_store.artifacts import CorruptArtifact
from server.data.spec import TaskSpec
from server.errors import Incompatible
from server.methods import BackboneDims, Method, method_class
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
    spec = dict(manifest["spec"])
    spec["labels"] = tuple(spec.get("labels", ()))
    params = nn.ParameterDict({k: nn.Parameter(v, requires_grad=False) for k, v in tensors.items()})
    return Task(
        name=manifest["name"], method=manifest["method"], spec=TaskSpec(**spec), params=params, version=int(manifest["version"]), meta=manifest.get("meta", {}),
        module_version=int(manifest.get("module_version", 0)),
    )


def module_manifest(method: Method, version: int, fingerprint: str, form_fingerprint: str | None, metrics: dict[str, Any] | None = None) -> dict[str, Any]:
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


def publish_module(root: Path, method: Method, version: int, fingerprint: str, form_fingerprint: str | None, metrics: dict[str, Any] | None = None) -> dict[str, Any]:
    tensors = {k: v.detach().float() for k, v in method.state_dict().items()}
    manifest = module_manifest(method, version, fingerprint, form_fingerprint, metrics)
    return artifacts.publish(artifacts.shared_dir(root, method.method_id, version), tensors, manifest)


def load_module(folder: Path, dims: BackboneDims, fingerprint: str, form_fingerprint: str | None) -> Method:
    """The shared module in `folder`, built with its recorded config; refuses another backbone,
    another form module (IP) or other dims."""
    tensors, manifest = artifacts.load(folder)
    what = f"shared {manifest.get('method')} module v{manifest.get('version')}"
    if manifest.get("backbone_fingerprint") != fingerprint:
        raise Incompatible(f"{what} was made for backbone {manifest.get('backbone_fingerprint')}, this server runs {fingerprint}")
    cls = method_class(manifest["method"])
    if cls.uses_form and manifest.get("form_fingerprint") != form_fingerprint:
        raise Incompatible(f"{what} was made for form module {manifest.get('form_fingerprint')}, this server runs {form_fingerprint}")
    if manifest.get("dims") != dataclasses.asdict(dims):
        raise Incompatible(f"{what} was made for dims {manifest.get('dims')}, this server has {dataclasses.asdict(dims)}")
    config_cls = _config_class(cls)
    config = config_cls(**manifest["config"]) if config_cls is not None else None
    module = cls(dims, config=config)
    try:
        module.load_shared(tensors)
    except RuntimeError as exc:  # missing / unexpected keys or shapes
        raise CorruptArtifact(f"{folder}: {exc}") from exc
    return module


def _config_class(cls: type[Method]) -> type | None:
    """The typed config a method's constructor takes (`config: XConfig | None`)."""
    config_type = typing.get_type_hints(cls.__init__).get("config")
    for arg in typing.get_args(config_type) or (config_type,):
        if dataclasses.is_dataclass(arg):
            return arg
    return None
