"""The engine: one frozen backbone, many tasks, ONE forward per mixed-task batch.

Three verbs (house style 4):
- `schedule(requests)`: validate, render each row with its task's template (and description for
  IP), tokenize, group rows by method — no torch work beyond lookups;
- `execute(plan)`: methods fill one BatchContext (prefixes, hidden scales, adapters), the runner
  does the first pass (decoder-only prompt pass / T5 encoder), IP's form states arrive, then
  rank-classification scores for classification rows and greedy generation for generative rows;
- `complete(plan, out)`: turn scores and token ids into results.
`loss(examples)` runs the same path with gradients flowing into method parameters only.

Per-task tensors that do not depend on the input (soft prompts, PHA's generated adapters) are
computed once per task version (`Method.static`) and cached on the device; per-instance ones
(ATTEMPT's attention, IP's task embedding) are computed in the batch. There is no Python loop over
tasks in the forward: rows carry their task as an index and methods gather per row.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from server.backbone import Backbone, FormModule, masked_mean
from server.batch import BatchContext, pack_rows
from server.data.spec import TaskSpec
from server.errors import Incompatible, InputTooLong, InvalidRequest, NotFound
from server.hooks import ContextHooks
from server.methods import BackboneDims, Method, RowGroup, method_class
from server.runners import DecoderRunner, Encoded, Seq2SeqRunner, pad_ids
from server.task import Task


ModuleKey = tuple[str, int]  # (method id, shared-module version)


@dataclass(frozen=True)
class EngineConfig:
    max_input_tokens: int = 1024
    """Longest rendered input (prefix excluded) in tokens; longer requests get a 413."""
    max_new_tokens: int = 256
    """Upper bound on any request's max_new_tokens."""
    length_multiple: int = 1
    """Pad sequence lengths up to a multiple of this so shapes fall into buckets (for CUDA-graph
    capture). 1 by default: padding forces the masked attention path even when every row has the
    same length (+5% on CPU at SmolLM2 shape, and no flash kernel on GPU)."""
    task_memory_bytes: int | None = None
    """Bound on device memory for per-task tensors (params + cached statics). Least recently used
    tasks are evicted and rebuilt on demand from their host copy; None = no bound."""


@dataclass(frozen=True)
class Request:
    task: str
    text: str
    max_new_tokens: int | None = None


@dataclass(frozen=True)
class Example:
    """A training row: `target` is a label verbalizer or a target text."""

    task: str
    text: str
    target: str


@dataclass
class Result:
    task: str
    task_version: int
    output: str
    label: str | None = None
    scores: dict[str, float] | None = None
    """Per-label probability (softmax over the labels' scores under the task's scoring rule)."""


@dataclass(frozen=True, eq=False)
class LoadedTask:
    """A task version resident on the device, with what the engine derived from it once: the
    method's static tensors and the label verbalizers' token ids."""

    task: Task  # params on the engine's device
    static: dict[str, Tensor]
    targets: list[list[int]]

    @functools.cached_property
    def nbytes(self) -> int:  # once per resident version: _evict sums it on every batch
        tensors = [*self.task.params.values(), *self.static.values()]
        return sum(t.numel() * t.element_size() for t in tensors)


@dataclass
class Plan:
    """A scheduled batch: rows in request order, grouped by method. It holds the task versions it
    was scheduled with, so a version swapped in meanwhile never changes a batch in flight."""

    loaded: list[LoadedTask]
    prompt_ids: list[list[int]]
    form_texts: list[str]
    max_new: list[int]
    groups: dict[ModuleKey, list[int]] = field(default_factory=dict)  # (method id, module version) -> rows

    @property
    def tasks(self) -> list[Task]:
        return [entry.task for entry in self.loaded]


@dataclass
class Output:
    label_scores: dict[int, Tensor]  # row -> [n_labels] scores under the task's rule
    generated: dict[int, list[int]]  # row -> token ids


