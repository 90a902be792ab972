"""Binding an engine to a store, and hot-loading: the one place that knows both.

Every process (server, worker, CLI) `attach`es its engine to the store it opens: methods the store
holds no shared module for get the engine's built-in one published as v1 (seeded, so every process
would publish the same weights); then `sync`. A serving process calls `sync` periodically: the
store's current shared modules are installed, new and updated tasks loaded, deleted ones unloaded,
and a task whose artifact is corrupt or made for another backbone is marked `failed` without
affecting any other task. Idempotent.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any

from adapters_store import codec
from adapters_store.store import Store
from server.engine import Engine
from server.errors import CorruptArtifact, Incompatible, TaskservError, Unavailable
from server.methods import BackboneDims, Method, method_class
from server.task import Request

log = logging.getLogger(__name__)


@dataclass
class SyncReport:
    loaded: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    modules: list[str] = field(default_factory=list)  # "method@version" made current


def attach(store: Store, engine: Engine) -> SyncReport:
    """Bind `engine` to `store` (built-in modules published as v1 where the store has none), then sync."""
    held = store.registry.current_modules()
    for method_id, module in engine.methods.items():
        if method_id not in held and engine.tasks.versions[method_id] == 0:
            store.publish_module(module, engine.backbone.fingerprint, engine.form_fingerprint, version=1)
    return sync(store, engine)


Seen = tuple[dict[str, int], list[dict[str, Any]]]  # the registry as `sync` compares with it


def read_registry(store: Store) -> Seen:
    """What `sync` compares the engine with: the current shared module versions and every task row
    (a failed one with its published `versions`, for the fallback to the last good one)."""
    rows = store.registry.list_tasks()
    for row in rows:
        if row["status"] == "failed" and row["current_version"]:
            row["versions"] = store.registry.versions(row["name"])
    return store.registry.current_modules(), rows


def sync(store: Store, engine: Engine, seen: Seen | None = None) -> SyncReport:
    """Make the engine match the registry: current shared modules, then tasks — load what it lacks
    (or holds at another version), unload what the registry no longer has. `seen`: the registry as
    `read_registry` read it beforehand — a serving process reads it off its engine thread, so a
    registry that hangs never stalls a batch; without it, it is read here."""
    report = SyncReport()
    table = engine.tasks
    modules, task_rows = seen if seen is not None else read_registry(store)
    for method_id, version in modules.items():
        if method_id in table.versions and table.versions[method_id] != version:
            try:
                table.set_module(method_id, version, load_module(store, engine, method_id, version))
                report.modules.append(f"{method_id}@{version}")
            except TaskservError as exc:  # its tasks fail to load below, each with a clear error
                log.error("shared %s module v%s failed to load: %s", method_id, version, exc.message)
    rows = {row["name"]: row for row in task_rows}
    wanted = {name: row for name, row in rows.items() if row["status"] == "ready" and row["current_version"]}
    served = table.snapshot()
    # a newer version that failed to load leaves the last good one serving (until a good one is published)
    kept = {name for name, task in served.items() if name in rows and rows[name]["status"] == "failed" and (rows[name]["current_version"] or 0) > task.version}
    for name in served.keys() - wanted.keys() - kept:
        table.remove(name)
        report.removed.append(name)
    for name, row in wanted.items():
        if name in served and served[name].version == row["current_version"]:
            continue
        try:
            load_task(store, engine, name, row["current_version"])
            report.loaded.append(name)
        except Unavailable:
            raise
        except Exception as exc:  # noqa: BLE001 - whatever an artifact holds, it fails alone, with its reason
            message = exc.message if isinstance(exc, TaskservError) else f"task {name!r} v{row['current_version']} does not load: {type(exc).__name__}: {exc}"
            log.error("task %s v%s failed to load: %s", name, row["current_version"], message, exc_info=not isinstance(exc, TaskservError))
            store.registry.mark_failed(name, message)
            previous = served.get(name)
            if previous is not None and previous.version < row["current_version"]:
                table.add(previous)  # the last good version keeps serving
            else:
                table.remove(name)
                rows[name] = {**row, "status": "failed"}  # for `_fall_back`, below
            report.failed[name] = message
    _fall_back(store, engine, rows, report)
    return report


def _fall_back(store: Store, engine: Engine, rows: dict[str, dict[str, Any]], report: SyncReport) -> None:
    """A task whose newest version failed and that this engine does not serve (a restart, or a
    newcomer to the deployment) serves its newest earlier version that loads, as a running server
    keeps its last good one. Tried once per failed version (`table.fallbacks_tried`); the task stays
    `failed` with the newest version's error, so its owner still sees what to fix."""
    table = engine.tasks
    for name, row in rows.items():
        newest = row["current_version"]
        if row["status"] != "failed" or not newest or name in table or (name, newest) in table.fallbacks_tried:
            continue
        table.fallbacks_tried.add((name, newest))
        published = row["versions"] if "versions" in row else store.registry.versions(name)  # read here only just after a failure, which wrote the registry too
        for version in sorted((v for v in published if v < newest), reverse=True):
            try:
                load_task(store, engine, name, version)
                report.loaded.append(name)
                log.warning("task %s: v%s failed, serving v%s (its newest version that loads)", name, newest, version)
                break
            except Unavailable:
                raise
            except Exception as exc:  # noqa: BLE001 - as in `sync`: an artifact fails alone
                log.error("task %s v%s does not load either: %s", name, version, exc)
                if name in table:
                    table.remove(name)


