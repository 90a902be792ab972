"""The engine: one frozen backbone, many tasks, ONE forward per mixed-task batch (a served batch
whose rows run at very different lengths may be split into passes by length: `passes`).

Three verbs (house style 4):
- `schedule(requests)`: look up each row's task (the version it will be served with) and method,
  render it with the task's template, tokenize, check limits, group rows by method — lookups and
  tokenization only, no torch work;
- `execute(plan)`: the plan's task versions are made resident (device copies with their cached
  statics, `TaskTable.pin`), methods fill one BatchContext (prefixes, hidden scales, adapters),
  the runner does the first pass (producing the form states IP reads on the way), then
  rank-classification scores for classification rows and greedy generation for generative rows;
- `complete(plan, out)`: turn scores and generations into results.
Between the first pass and the end of generation a batch can also be held `Running`: the server's
batcher advances it one token at a time and runs new batches in between.
`loss(examples)` runs the same path with gradients flowing into method parameters only.

With a second engine that takes prompt embeddings (`offload`, e.g. vLLM), rows whose method is
`prefix_only` (soft prompts, the plain backbone) are handed over as [prefix; token embeddings],
computed here by the same methods; their results come back as futures. Everything else — IP, PHA,
multi-token labels scored by `sum`/`mean` — runs here. A row's answer never depends on where its
batch-mates ran.

Task bookkeeping (tasks, shared-module versions, device residency) is `self.tasks`, a `TaskTable`.
There is no Python loop over tasks in the forward: rows carry their task as an index and methods
gather per row.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from server.backbone import Backbone, FormModule, masked_mean
from server.batch import BatchContext, pack_rows
from server.configs import require
from server.decoding import GREEDY, Decoding, Generated, Sampling, TokenEvent
from server.errors import Incompatible, InputTooLong, InvalidRequest, NonFinite, TaskservError
from server.hooks import ContextHooks
from server.methods import BackboneDims, Method, RowGroup, method_class
from server.passes import MASKED_PAST_KEY_COST, PADDED_POSITION_COST, split_passes
from server.runners import DecoderRunner, Encoded, FormRequest, Seq2SeqRunner, pad_ids
from server.task import Example, Request, Task
from server.task_table import LoadedTask, ModuleKey, TaskTable

__all__ = ["EmbedsEngine", "Engine", "EngineConfig", "Example", "Output", "Plan", "Request", "Result", "backbone_dims", "default_methods"]


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
    cache_prefixes: bool = True
    """On a decoder-only backbone, compute a static soft prompt's keys/values once per task version
    (prompt tuning, TPV): a request then costs what its own tokens cost."""
    pass_overhead_tokens: int | None = None
    """What one more first pass costs, in token positions, when a batch whose rows run at very
    different lengths (ATTEMPT's 100-position instance prompt beside rows whose prompt is cached) is
    split into passes by length (`server.passes`): it splits where the padding saved pays for the
    extra passes. None: by device — 50 on CPU (measured by `python -m bench.pass_cost`), 4096
    elsewhere (not measured: a GPU pass's fixed cost dwarfs its positions)."""

    def __post_init__(self) -> None:
        for name in ("max_input_tokens", "max_new_tokens", "length_multiple"):
            require(getattr(self, name) >= 1, name, "must be >= 1")
        require(self.pass_overhead_tokens is None or self.pass_overhead_tokens >= 0, "pass_overhead_tokens", "must be >= 0 or None")
        require(self.task_memory_bytes is None or self.task_memory_bytes >= 0, "task_memory_bytes", "must be >= 0 or None")


@dataclass
class Result:
    task: str
    task_version: int
    output: str
    label: str | None = None
    scores: dict[str, float] | None = None
    """Per-label probability (softmax over the labels' scores under the task's scoring rule)."""
    finish_reason: str | None = None
    """Generative rows: `stop` (end of sequence or a stop string) or `length` (max_new_tokens)."""
    prompt_tokens: int = 0
    """Tokens of the rendered input (the soft prompt not counted)."""
    completion_tokens: int = 0
    """Generated tokens (classification: the chosen label's tokens)."""
    logprobs: list[dict] | None = None
    """Generative rows that asked for them: per generated token its text, log-probability and the
    most likely alternatives."""


@dataclass
class Group:
    """The rows of one (method, module version) in a plan, with the module resolved once."""

    method: Method
    rows: list[int] = field(default_factory=list)


@dataclass
class Plan:
    """A scheduled batch: rows in request order, grouped by method. It holds the task versions
    (host copies) and shared modules it was scheduled with, so a version swapped in meanwhile never
    changes a batch in flight."""

    tasks: list[Task]
    prompt_ids: list[list[int]]
    form_texts: list[str]
    max_new: list[int]
    groups: dict[ModuleKey, Group] = field(default_factory=dict)
    sampling: list[Sampling | None] = field(default_factory=list)
    sinks: list[Any] = field(default_factory=list)
    loaded: list[LoadedTask] = field(default_factory=list)
    """Filled by `execute`: the resident copies of `tasks` (row by row) the batch ran with."""


    def subset(self, rows: list[int]) -> Plan:
        """The plan of these rows only (in this order), with its groups rebuilt."""
        sub = Plan(tasks=[self.tasks[r] for r in rows], prompt_ids=[self.prompt_ids[r] for r in rows],
                   form_texts=[self.form_texts[r] for r in rows], max_new=[self.max_new[r] for r in rows],
                   sampling=[self.sampling[r] for r in rows], sinks=[self.sinks[r] for r in rows])
        position = {r: i for i, r in enumerate(rows)}
        for key, group in self.groups.items():
            mine = [position[r] for r in group.rows if r in position]
            if mine:
                sub.groups[key] = Group(group.method, sorted(mine))
        return sub


class EmbedsEngine(Protocol):
    """A second engine that runs rows given as input embeddings ([prefix; tokens], [n, d]); callable
    from any thread (`server.vllm_engine.VllmEngine`)."""

    name: str
    """What the engine's row counts call it (`vllm`)."""

    def score(self, embeds: Tensor, token_ids: list[int]) -> Future:
        """Future[list[float]]: log p(token | prompt) of each of `token_ids` at the next position."""

    def generate(self, embeds: Tensor, max_new: int, sampling: Sampling, sink: Callable[[TokenEvent], None] | None = None) -> Future:
        """Future[Generated], the text streamed to `sink` as it comes."""

    def close(self) -> None:
        """Stop the engine (requests in flight are aborted)."""


@dataclass
class Output:
    label_scores: dict[int, Tensor]  # row -> [n_labels] scores under the task's rule
    gen_rows: list[int] = field(default_factory=list)  # the generative rows, in `decoding`'s order
    decoding: Decoding | None = None


class Running:
    """A scheduled batch — one or more first passes — whose generative rows are still decoding.
    `advance()` generates one more token for each (under no_grad) and returns the finished rows'
    results by request index — so a caller can run other batches between two tokens
    (iteration-level scheduling)."""

    def __init__(self, engine: Engine, passes: list[tuple[Plan, Output, list[int]]]) -> None:
        """`passes`: each pass's plan, output, and request index of each of its rows."""
        self.engine, self.passes = engine, passes

    @property
    def done(self) -> bool:
        return all(out.decoding is None or out.decoding.done for _, out, _ in self.passes)

    def finished(self) -> dict[int, Result | TaskservError]:
        """The results ready before any decoding step: classification rows."""
        return {index[row]: self._result(plan, out, row) for plan, out, index in self.passes for row in out.label_scores}

    @torch.no_grad()
    def advance(self) -> dict[int, Result | TaskservError]:
        finished = {}
        for plan, out, index in self.passes:
            if out.decoding is not None and not out.decoding.done:
                finished.update({index[out.gen_rows[i]]: self._result(plan, out, out.gen_rows[i]) for i in out.decoding.advance()})
        return finished

    def _result(self, plan: Plan, out: Output, row: int) -> Result | TaskservError:
        try:
            return self.engine.result(plan, out, row)
        except TaskservError as exc:  # this row's own failure (e.g. NaN scores): its batch-mates are unaffected
            return exc


def default_methods(backbone: Backbone, form: FormModule | None, **configs: Any) -> dict[str, nn.Module]:
    """Every registered method with default (or given) configs, shared state freshly initialised."""
    from server.methods import method_ids

    dims = backbone_dims(backbone, form)
    embedding = backbone.embedding.weight
    return {m: method_class(m)(dims, config=configs.get(m), embedding=embedding) for m in method_ids()}


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
        offload: EmbedsEngine | None = None,
    ) -> None:
        """`offload`: where `prefix_only` rows run (decoder-only backbones), None: every row here."""
        self.backbone, self.config, self.offload = backbone, config or EngineConfig(), offload
        self.rows_by_backend = {"native": 0, **({offload.name: 0} if offload is not None else {})}
        """Rows run since start by where they ran (served rows; training passes not counted)."""
        self.split_batches = 0
        """Served batches run as more than one first pass (`passes`)."""
        if offload is not None and backbone.is_encoder_decoder:
            raise Incompatible("an embeddings engine (vLLM) serves decoder-only backbones; this backbone is encoder-decoder")
        self.dims = backbone_dims(backbone, form)
        self.hooks = ContextHooks(backbone)
        if backbone.is_encoder_decoder:
            self.runner: DecoderRunner | Seq2SeqRunner = Seq2SeqRunner(backbone, self.hooks, self.config.length_multiple)
        else:
            self.runner = DecoderRunner(backbone, self.hooks, self.config.length_multiple, form)
        self.form_fingerprint = form.fingerprint if form is not None else None
        self.tasks = TaskTable(backbone, methods if methods is not None else default_methods(backbone, form), self.config.task_memory_bytes,
                               can_form=self.runner.can_form, prefix_cache=self.runner.prefix_cache if self.config.cache_prefixes and offload is None else None)

    def close(self) -> None:
        """Release what lives outside this process (the embeddings engine's workers)."""
        if self.offload is not None:
            self.offload.close()

    @property
    def methods(self) -> nn.ModuleDict:
        """The current shared module of each method (`self.tasks.modules`)."""
        return self.tasks.modules

    # ---- schedule → execute → complete -----------------------------------------------------
    def run(self, requests: list[Request]) -> list[Result]:
        """Every row on this engine (never handed to `offload`) in ONE pass: the reference the other
        backend and the split passes of `run_each` are measured against; a row that cannot be served raises."""
        plan = self.schedule(requests)
        return self.complete(plan, self.execute(plan))

    def run_each(self, requests: list[Request]) -> list[Result | TaskservError]:
        """`run`, where a row that cannot be scheduled (unknown task, too long, ...) gets its error
        in its place while the other rows still run together, in passes by length — what a server's
        batch needs."""
        outcomes, running = self.start_each(requests)
        while running is not None and not running.done:
            outcomes.update(running.advance())
        return [outcomes[i].result() if isinstance(outcomes[i], Future) else outcomes[i] for i in range(len(requests))]

    def start_each(self, requests: list[Request]) -> tuple[dict[int, Result | TaskservError], Running | None]:
        """`run_each`'s first half: refused rows' errors and classification rows' results by request
        index — a `Future` of the outcome for a row handed to `offload` — and the generative rows
        still `Running` here (None when there are none)."""
        refused: dict[int, TaskservError] = {}
        plan = self.schedule(requests, refused=refused)
        outcomes: dict[int, Result | TaskservError | Future] = dict(refused)
        index = [i for i in range(len(requests)) if i not in refused]
        away = self._offloadable(plan)
        if away:
            outcomes.update(zip([index[r] for r in away], self._offload(plan.subset(away))))
            self.rows_by_backend[self.offload.name] += len(away)
            here = [r for r in range(len(plan.tasks)) if r not in set(away)]
            plan, index = plan.subset(here), [index[r] for r in here]
        if not plan.tasks:
            return outcomes, None
        self.rows_by_backend["native"] += len(plan.tasks)
        passes = self.passes(plan)
        if len(passes) > 1:
            self.split_batches += 1
        subs = [(plan, index)] if len(passes) == 1 else [(plan.subset(rows), [index[r] for r in rows]) for rows in passes]
        running = Running(self, [(sub, self.start(sub), sub_index) for sub, sub_index in subs])
        outcomes.update(running.finished())
        return outcomes, None if running.done else running

    def passes(self, plan: Plan) -> list[list[int]]:
        """The plan's rows split into first passes by the length each really runs at — its tokens
        plus the positions its method puts before them (none for a prompt whose keys/values are
        cached) — and by the cached past each attends to, where the padding and masked past keys
        saved pay for the extra passes (`server.passes`; padding costs a quarter of a real
        position: the layers' products skip it)."""
        method = {r: group.method for group in plan.groups.values() for r in group.rows}
        prefix = [method[r].prefix_positions(task) for r, task in enumerate(plan.tasks)]
        past = [n if self.tasks.caches_prefix(method[r]) else 0 for r, n in enumerate(prefix)]
        lengths = [len(ids) + n - cached for ids, n, cached in zip(plan.prompt_ids, prefix, past)]
        steps = [0 if task.spec.is_classification else plan.max_new[r] for r, task in enumerate(plan.tasks)]
        overhead = self.config.pass_overhead_tokens
        if overhead is None:
            overhead = 50 if self.backbone.device.type == "cpu" else 4096
        return split_passes(lengths, steps, past, overhead, PADDED_POSITION_COST, MASKED_PAST_KEY_COST)

    def check(self, requests: list[Request]) -> None:
        """Raise what `schedule` would raise for these rows, without planning them."""
        self.schedule(requests)

    def schedule(self, requests: list[Request], *, refused: dict[int, TaskservError] | None = None) -> Plan:
        """Plan `requests`. A row that cannot be served raises — or, given `refused`, is recorded
        there (request index -> error) and left out of the plan."""
        if not requests:
            raise InvalidRequest("inputs: at least one row is required")

        def refuse(i: int, exc: TaskservError) -> None:
            if refused is None:
                raise exc
            refused[i] = exc

        accepted: list[tuple[int, Request, Task]] = []
        for i, request in enumerate(requests):
            try:
                accepted.append((i, request, self.tasks.get_task(request.task)))
            except TaskservError as exc:
                refuse(i, exc)
        plan = Plan(tasks=[], prompt_ids=[], form_texts=[], max_new=[])
        methods = {key: self.tasks.method(*key) for key in dict.fromkeys((t.method, t.module_version) for _, _, t in accepted)}
        texts = [methods[(t.method, t.module_version)].render(t.spec, r.text) for _, r, t in accepted]
        for (i, request, task), text, ids in zip(accepted, texts, self.backbone.encode_batch(texts) if texts else []):
            max_new = request.max_new_tokens or task.spec.max_new_tokens
            if not ids:  # nothing for the backbone to read (an empty text under a bare `{text}` template)
                refuse(i, InvalidRequest(f"text: the input is empty under the {task.name!r} template (no tokens to read)"))
            elif len(ids) > self.config.max_input_tokens:
                refuse(i, InputTooLong(f"text: {len(ids)} tokens after the {task.name!r} template, limit {self.config.max_input_tokens}"))
            elif not 1 <= max_new <= self.config.max_new_tokens:
                refuse(i, InvalidRequest(f"max_new_tokens: must be in [1, {self.config.max_new_tokens}]"))
            else:
                key = (task.method, task.module_version)
                plan.groups.setdefault(key, Group(methods[key])).rows.append(len(plan.tasks))
                plan.tasks.append(task)
                plan.prompt_ids.append(ids)
                plan.form_texts.append(text)
                plan.max_new.append(max_new)
                plan.sampling.append(request.sampling)
                plan.sinks.append(request.sink)
        return plan

    @torch.no_grad()
    def execute(self, plan: Plan) -> Output:
        """The first pass, label scores, and generation to the end."""
        out = self.start(plan)
        if out.decoding is not None:
            out.decoding.run()
        return out

    @torch.no_grad()
    def start(self, plan: Plan) -> Output:
        """The first pass and label scores; generative rows get a `Decoding` not yet advanced."""
        enc, ctx, _ = self._encode(plan, live=False, labels_only=True)
        return self._read_out(plan, enc, ctx)

    def complete(self, plan: Plan, out: Output) -> list[Result]:
        return [self.result(plan, out, row) for row in range(len(plan.tasks))]

    def result(self, plan: Plan, out: Output, row: int) -> Result:
        """One row's result (a generative row's once its decoding finished)."""
        task = plan.tasks[row]
        prompt_tokens = len(plan.prompt_ids[row])
        if row in out.label_scores:
            probs = out.label_scores[row].softmax(-1).tolist()
            if not all(math.isfinite(p) for p in probs):
                raise NonFinite(f"task {task.name!r}: the label scores of this input came out NaN or infinite")
            best = max(range(len(probs)), key=probs.__getitem__)
            label = task.spec.labels[best]
            return Result(task.name, task.version, label, label, dict(zip(task.spec.labels, probs)), "stop", prompt_tokens, len(plan.loaded[row].targets[best]))
        generated = out.decoding.outcome(out.gen_rows.index(row))
        return Result(task.name, task.version, generated.text, finish_reason=generated.finish_reason, prompt_tokens=prompt_tokens,
                      completion_tokens=len(generated.tokens), logprobs=generated.logprobs if generated.sampling.logprobs else None)

    @torch.no_grad()
    def features(self, requests: list[Request]) -> Tensor:
        """Pooled feature-site states of the rows under their tasks' modulation: [b, d] (fp32)
        (e.g. what PHA's retriever reads, eq 10)."""
        plan = self.schedule(requests)
        _, _, groups = self._encode(plan, live=False, capture=True)
        out = torch.zeros(len(requests), self.backbone.d_model, device=self.backbone.device)
        for group in groups.values():
            if group.features is not None:
                out[group.rows] = group.features.float()
        return out

    # ---- rows run by the embeddings engine ----------------------------------------------------
    def _offloadable(self, plan: Plan) -> list[int]:
        """The rows `offload` can answer exactly: a prefix-only method, and a generative task or
        labels it scores from one next-token distribution (first-token scoring, or one-token labels)."""
        if self.offload is None:
            return []
        prefix_rows = sorted(r for g in plan.groups.values() if g.method.prefix_only for r in g.rows)
        if not prefix_rows:
            return []
        loaded = self.tasks.pin([plan.tasks[r] for r in prefix_rows], {key: g.method for key, g in plan.groups.items()})
        return [r for r, entry in zip(prefix_rows, loaded)
                if not entry.task.spec.is_classification or entry.task.spec.scoring == "first" or all(len(t) == 1 for t in entry.targets)]

    @torch.no_grad()
    def prompt_embeds(self, plan: Plan) -> list[Tensor]:
        """Each row of a plan of prefix-only methods as the input embeddings its first pass would
        read: [prefix_i; tokens_i], [n_i, d] (fp32 on the CPU, ready to hand to another process)."""
        ctx, _, token_embeds, lengths, _ = self._modulate(plan, live=False)
        if ctx.past is not None or ctx.hidden_scale is not None or ctx.adapters:
            raise Incompatible("prompt_embeds: these rows are modulated inside the backbone (or by cached prefixes), not by a prefix alone")
        embeds, mask = pack_rows(ctx.prefix, ctx.prefix_len, token_embeds, lengths, left_pad=False)  # [b, t, d], real first
        return [embeds[i, : int(n)].float().cpu() for i, n in enumerate(mask.sum(-1).tolist())]

    def _offload(self, plan: Plan) -> list[Future]:
        """Hand every row of `plan` to `offload`; each future resolves to the row's outcome."""
        futures = []
        for row, embeds in enumerate(self.prompt_embeds(plan)):
            entry = plan.loaded[row]
            if entry.task.spec.is_classification:
                asked = self.offload.score(embeds, [t[0] for t in entry.targets])
                futures.append(_then(asked, lambda logp, row=row: self._scored(plan, row, logp)))
            else:
                sampling = plan.sampling[row] or GREEDY
                asked = self.offload.generate(embeds, plan.max_new[row], sampling, plan.sinks[row])
                futures.append(_then(asked, lambda generated, row=row: self._generated(plan, row, generated)))
        return futures

    def _scored(self, plan: Plan, row: int, logp: list[float]) -> Result:
        """First-token log-probabilities of a row's labels -> its result (a one-token label's sum
        and mean are that one log-probability)."""
        return self.result(plan, Output({row: torch.tensor(logp, dtype=torch.float32)}), row)

    def _generated(self, plan: Plan, row: int, generated: Generated) -> Result:
        task = plan.tasks[row]
        return Result(task.name, task.version, generated.text, finish_reason=generated.finish_reason, prompt_tokens=len(plan.prompt_ids[row]),
                      completion_tokens=len(generated.tokens), logprobs=generated.logprobs)

    # ---- the shared forward path ------------------------------------------------------------
    def _encode(self, plan: Plan, *, live: bool, capture: bool = False, labels_only: bool = False) -> tuple[Encoded, BatchContext, dict[ModuleKey, RowGroup]]:
        """Methods fill the context, then the first pass runs. `live` recomputes static per-task
        tensors with gradients (training) instead of using the cache. `labels_only`: the last
        logits of the labels' first tokens only, where that is all the rows need (`_label_columns`)."""
        ctx, groups, token_embeds, lengths, form = self._modulate(plan, live=live, capture=capture)
        embeds, mask = pack_rows(ctx.prefix, ctx.prefix_len, token_embeds, lengths, left_pad=self.runner.left_pad, multiple=self.config.length_multiple)
        columns = self._label_columns(plan) if labels_only else None
        enc = self.runner.encode(embeds, mask, ctx, form, columns)
        if capture and ctx.features is not None:
            pooled = masked_mean(ctx.features, enc.mask[:, -ctx.features.shape[1] :])  # [b, d]; the feature site saw this pass's positions
            for group in groups.values():
                group.features = pooled[group.rows]
        return enc, ctx, groups

    def _modulate(self, plan: Plan, *, live: bool, capture: bool = False) -> tuple[BatchContext, dict[ModuleKey, RowGroup], Tensor, Tensor, FormRequest | None]:
        """Pin the plan's tasks and let every method write its rows' modulation into one context.
        Returns it with the groups, token embeddings [b, n, d] and lengths [b], and the form
        request IP's rows make of the first pass (None when no row asks)."""
        device = self.backbone.device
        plan.loaded = loaded = self.tasks.pin(plan.tasks, {key: g.method for key, g in plan.groups.items()})
        ids, lengths = pad_ids(plan.prompt_ids, self.backbone.pad_id, device)
        token_embeds = self.backbone.embed(ids)  # [b, n, d], real tokens first
        token_mask = (torch.arange(ids.shape[1], device=device) < lengths.unsqueeze(1)).long()
        ctx = BatchContext(len(plan.tasks), self.backbone.d_model, self.backbone.n_layers, device, self.backbone.dtype, capture_features=capture)
        groups: dict[ModuleKey, RowGroup] = {}
        for key, plan_group in plan.groups.items():
            method, rows = plan_group.method, plan_group.rows
            distinct: list[LoadedTask] = list(dict.fromkeys(loaded[r] for r in rows))
            slot_of = {id(entry): i for i, entry in enumerate(distinct)}
            index = torch.tensor(rows, device=device)
            groups[key] = group = RowGroup(
                rows=index,
                tasks=[entry.task for entry in distinct],
                task_slot=torch.tensor([slot_of[id(loaded[r])] for r in rows], device=device),
                statics=[method.static(entry.task) if live else entry.static for entry in distinct],
                embeds=token_embeds[index],
                mask=token_mask[index],
                peers=self.tasks.peers(key) if live else [],
            )
            method.modulate(group, ctx)
        form_keys = [k for k, g in plan.groups.items() if g.method.uses_form]
        form = None
        if form_keys:
            form_rows = torch.cat([groups[k].rows for k in form_keys])

            def deliver(states: Tensor) -> None:  # [n1, f, d1] for form_rows, in order
                start = 0
                for k in form_keys:
                    n = groups[k].rows.numel()
                    plan.groups[k].method.modulate_from_form(groups[k], ctx, states[:, start : start + n])
                    start += n

            form = FormRequest(form_rows, [plan.form_texts[r] for r in form_rows.tolist()], deliver)
        ctx.assemble()
        return ctx, groups, token_embeds, lengths, form

    def _label_columns(self, plan: Plan) -> Tensor | None:
        """The vocabulary ids [k] (sorted) whose first-pass logits a resident plan needs, when every
        row is a classification row scored by `first` or `sum`: a row's log-normaliser is then the
        same for all its labels and cancels in the softmax over them, so the LM head need not see
        the rest of the vocabulary. None (the whole vocabulary) for generative rows, `mean`
        scoring (it divides the normaliser by each label's length) and T5 (labels go through its
        decoder)."""
        if self.backbone.is_encoder_decoder:
            return None
        firsts: set[int] = set()
        for entry in plan.loaded:
            if not entry.task.spec.is_classification or entry.task.spec.scoring == "mean":
                return None
            firsts.update(t[0] for t in entry.targets)
        return torch.tensor(sorted(firsts), device=self.backbone.device)

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
                if plan.tasks[row].spec.scoring == "mean":
                    s = s / torch.tensor([len(t) for t in pair_target[start : start + count]])
                scores[row] = s
        decoding = None
        if gen_rows:
            rows = torch.tensor(gen_rows, device=device)  # generation last: it may consume the prompt cache
            sampling = [plan.sampling[r] or GREEDY for r in gen_rows]
            decoding = self.runner.generate(enc, ctx, rows, [plan.max_new[r] for r in gen_rows], sampling, [plan.sinks[r] for r in gen_rows])
        return Output(scores, gen_rows, decoding)

    # ---- training ---------------------------------------------------------------------------
    def loss(self, examples: list[Example]) -> dict[str, Tensor]:
        """Teacher-forced mean token cross-entropy of the targets plus the methods' extra losses
        (PHA eq 9). Gradients reach method and task parameters only: the backbone is frozen."""
        plan = self.schedule([Request(e.task, e.text) for e in examples])
        targets = []
        for e, task in zip(examples, plan.tasks):
            if task.spec.is_classification:
                ids = self.backbone.label_ids(e.target, task.spec.template)
            else:
                ids = self.backbone.encode_target(e.target)
                if not self.backbone.is_encoder_decoder:
                    ids = ids + [self.backbone.eos_id]  # teach generative tasks to stop
            targets.append(ids)
        capture = any(g.method.wants_features for g in plan.groups.values())
        enc, ctx, groups = self._encode(plan, live=True, capture=capture)
        rows = torch.arange(len(examples), device=self.backbone.device)
        logp = self.runner.label_logprobs(enc, ctx, rows, targets)  # [b, n]
        count = sum(len(t) for t in targets)
        lm = -logp.sum() / count
        extra = [x for k, g in groups.items() if (x := plan.groups[k].method.extra_loss(g)) is not None]
        aux = torch.stack(extra).sum() if extra else lm.new_zeros(())
        return {"loss": lm + aux, "lm": lm, "aux": aux}


def _then(future: Future, convert: Callable[[Any], Any]) -> Future:
    """A future of `convert(result)`; a row's own failure (a TaskservError, raised by the other
    engine or by `convert`) becomes its outcome, as in a native batch. Cancelling it cancels `future`."""
    out: Future = Future()

    def done(f: Future) -> None:
        if f.cancelled():
            out.cancel()
            return
        try:
            out.set_result(convert(f.result()))
        except TaskservError as exc:
            out.set_result(exc)
        except BaseException as exc:  # noqa: BLE001 - handed to the waiter
            out.set_exception(exc)

    out.add_done_callback(lambda f: future.cancel() if f.cancelled() else None)
    future.add_done_callback(done)
    return out