def default_methods(backbone: Backbone, form: FormModule | None, **configs: Any) -> dict[str, nn.Module]:
    """Every registered method with default (or given) configs, shared state freshly initialised."""
    from server.methods.base import REGISTRY

    dims = backbone_dims(backbone, form)
    embedding = backbone.embedding.weight
    methods: dict[str, nn.Module] = {}
    for method_id, cls in REGISTRY.items():
        kwargs: dict[str, Any] = {}
        if method_id in configs:
            kwargs["config"] = configs[method_id]
        methods[method_id] = cls(dims, embedding=embedding, **kwargs)
    return methods


def backbone_dims(backbone: Backbone, form: FormModule | None) -> BackboneDims:
    if backbone.is_encoder_decoder:  # the encoder is the form module (seed 000 §3.3)
        form_layers, form_dim = backbone.model.config.num_layers, backbone.d_model
    elif form is not None:
        form_layers, form_dim = form.n_layers, form.d_model
    else:
        form_layers, form_dim = 1, backbone.d_model  # no form module: IP cannot be served (checked on use)
    return BackboneDims(
        d_model=backbone.d_model,
        n_blocks=backbone.n_layers,
        n_encoder_ffns=len(backbone.encoder_ffns),
        n_decoder_ffns=len(backbone.decoder_ffns),
        form_layers=form_layers,
        form_dim=form_dim,
    )


