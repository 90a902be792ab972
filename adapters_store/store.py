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
import os
import shutil
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

    # ---- moving artifacts between stores -----------------------------------------------------
    def export(self, dest: Path, names: list[str] | None = None) -> list[str]:
        """Copy the current version of ready tasks (all, or `names`) and the shared module versions
        they use into `dest` (artifact folders only, no registry): a store seed such as the
        shipped demo store. Returns what was copied."""
        copied = []
        modules = set()
        for row in self.registry.list_tasks():
            if row["status"] != "ready" or (names is not None and row["name"] not in names):
                continue
            folder = artifacts.task_dir(self.root, row["name"], row["current_version"])
            manifest = artifacts.read_manifest(folder)
            modules.add((manifest["method"], int(manifest.get("module_version", 0))))
            copied.append(_copy(folder, artifacts.task_dir(dest, row["name"], row["current_version"])))
        for method, version in sorted(modules):
            copied.append(_copy(artifacts.shared_dir(self.root, method, version), artifacts.shared_dir(dest, method, version)))
        return copied

    def import_from(self, source: Path) -> list[str]:
        """Register the artifacts of a store seed (`export`'s layout): shared modules first, then
        tasks; each is checksum-verified and copied atomically. A module version already here with
        other weights is refused (with its tasks), never overwritten."""
        source, imported = Path(source), []
        refused: set[tuple[str, int]] = set()
        for folder in sorted(source.glob("shared/*/v*")):
            method, version = folder.parent.name, int(folder.name[1:])
            manifest = artifacts.load(folder)[1]
            target = artifacts.shared_dir(self.root, method, version)
            if target.exists() and artifacts.read_manifest(target).get("sha256") != manifest["sha256"]:
                log.error("seed module %s v%s differs from the store's; its tasks are skipped", method, version)
                refused.add((method, version))
                continue
            _copy(folder, target)
            self.registry.add_module(method, version, str(target.relative_to(self.root)), manifest["sha256"])
            imported.append(f"{method}@{version}")
        for folder in sorted(source.glob("tasks/*/v*")):
            manifest = artifacts.load(folder)[1]
            if (manifest["method"], int(manifest.get("module_version", 0))) in refused or self.registry.exists(manifest["name"]):
                continue
            target = artifacts.task_dir(self.root, manifest["name"], int(manifest["version"]))
            _copy(folder, target)
            self.registry.publish_version(manifest["name"], manifest["method"], int(manifest["version"]), str(target.relative_to(self.root)), manifest["sha256"])
            imported.append(manifest["name"])
        return imported

    def seed(self, source: Path | None) -> list[str]:
        """First start: import `source` when this store holds no task yet."""
        if source is None or not Path(source).is_dir() or self.registry.list_tasks():
            return []
        return self.import_from(source)

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


def _copy(folder: Path, target: Path) -> str:
    """Copy an artifact folder; atomic (temp sibling + rename), a no-op when the target exists."""
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.parent / f".tmp-{target.name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(folder, tmp)
        os.rename(tmp, target)
    return str(target)
