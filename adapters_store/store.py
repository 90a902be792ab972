"""The store facade: artifacts + registry, for every process (server, worker, CLI) on one root.

Publishing = write the artifact folder atomically, then flip the registry row. `export` /
`import_from` / `seed` move artifact folders between stores (the shipped `demo_store/` is a seed).
The store knows artifacts and the registry, never the engine: binding an engine to a store (and
hot-loading what others publish) is `server/store_sync.py`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from torch import nn

from adapters_store import artifacts, codec
from adapters_store.registry import Registry
from server.atomic import copy_folder
from server.errors import Conflict, Incompatible
from server.task import Task

log = logging.getLogger(__name__)


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

    def next_version(self, name: str) -> int:
        """The version to publish `name` as next: past every version the registry lists and every
        version folder on disk. Deleting a task leaves its folders (until garbage-collected), so a
        new task of that name never reuses one — a reused folder would keep the old manifest."""
        folders = artifacts.task_dir(self.root, name, 0).parent.glob("v*")
        on_disk = max((int(f.name[1:]) for f in folders if f.name[1:].isdigit()), default=0)
        return max(self.registry.next_version(name), on_disk + 1)

    def publish_module(self, module: nn.Module, fingerprint: str, form_fingerprint: str | None, metrics: dict[str, Any] | None = None, *, version: int | None = None) -> int:
        """Publish a method's shared module (`module.method_id`) as `version` (default: the next
        one); returns the version. Tasks already published keep the version they were made with.
        False from the registry (the version exists already) is a conflict, unless it holds these
        very weights (two processes publishing the same built-in module)."""
        method_id = module.method_id
        version = version or self.registry.current_modules().get(method_id, 0) + 1
        manifest = codec.publish_module(self.root, module, version, fingerprint, form_fingerprint, metrics)
        path = artifacts.shared_dir(self.root, method_id, version).relative_to(self.root)
        if not self.registry.add_module(method_id, version, str(path), manifest["sha256"]) and self.registry.module_sha256(method_id, version) != manifest["sha256"]:
            raise Conflict(f"shared {method_id} module v{version} was published concurrently; retry")
        return version

    def module_folder(self, method_id: str, version: int) -> Path:
        return artifacts.shared_dir(self.root, method_id, version)

    def task_folder(self, name: str, version: int) -> Path:
        return artifacts.task_dir(self.root, name, version)

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
            copied.append(str(copy_folder(folder, artifacts.task_dir(dest, row["name"], row["current_version"]))))
        for method, version in sorted(modules):
            copied.append(str(copy_folder(artifacts.shared_dir(self.root, method, version), artifacts.shared_dir(dest, method, version))))
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
            copy_folder(folder, target)
            self.registry.add_module(method, version, str(target.relative_to(self.root)), manifest["sha256"])
            imported.append(f"{method}@{version}")
        for folder in sorted(source.glob("tasks/*/v*")):
            manifest = artifacts.load(folder)[1]
            if (manifest["method"], int(manifest.get("module_version", 0))) in refused or self.registry.exists(manifest["name"]):
                continue
            target = artifacts.task_dir(self.root, manifest["name"], int(manifest["version"]))
            copy_folder(folder, target)
            self.registry.publish_version(manifest["name"], manifest["method"], int(manifest["version"]), str(target.relative_to(self.root)), manifest["sha256"])
            imported.append(manifest["name"])
        return imported

    def seed(self, source: Path | None) -> list[str]:
        """First start: import `source` when this store holds no task yet."""
        if source is None or not Path(source).is_dir() or self.registry.list_tasks():
            return []
        return self.import_from(source)