class Engine:
    def __init__(
        self,
        backbone: Backbone,
        form: FormModule | None = None,
        methods: dict[str, nn.Module] | None = None,
        config: EngineConfig | None = None,
    ) -> None:
        self.backbone, self.form, self.config = backbone, form, config or EngineConfig()
        self.dims = backbone_dims(backbone, form)
        self.methods = nn.ModuleDict(methods if methods is not None else default_methods(backbone, form))
        """The CURRENT shared module of each method: new tasks are made with it."""
        self.methods.to(backbone.device)  # method weights stay fp32; their outputs are cast per batch
        self.module_versions: dict[str, int] = {m: 0 for m in self.methods}
        self._older: dict[ModuleKey, Method] = {}  # superseded module versions that loaded tasks still use
        self.hooks = ContextHooks(backbone)
        runner_cls = Seq2SeqRunner if backbone.is_encoder_decoder else DecoderRunner
        self.runner = runner_cls(backbone, self.hooks, self.config.length_multiple)
        self._tasks: dict[str, Task] = {}  # every servable task; params on the host
        self._resident: OrderedDict[str, LoadedTask] = OrderedDict()  # device copies, least recent first
        self._lock = threading.RLock()  # add/remove vs. a batch being scheduled on another thread

    # ---- shared modules ------------------------------------------------------------------------
    def method(self, method_id: str, version: int | None = None) -> Method:
        """The shared module of `method_id` at `version` (None: the current one)."""
        if method_id not in self.methods:
            method_class(method_id)  # raises InvalidRequest naming the known ids
            raise InvalidRequest(f"method: {method_id!r} is not loaded in this engine")
        if version is None or version == self.module_versions[method_id]:
            return self.methods[method_id]  # type: ignore[return-value]
        older = self._older.get((method_id, version))
        if older is None:
            raise Incompatible(f"shared {method_id} module v{version} is not loaded (current: v{self.module_versions[method_id]})")
        return older

    @property
    def form_fingerprint(self) -> str | None:
        return self.form.fingerprint if self.form is not None else None

    def has_module(self, method_id: str, version: int) -> bool:
        return self.module_versions.get(method_id) == version or (method_id, version) in self._older

    def set_module(self, method_id: str, version: int, module: Method, *, current: bool = True) -> None:
        """Install a shared module version. As `current`, new tasks use it; tasks already loaded keep
        the version they were made with, so their outputs never change."""
        module.to(self.backbone.device).requires_grad_(False)
        with self._lock:
            if not current:
                self._older[(method_id, version)] = module
                return
            previous = self.module_versions.get(method_id)
            if previous is not None and previous != version:
                self._older[(method_id, previous)] = self.methods[method_id]  # type: ignore[assignment]
            self._older.pop((method_id, version), None)
            self.methods[method_id] = module
            self.module_versions[method_id] = version
            self._drop_unused_modules()

    def _drop_unused_modules(self) -> None:
        used = {(t.method, t.module_version) for t in self._tasks.values()}
        for key in [k for k in self._older if k not in used]:
            del self._older[key]

    # ---- task lifecycle (idempotent) -------------------------------------------------------
    @property
    def tasks(self) -> dict[str, Task]:
        with self._lock:
            return dict(self._tasks)

    @property
    def resident_bytes(self) -> int:
        with self._lock:
            return sum(entry.nbytes for entry in self._resident.values())

    def loaded(self, name: str) -> LoadedTask:
        """The device-resident version of a task, rebuilt from its host copy if it was evicted."""
        with self._lock:
            entry = self._resident.get(name)
            if entry is None:
                task = self._tasks.get(name)
                if task is None:
                    raise NotFound(f"task {name!r} does not exist")
                entry = self._resident[name] = self._make_resident(task)
            self._resident.move_to_end(name)
            return entry

    def new_task(self, name: str, method: str, spec: TaskSpec, *, init: dict[str, Any] | None = None, seed: int = 0, version: int = 1) -> Task:
        """A fresh task (not yet added): per-task params from the current module's initialisation."""
        m = self.method(method)
        if m.uses_form and not self.backbone.is_encoder_decoder and self.form is None:
            raise InvalidRequest(f"method: {method} on a decoder-only backbone needs a form module")
        generator = torch.Generator().manual_seed(seed)
        params, meta = m.init_task(spec, self.backbone.embedding.weight, generator, init or {})
        return Task(name=name, method=method, spec=spec, params=params, version=version, meta=meta, module_version=self.module_versions[method])

    def add_task(self, task: Task) -> None:
        """Make `task` servable; a newer version replaces the old one atomically. Its tensors are
        checked (static computed) now, so a broken task fails here, not inside a batch."""
        entry = self._make_resident(task)
        host = task if all(p.device.type == "cpu" for p in task.params.values()) else _with_params(task, "cpu")
        with self._lock:
            self._tasks[task.name] = host
            self._resident[task.name] = entry
            self._resident.move_to_end(task.name)
            self._evict(keep={task.name})
            self._drop_unused_modules()

    def remove_task(self, name: str) -> None:
        with self._lock:
            self._tasks.pop(name, None)
            self._resident.pop(name, None)
            self._drop_unused_modules()

    def _make_resident(self, task: Task) -> LoadedTask:
        method = self.method(task.method, task.module_version)
        device_task = _with_params(task, self.backbone.device)
        with torch.no_grad():
            static = {k: v.detach() for k, v in method.static(device_task).items()}
        targets = [self.backbone.encode_target(label) for label in task.spec.labels]
        if any(not t for t in targets):
            raise InvalidRequest(f"labels: a label of task {task.name!r} encodes to no tokens")
        if task.spec.scoring == "first" and len({t[0] for t in targets}) < len(targets):
            raise InvalidRequest(f"labels: labels of task {task.name!r} share their first token; use scoring 'sum' or 'mean'")
        return LoadedTask(device_task, static, targets)

    def _evict(self, keep: set[str]) -> None:
        """Drop least recently used device copies until under the bound (never those in `keep`:
        the batch being scheduled). A batch in flight holds its own references, so eviction never
        pulls tensors from under it."""
        budget = self.config.task_memory_bytes
        if budget is None:
            return
        total = sum(entry.nbytes for entry in self._resident.values())
        for name in list(self._resident):
            if total <= budget:
                break
            if name not in keep:
                total -= self._resident.pop(name).nbytes

    # ---- schedule → execute → complete -----------------------------------------------------
    def run(self, requests: list[Request]) -> list[Result]:
        plan = self.schedule(requests)
        return self.complete(plan, self.execute(plan))

    def schedule(self, requests: list[Request]) -> Plan:
        if not requests:
            raise InvalidRequest("inputs: at least one row is required")
        with self._lock:
            loaded = [self.loaded(r.task) for r in requests]
            self._evict(keep={r.task for r in requests})
        tasks = [entry.task for entry in loaded]
        plan = Plan(loaded=loaded, prompt_ids=[], form_texts=[], max_new=[])
        texts = [self.method(task.method, task.module_version).render(task.spec, req.text) for req, task in zip(requests, tasks)]
        for row, (req, task, text, ids) in enumerate(zip(requests, tasks, texts, self.backbone.encode_batch(texts))):
            if len(ids) > self.config.max_input_tokens:
                raise InputTooLong(f"text: {len(ids)} tokens after the {task.name!r} template, limit {self.config.max_input_tokens}")
            max_new = req.max_new_tokens or task.spec.max_new_tokens
            if not 1 <= max_new <= self.config.max_new_tokens:
                raise InvalidRequest(f"max_new_tokens: must be in [1, {self.config.max_new_tokens}]")
            plan.prompt_ids.append(ids)
            plan.form_texts.append(text)
            plan.max_new.append(max_new)
            plan.groups.setdefault((task.method, task.module_version), []).append(row)
        return plan

    @torch.no_grad()
    def execute(self, plan: Plan) -> Output:
        enc, ctx, _ = self._encode(plan, live=False)
        return self._read_out(plan, enc, ctx)

    @torch.no_grad()
    def features(self, requests: list[Request]) -> Tensor:
        """Pooled feature-site states of the rows under their tasks' modulation: [b, d] (fp32).
        PHA's retriever reads these (eq 10)."""
        plan = self.schedule(requests)
        _, _, groups = self._encode(plan, live=False, capture=True)
        out = torch.zeros(len(requests), self.backbone.d_model, device=self.backbone.device)
        for group in groups.values():
            if group.features is not None:
                out[group.rows] = group.features.float()
        return out

    def complete(self, plan: Plan, out: Output) -> list[Result]:
        results = []
        for row, task in enumerate(plan.tasks):
            if row in out.label_scores:
                probs = out.label_scores[row].softmax(-1).tolist()
                best = max(range(len(probs)), key=probs.__getitem__)
                label = task.spec.labels[best]
                results.append(Result(task.name, task.version, label, label, dict(zip(task.spec.labels, probs))))
            else:
                text = self.backbone.tokenizer.decode(out.generated[row], skip_special_tokens=True)
                results.append(Result(task.name, task.version, text))
        return results

    # ---- the shared forward path ------------------------------------------------------------
    def _encode(self, plan: Plan, *, live: bool, capture: bool = False) -> tuple[Encoded, BatchContext, dict[str, RowGroup]]:
        """Methods fill the context, then the first pass runs. `live` recomputes static per-task
        tensors with gradients (training) instead of using the cache."""
        device = self.backbone.device
        ids, lengths = pad_ids(plan.prompt_ids, self.backbone.pad_id, device)
        token_embeds = self.backbone.embed(ids)  # [b, n, d], real tokens first
        token_mask = (torch.arange(ids.shape[1], device=device) < lengths.unsqueeze(1)).long()
        ctx = BatchContext(len(plan.tasks), self.backbone.d_model, self.backbone.n_layers, device, self.backbone.dtype, capture_features=capture)
        groups: dict[str, RowGroup] = {}
        for key, rows in plan.groups.items():
            method = self.method(*key)
            distinct = list(dict.fromkeys(plan.loaded[r] for r in rows))
            slot_of = {id(entry): i for i, entry in enumerate(distinct)}
            index = torch.tensor(rows, device=device)
            group = RowGroup(
                rows=index,
                tasks=[entry.task for entry in distinct],
                task_slot=torch.tensor([slot_of[id(plan.loaded[r])] for r in rows], device=device),
                statics=[method.static(entry.task) if live else entry.static for entry in distinct],
                embeds=token_embeds[index],
                mask=token_mask[index],
                peers=self._peers(key) if live else [],
            )
            method.modulate(group, ctx)
            groups[key] = group
        form_groups = {k: g for k, g in groups.items() if self.method(*k).uses_form}
        if form_groups and not self.backbone.is_encoder_decoder:
            for key, group in form_groups.items():
                form = self.form.layer_states([plan.form_texts[r] for r in group.rows.tolist()])  # [n1, g, d1]
                self.method(*key).modulate_from_form(group, ctx, form.to(device))
        ctx.assemble()
        embeds, mask = pack_rows(ctx.prefix, ctx.prefix_len, token_embeds, lengths, left_pad=self.runner.left_pad, multiple=self.config.length_multiple)
        enc = self.runner.encode(embeds, mask, ctx, want_form=bool(form_groups) and self.backbone.is_encoder_decoder)
        if enc.form is not None:  # T5: the encoder pass just produced IP's form states
            for key, group in form_groups.items():
                self.method(*key).modulate_from_form(group, ctx, enc.form[:, group.rows])
            ctx.assemble()
        if capture and ctx.features is not None:
            pooled = masked_mean(ctx.features, enc.mask)  # [b, d]
            for group in groups.values():
                group.features = pooled[group.rows]
        return enc, ctx, groups

    def _peers(self, key: ModuleKey) -> list[Task]:
        """Training: the device copies of every task of this module (PHA's contrastive negatives)."""
        with self._lock:
            names = [n for n, t in self._tasks.items() if (t.method, t.module_version) == key]
        return [self.loaded(n).task for n in names]

    def _read_out(self, plan: Plan, enc: Encoded, ctx: BatchContext) -> Output:
        device = self.backbone.device
        pair_row, pair_target, spans = [], [], {}
        gen_rows = []
        for row, entry in enumerate(plan.loaded):
            task = entry.task
            if not task.spec.is_classification:
                gen_rows.append(row)
                continue
            targets = entry.targets
            if task.spec.scoring == "first":
                targets = [t[:1] for t in targets]
            spans[row] = (len(pair_row), len(targets))
            pair_row += [row] * len(targets)
            pair_target += targets
        scores: dict[int, Tensor] = {}
        if pair_row:
            logp = self.runner.label_logprobs(enc, ctx, torch.tensor(pair_row, device=device), pair_target)  # [p, n]
            total = logp.sum(-1).float().cpu()  # [p]; one device-to-host copy per batch
            for row, (start, count) in spans.items():
                s = total[start : start + count]
                if plan.loaded[row].task.spec.scoring == "mean":
                    s = s / torch.tensor([len(t) for t in pair_target[start : start + count]])
                scores[row] = s
        generated: dict[int, list[int]] = {}
        if gen_rows:
            rows = torch.tensor(gen_rows, device=device)  # generation last: it may consume the prompt cache
            generated = dict(zip(gen_rows, self.runner.generate(enc, ctx, rows, [plan.max_new[r] for r in gen_rows])))
        return Output(scores, generated)

    # ---- training ---------------------------------------------------------------------------
    def loss(self, examples: list[Example]) -> dict[str, Tensor]:
        """Teacher-forced mean token cross-entropy of the targets plus the methods' extra losses
        (PHA eq 9). Gradients reach method and task parameters only: the backbone is frozen."""
        plan = self.schedule([Request(e.task, e.text) for e in examples])
        targets = []
        for e, task in zip(examples, plan.tasks):
            ids = self.backbone.encode_target(e.target)
            if not task.spec.is_classification and not self.backbone.is_encoder_decoder:
                ids = ids + [self.backbone.eos_id]  # teach generative tasks to stop
            targets.append(ids)
        capture = any(self.method(*k).wants_features for k in plan.groups)
        enc, ctx, groups = self._encode(plan, live=True, capture=capture)
        rows = torch.arange(len(examples), device=self.backbone.device)
        logp = self.runner.label_logprobs(enc, ctx, rows, targets)  # [b, n]
        count = sum(len(t) for t in targets)
        lm = -logp.sum() / count
        extra = [x for k, g in groups.items() if (x := self.method(*k).extra_loss(g)) is not None]
        aux = torch.stack(extra).sum() if extra else lm.new_zeros(())
        return {"loss": lm + aux, "lm": lm, "aux": aux}


def _with_params(task: Task, device: torch.device | str) -> Task:
    """`task` with its params on `device`. Params already there are shared, not copied, so a
    trainer's parameters stay the leaves that receive gradients."""
    device = torch.device(device)
    params = nn.ParameterDict()
    for key, p in task.params.items():
        same = p.device.type == device.type and (device.index is None or p.device.index == device.index)
        params[key] = p if same else nn.Parameter(p.detach().to(device), requires_grad=p.requires_grad)
    return dataclasses.replace(task, params=params)
