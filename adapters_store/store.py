"""The store facade: artifacts + registry, and `sync()` that makes an engine match the store.

Every process (server, worker, CLI) opens the same root and `attach`es its engine: the store's
shared method modules replace the engine's built-in ones (or, in a fresh store, the built-in ones
are published as v1). Publishing = write the artifact folder
atomically, then flip the registry row. A serving process calls `sync(engine)` periodically
(hot-loading): new and updated tasks are loaded, deleted ones unloaded, and a task whose artifact is
corrupt or made for another backbone is marked `failed` without affecting any other task.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapters_store import artifacts, codec
from adapters_store.registry import Registry
from server.engine import Engine
from server.errors import Conflict, Incompatible, TaskservError
from server.methods import Method
from server.task import Task

log = logging.getLogger(__name__)


@dataclass
class SyncReport:
    loaded: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    modules: list[str] = field(default_factory=list)  # "method@version" made current


class Store:
    def __init__(self, root: Path, db_url: str | None = None) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        artifacts.sweep_temp(self.root)
        self.registry = Registry(db_url or f"sqlite:///{self.root / 'registry.db'}")

    def close(self) -> None:
        self.registry.close()

    # ---- publishing ----------------------------------------------------------------------------
    def publish(self, task: Task, fingerprint: str, metrics: dict[str, Any] | None = None) -> dict[str, Any]:
        """Artifact first (atomic), then the registry flips to it in one transaction. The shared
        module version the task was made with must be in the store already."""
        if not self.registry.module_exists(task.method, task.module_version):
            raise Incompatible(
                f"task {task.name!r} was made with shared {task.method} module v{task.module_version}, which this store "
                "does not hold; publish the module first (Store.attach publishes an engine's built-in modules)"
            )
        manifest = codec.publish_task(self.root, task, fingerprint, metrics)
        path = artifacts.task_dir(self.root, task.name, task.version).relative_to(self.root)
        self.registry.publish_version(task.name, task.method, task.version, str(path), manifest["sha256"])
        return manifest

    def publish_module(self, engine: Engine, method_id: str, module: Method, metrics: dict[str, Any] | None = None) -> int:
        """Publish `module` as the next version of `method_id`'s shared module; returns the version.
        Tasks already published keep the version they were made with."""
        version = self.registry.current_modules().get(method_id, 0) + 1
        manifest = codec.publish_module(self.root, module, version, engine.backbone.fingerprint, engine.form_fingerprint, metrics)
        path = artifacts.shared_dir(self.root, method_id, version).relative_to(self.root)
        if not self.registry.add_module(method_id, version, str(path), manifest["sha256"]):
            raise Conflict(f"shared {method_id} module v{version} was published concurrently; retry")
        return version

    # ---- serving -------------------------------------------------------------------------------
    def attach(self, engine: Engine) -> SyncReport:
        """Bind an engine to this store: methods the store holds no module for get the engine's
        built-in one published as v1 (seeded, so every process would publish the same); then sync."""
        held = self.registry.current_modules()
        for method_id, module in engine.methods.items():
            if method_id in held or engine.module_versions[method_id] != 0:
                continue
            manifest = codec.publish_module(self.root, module, 1, engine.backbone.fingerprint, engine.form_fingerprint)
            path = artifacts.shared_dir(self.root, method_id, 1).relative_to(self.root)
            self.registry.add_module(method_id, 1, str(path), manifest["sha256"])  # False: another process won; same weights
        return self.sync(engine)

    def sync(self, engine: Engine) -> SyncReport:
        """Make the engine match the registry: current shared modules, then tasks — load what it
        lacks (or holds at another version), unload what the registry no longer has. Idempotent."""
        report = SyncReport()
        for method_id, version in self.registry.current_modules().items():
            if method_id in engine.methods and engine.module_versions[method_id] != version:
                try:
                    engine.set_module(method_id, version, self._load_module(engine, method_id, version))
                    report.modules.append(f"{method_id}@{version}")
                except TaskservError as exc:  # its tasks fail to load below, each with a clear error
                    log.error("shared %s module v%s failed to load: %s", method_id, version, exc.message)
        wanted = {row["name"]: row for row in self.registry.list_tasks() if row["status"] == "ready" and row["current_version"]}
        served = engine.tasks
        for name in served.keys() - wanted.keys():
            engine.remove_task(name)
            report.removed.append(name)
        for name, row in wanted.items():
            if name in served and served[name].version == row["current_version"]:
                continue
            folder = artifacts.task_dir(self.root, name, row["current_version"])
            try:
                task = codec.load_task(folder, engine.backbone.fingerprint)
                if not engine.has_module(task.method, task.module_version):
                    engine.set_module(task.method, task.module_version, self._load_module(engine, task.method, task.module_version), current=False)
                engine.add_task(task)
                report.loaded.append(name)
            except TaskservError as exc:
                log.error("task %s v%s failed to load: %s", name, row["current_version"], exc.message)
                self.registry.mark_failed(name, exc.message)
                engine.remove_task(name)
                report.failed[name] = exc.message
        return report

    def _load_module(self, engine: Engine, method_id: str, version: int) -> Method:
        folder = artifacts.shared_dir(self.root, method_id, version)
        return codec.load_module(folder, engine.dims, engine.backbone.fingerprint, engine.form_fingerprint)
