"""The engine's bookkeeping: every servable task, the shared-module versions they use, and which
tasks are resident on the device (an LRU bounded by `memory_bytes`).

- Tasks are kept on the host (`Task` with CPU params). A task becomes *resident* when a batch needs
  it: its params are copied to the device and its method's `static(task)` (soft prompts, PHA's
  generated adapters) and label token ids are computed once, under `no_grad`, as a `LoadedTask` —
  on a causal backbone with the keys/values of a static prompt too (`prefix_cache`).
  Least recently used residents are evicted past the bound and rebuilt from the host copy on
  their next batch — the same computation, so bit-identical outputs.
- A task whose params already live on the device is served with those very tensors, not copies:
  a trainer's leaves are what the engine computes with; `refresh(name)` recomputes the cached
  statics after an optimiser step.
- Shared modules: each method has a current module (new tasks are made with it) and older versions
  that loaded tasks still use. A task is only ever served with the version it was made with, so a
  retrained shared module never changes an existing task (the isolation invariant).
Thread safety: the API thread adds and removes while the engine thread schedules; one lock.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from server.backbone import Backbone
from server.data.spec import TaskSpec
from server.errors import Conflict, Incompatible, InvalidRequest, NonFinite, NotFound
from server.methods import Method, method_class
from server.methods.base import Vocabulary
from server.task import Task

ModuleKey = tuple[str, int]  # (method id, shared-module version)


@dataclass(frozen=True, eq=False)
class LoadedTask:
    """A task version resident on the device, with what was derived from it once: the method's
    static tensors and the label verbalizers' token ids."""

    task: Task  # params on the engine's device
    static: dict[str, Tensor]
    targets: list[list[int]]
    host: Task  # the host copy this was built from (identifies the version)
    nbytes: int  # device memory this version holds of its own (see `_own_bytes`); eviction sums it on every batch


