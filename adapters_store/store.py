"""The store facade: artifacts + registry, and `sync()` that makes an engine match the store.

Every process (server, worker, CLI) opens the same root. Publishing = write the artifact folder
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
from server.errors import TaskservError
from server.task import Task

log = logging.getLogger(__name__)


@dataclass
class SyncReport:
    loaded: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


class Store:
    def __init__(self, root: Path, db_url: str | None = None) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        artifacts.sweep_temp(self.root)
        self.registry = Registry(db_url or f"sqlite:///{self.root / 'registry.db'}")

    def close(self) -> None:
        self.registry.close()

    def publish(self, task: Task, fingerprint: str, metrics: dict[str, Any] | None = None) -> dict[str, Any]:
        """Artifact first (atomic), then the registry flips to it in one transaction."""
        manifest = codec.publish_task(self.root, task, fingerprint, metrics)
        path = artifacts.task_dir(self.root, task.name, task.version).relative_to(self.root)
        self.registry.publish_version(task.name, task.method, task.version, str(path), manifest["sha256"])
        return manifest

    def sync(self, engine: Engine) -> SyncReport:
        """Load what the registry has and the engine lacks (or holds at another version); unload
        what the registry no longer has. Idempotent."""
        report = SyncReport()
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
                engine.add_task(codec.load_task(folder, engine.backbone.fingerprint))
                report.loaded.append(name)
            except TaskservError as exc:
                log.error("task %s v%s failed to load: %s", name, row["current_version"], exc.message)
                self.registry.mark_failed(name, exc.message)
                engine.remove_task(name)
                report.failed[name] = exc.message
        return report