def load_task(store: Store, engine: Engine, name: str, version: int) -> None:
    """Serve `name` at `version` from its artifact, once it is proven to fit: the manifest names that
    task and version, its shared module loads, and one probe row runs through it (a tensor of the
    wrong shape fails here, not inside a batch of other tasks). Raises with the reason otherwise."""
    task = codec.load_task(store.task_folder(name, version), engine.backbone.fingerprint)
    if (task.name, task.version) != (name, version):
        raise CorruptArtifact(f"the artifact of task {name!r} v{version} says it is task {task.name!r} v{task.version}")
    table = engine.tasks
    if not table.has_module(task.method, task.module_version):
        table.set_module(task.method, task.module_version, load_module(store, engine, task.method, task.module_version), current=False)
    table.add(task)
    engine.run([Request(name, "probe", max_new_tokens=1)])  # raises what a batch would; the caller restores the table


def load_module(store: Store, engine: Engine, method_id: str, version: int) -> Method:
    """A published shared module, built for `engine`; refuses another backbone, another form module
    (IP) or other dims."""
    return build_module(store.module_folder(method_id, version), engine.dims, engine.backbone.fingerprint, engine.form_fingerprint)


def build_module(folder, dims: BackboneDims, fingerprint: str, form_fingerprint: str | None) -> Method:
    """The shared module in `folder`, built with its recorded config."""
    tensors, manifest = codec.read_module(folder)
    what = f"shared {manifest.get('method')} module v{manifest.get('version')}"
    if manifest.get("backbone_fingerprint") != fingerprint:
        raise Incompatible(f"{what} was made for backbone {manifest.get('backbone_fingerprint')}, this server runs {fingerprint}")
    cls = method_class(manifest["method"])
    if cls.uses_form and manifest.get("form_fingerprint") != form_fingerprint:
        raise Incompatible(f"{what} was made for form module {manifest.get('form_fingerprint')}, this server runs {form_fingerprint}")
    if manifest.get("dims") != dataclasses.asdict(dims):
        raise Incompatible(f"{what} was made for dims {manifest.get('dims')}, this server has {dataclasses.asdict(dims)}")
    try:
        config = cls.config_class(**manifest["config"])
    except (TypeError, ValueError) as exc:
        raise CorruptArtifact(f"{folder}: config {manifest['config']} does not fit {cls.config_class.__name__} ({exc})") from exc
    module = cls(dims, config=config)
    try:
        module.load_shared(tensors)
    except RuntimeError as exc:  # missing / unexpected keys or shapes
        raise CorruptArtifact(f"{folder}: {exc}") from exc
    return module