class TaskTable(Mapping[str, Task]):
    """name -> the task's host copy (a read-only mapping), plus the lifecycle operations."""

    def __init__(self, backbone: Backbone, modules: dict[str, Method], memory_bytes: int | None = None, *, can_form: bool = True,
                 prefix_cache: Callable[[Tensor], Tensor] | None = None) -> None:
        self.backbone, self.memory_bytes, self.can_form, self.prefix_cache = backbone, memory_bytes, can_form, prefix_cache
        self.modules = nn.ModuleDict(modules)
        """The CURRENT shared module of each method: new tasks are made with it."""
        self.modules.to(backbone.device)  # method weights stay fp32; their outputs are cast per batch
        self.versions: dict[str, int] = {m: 0 for m in self.modules}
        """method id -> version of its current shared module (0: the built-in initialisation)."""
        self._older: dict[ModuleKey, Method] = {}  # superseded versions that loaded tasks still use
        self._tasks: dict[str, Task] = {}
        self._resident: OrderedDict[str, LoadedTask] = OrderedDict()  # least recently used first
        self.rebuilds = 0
        """Device copies built again for a batch because theirs was evicted (or swapped out) since."""
        self.evictions = 0
        """Device copies dropped to keep resident bytes under `memory_bytes`."""
        self.fallbacks_tried: set[tuple[str, int]] = set()
        """(task, failed newest version) pairs the store sync has fallen back from (store_sync._fall_back)."""
        self._lock = threading.RLock()
        self.vocab = Vocabulary(backbone.embedding.weight, lambda text: list(backbone.tokenizer(text, add_special_tokens=False)["input_ids"]))
        """What methods may use of the vocabulary when they make a task."""

    # ---- the mapping (host copies) ---------------------------------------------------------------
    def __getitem__(self, name: str) -> Task:
        with self._lock:
            return self._tasks[name]

    def __iter__(self) -> Iterator[str]:
        with self._lock:
            return iter(list(self._tasks))

    def __len__(self) -> int:
        return len(self._tasks)

    def snapshot(self) -> dict[str, Task]:
        """A consistent copy of the table (name -> task), for callers that read it whole."""
        with self._lock:
            return dict(self._tasks)

    def values(self):  # type: ignore[override] - a snapshot: never sees a half-applied change
        return self.snapshot().values()

    def items(self):  # type: ignore[override]
        return self.snapshot().items()

    def get_task(self, name: str) -> Task:
        """The current version of a servable task; NotFound otherwise."""
        task = self.get(name)
        if task is None:
            raise NotFound(f"task {name!r} does not exist")
        return task

    # ---- shared modules ------------------------------------------------------------------------
    def method(self, method_id: str, version: int | None = None) -> Method:
        """The shared module of `method_id` at `version` (None: the current one)."""
        if method_id not in self.modules:
            method_class(method_id)  # raises InvalidRequest naming the known ids
            raise InvalidRequest(f"method: {method_id!r} is not loaded in this engine")
        if version is None or version == self.versions[method_id]:
            return self.modules[method_id]  # type: ignore[return-value]
        older = self._older.get((method_id, version))
        if older is None:
            raise Incompatible(f"shared {method_id} module v{version} is not loaded (current: v{self.versions[method_id]})")
        return older

    def has_module(self, method_id: str, version: int) -> bool:
        return self.versions.get(method_id) == version or (method_id, version) in self._older

    def set_module(self, method_id: str, version: int, module: Method, *, current: bool = True) -> None:
        """Install a shared module version. As `current`, new tasks use it; tasks already loaded keep
        the version they were made with, so their outputs never change."""
        module.to(self.backbone.device).requires_grad_(False)
        with self._lock:
            if not current:
                self._older[(method_id, version)] = module
                return
            previous = self.versions.get(method_id)
            if previous is not None and previous != version:
                self._older[(method_id, previous)] = self.modules[method_id]  # type: ignore[assignment]
            self._older.pop((method_id, version), None)
            self.modules[method_id] = module
            self.versions[method_id] = version
            self._drop_unused_modules()

    def _drop_unused_modules(self) -> None:
        used = {(t.method, t.module_version) for t in self._tasks.values()}
        for key in [k for k in self._older if k not in used]:
            del self._older[key]

    # ---- task lifecycle (idempotent) -------------------------------------------------------
    def new(self, name: str, method: str, spec: TaskSpec, *, init: dict[str, Any] | None = None, seed: int = 0, version: int = 1) -> Task:
        """A fresh task (not yet added): per-task params from the current module's initialisation."""
        m = self.method(method)
        if m.uses_form and not self.can_form:
            raise InvalidRequest(f"method: {method} on this backbone needs a form module (TASKSERVE_FORM_MODULE)")
        generator = torch.Generator().manual_seed(seed)
        params, meta = m.init_task(spec, self.vocab, generator, init or {})
        return Task(name=name, method=method, spec=spec, params=params, version=version, meta=meta, module_version=self.versions[method])

    def add(self, task: Task) -> None:
        """Make `task` servable; a newer version replaces the old one atomically. It is made
        resident now, so a broken task fails here, not inside a batch."""
        entry = self._build(task, self.method(task.method, task.module_version))
        with self._lock:
            self._tasks[task.name] = entry.host
            self._resident[task.name] = entry
            self._resident.move_to_end(task.name)
            self._evict(keep={task.name})
            self._drop_unused_modules()

    def remove(self, name: str) -> None:
        with self._lock:
            self._tasks.pop(name, None)
            self._resident.pop(name, None)
            self._drop_unused_modules()

    @contextlib.contextmanager
    def temporary(self, task: Task) -> Iterator[Task]:
        """Serve `task` for the block only (probes, a task while it trains); removed afterwards."""
        if task.name in self:
            raise Conflict(f"task {task.name!r} is already served; a temporary task needs a free name")
        self.add(task)
        try:
            yield task
        finally:
            self.remove(task.name)

    def refresh(self, name: str) -> None:
        """Recompute a resident task's cached statics from its params as they are now (a trainer
        changed them in place)."""
        with self._lock:
            entry = self._resident.get(name)
            if entry is not None:
                self._resident[name] = self._build(entry.task, self.method(entry.task.method, entry.task.module_version), host=entry.host)

    # ---- residency -----------------------------------------------------------------------------
    @property
    def resident_bytes(self) -> int:
        with self._lock:
            return sum(entry.nbytes for entry in self._resident.values())

    def loaded(self, name: str) -> LoadedTask:
        """The resident version of the current task `name`, rebuilt from its host copy if evicted."""
        return self.pin([self.get_task(name)], {})[0]

    def pin(self, tasks: list[Task], methods: dict[ModuleKey, Method]) -> list[LoadedTask]:
        """The resident copies of exactly these task versions (one per entry, rebuilt where evicted;
        a version swapped out meanwhile is rebuilt for this batch only), most recently used now;
        then the LRU bound is restored around them. `methods` may name the module each key uses."""
        with self._lock:
            built: dict[int, LoadedTask] = {}
            for task in tasks:
                if id(task) in built:
                    continue
                entry = self._resident.get(task.name)
                if entry is None or entry.host is not task:
                    key = (task.method, task.module_version)
                    entry = self._build(task, methods.get(key) or self.method(*key))
                    self.rebuilds += 1
                    if self._tasks.get(task.name) is task:  # the current version: keep it resident
                        self._resident[task.name] = entry
                if task.name in self._resident:
                    self._resident.move_to_end(task.name)
                built[id(task)] = entry
            self._evict(keep={t.name for t in tasks})
            return [built[id(t)] for t in tasks]

    def peers(self, key: ModuleKey) -> list[Task]:
        """The device copies of every task made with shared module `key` (PHA's contrastive negatives)."""
        with self._lock:
            names = [n for n, t in self._tasks.items() if (t.method, t.module_version) == key]
        return [self.loaded(n).task for n in names]

    def caches_prefix(self, method: Method) -> bool:
        """Whether this method's tasks get their static prompt's keys/values computed once per
        version (a causal backbone, a `static_prefix` method): their rows then run at their token length."""
        return self.prefix_cache is not None and method.static_prefix

    def _build(self, task: Task, method: Method, host: Task | None = None) -> LoadedTask:
        device = self.backbone.device
        device_task = _with_params(task, device)
        if host is None:
            host = task if all(p.device.type == "cpu" for p in task.params.values()) else _with_params(task, "cpu")
        for key, value in task.params.items():
            if not torch.isfinite(value.detach()).all():
                raise NonFinite(f"task {task.name!r} v{task.version}: its {key!r} holds NaN or infinite values; refused")
        with torch.no_grad():
            static = {k: v.detach() for k, v in method.static(device_task).items()}
            if not all(bool(torch.isfinite(v).all()) for v in static.values()):
                raise NonFinite(f"task {task.name!r} v{task.version}: its {method.method_id} tensors come out NaN or infinite; refused")
            if self.caches_prefix(method) and static["prompt"].shape[0] > 0:
                static["prefix_kv"] = self.prefix_cache(static["prompt"])  # [L, 2, kvh, m, hd], once per version
        targets = [self.backbone.label_ids(label, task.spec.template) for label in task.spec.labels]
        if any(not t for t in targets):
            raise InvalidRequest(f"labels: a label of task {task.name!r} encodes to no tokens")
        if task.spec.scoring == "first" and len({t[0] for t in targets}) < len(targets):
            raise InvalidRequest(f"labels: labels of task {task.name!r} share their first token; use scoring 'sum' or 'mean'")
        return LoadedTask(device_task, static, targets, host, _own_bytes([*device_task.params.values(), *static.values()], method))

    def _evict(self, keep: set[str]) -> None:
        """Drop least recently used device copies until under the bound: others first, those in
        `keep` (the batch being scheduled) only when they alone exceed it — so the bound holds
        between batches however many tasks one batch needs. A batch in flight holds its own
        references, so eviction never pulls tensors from under it."""
        budget = self.memory_bytes
        if budget is None:
            return
        total = sum(entry.nbytes for entry in self._resident.values())
        for name in [n for n in self._resident if n not in keep] + [n for n in self._resident if n in keep]:
            if total <= budget:
                break
            total -= self._resident.pop(name).nbytes
            self.evictions += 1


def _own_bytes(tensors: list[Tensor], method: Method) -> int:
    """Bytes of the tensors a resident task holds of its own: each tensor once (prompt tuning's static
    prompt IS its param), none that is the shared module's (IP from a description serves the
    module's nets; the module's memory is not a task's to evict)."""
    shared = {t.untyped_storage().data_ptr() for t in [*method.parameters(), *method.buffers()]}
    seen: set[tuple[int, int]] = set()
    total = 0
    for t in tensors:
        key = (t.data_ptr(), t.numel())
        if t.untyped_storage().data_ptr() in shared or key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


def _with_params(task: Task, device: torch.device | str) -> Task:
    """`task` with its params on `device`. Params already there are shared, not copied, so a
    trainer's parameters stay the leaves that receive gradients."""
    device = torch.device(device)
    params = nn.ParameterDict()
    for key, p in task.params.items():
        same = p.device.type == device.type and (device.index is None or p.device.index == device.index)
        params[key] = p if same else nn.Parameter(p.detach().to(device), requires_grad=p.requires_grad)
    if all(params[k] is task.params[k] for k in task.params):
        return task
    return dataclasses.replace(task, params=params)
