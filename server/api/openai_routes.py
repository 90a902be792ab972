"""The OpenAI-compatible API: `GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions`.

A task is a model (`model` = the task's name); the backbone is listed as every task's parent. Each
prompt (or conversation) is one row through the same batcher and engine as `/v1/predict`: the task's
template, description and modulation apply, rows of every endpoint share batches. A classification
task answers with its label as the text and its per-label probabilities in the extra field
`label_scores` of the choice. Generative tasks sample (temperature / top-p / seed, stop strings,
log-probabilities) and stream as server-sent events ending in `data: [DONE]`; tokens leave the
engine as they are produced (the batcher advances generations token by token between batches).
Chat: a classification task reads the last user message; a generative task reads the whole
conversation rendered with the backbone's chat template (a plain `role: content` transcript when the
tokenizer has none).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from server.api.openai_schemas import ChatCompletionRequest, ChatMessage, CompletionRequest, ModelCard, ModelList
from server.api.state import AppState, State, while_connected
from server.decoding import TokenEvent
from server.engine import Result
from server.errors import NotFound, TaskservError
from server.task import Request as Row

router = APIRouter()


def backbone_id(state: AppState) -> str:
    source = str(state.settings.backbone)
    return Path(source).name or source


@router.get("/v1/models", response_model=ModelList)
async def list_models(state: State) -> ModelList:
    rows = await asyncio.to_thread(state.store.registry.list_tasks)
    served = state.engine.tasks.snapshot()
    parent = backbone_id(state)
    cards = [ModelCard(id=parent, created=0, root=str(state.settings.backbone))]
    for row in rows:
        task = served.get(row["name"])
        labels = list(task.spec.labels) if task is not None and task.spec.labels else None
        created = int(row["created_at"].timestamp()) if row.get("created_at") else 0
        cards.append(ModelCard(id=row["name"], created=created, parent=parent, root=f"taskserve:{row['method']}", method=row["method"], status=row["status"], labels=labels))
    return ModelList(data=cards)


@router.get("/v1/models/{model}", response_model=ModelCard)
async def show_model(model: str, state: State) -> ModelCard:
    for card in (await list_models(state)).data:
        if card.id == model:
            return card
    raise NotFound(f"model {model!r} does not exist (models are the served tasks)")


def _task(state: AppState, model: str):
    task = state.engine.tasks.get(model)
    if task is None:
        hint = " — the backbone serves through tasks: create one (a `plain` task is the backbone alone)" if model == backbone_id(state) else ""
        raise NotFound(f"model {model!r} does not exist{hint}")
    return task


def _chat_text(state: AppState, messages: list[ChatMessage], generative: bool) -> str:
    if not generative:  # a classifier reads what the user said last
        users = [m.text for m in messages if m.role == "user"]
        return users[-1] if users else messages[-1].text
    tokenizer = state.engine.backbone.tokenizer
    turns = [{"role": "system" if m.role == "developer" else m.role, "content": m.text} for m in messages]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    return "".join(f"{t['role']}: {t['content']}\n" for t in turns) + "assistant:"


async def _rows(state: AppState, rows: list[Row], *, checked: bool = False, request: Request | None = None) -> list[Result]:
    """The rows' results, each row checked before any is queued; given the `request`, a client that
    disconnects drops its rows not yet run (a stream's generator is cancelled instead)."""
    if not checked:
        await asyncio.to_thread(state.engine.check, rows)
    work = state.batcher.submit_all(rows, [len(r.text) + 1 for r in rows])
    return await (while_connected(request, work) if request is not None else work)


def _usage(results: list[Result]) -> dict[str, int]:
    prompt, completion = sum(r.prompt_tokens for r in results), sum(r.completion_tokens for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _completion_logprobs(result: Result) -> dict[str, Any] | None:
    if not result.logprobs:
        return None
    offsets, at = [], 0
    for item in result.logprobs:
        offsets.append(at)
        at += len(item["token"])
    return {"tokens": [i["token"] for i in result.logprobs], "token_logprobs": [i["logprob"] for i in result.logprobs],
            "top_logprobs": [i["top"] for i in result.logprobs], "text_offset": offsets}


def _chat_logprobs(result: Result) -> dict[str, Any] | None:
    if not result.logprobs:
        return None
    return {"content": [{"token": i["token"], "logprob": i["logprob"], "bytes": list(i["token"].encode()),
                         "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode())} for t, v in i["top"].items()]} for i in result.logprobs]}


def _label_scores(result: Result) -> dict[str, float] | None:
    return result.scores if result.label is not None else None


@router.post("/v1/completions")
async def completions(body: CompletionRequest, state: State, request: Request):
    task = _task(state, body.model)
    sampling = body.sampling(body.logprobs or 0)
    head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()), "model": body.model}
    if body.stream:
        return await _stream(state, head, [Row(task.name, p, body.max_tokens, sampling) for p in body.prompts], chat=False, include_usage=body.include_usage)
    results = await _rows(state, [Row(task.name, p, body.max_tokens, sampling) for p in body.prompts], request=request)
    choices = [{"index": i, "text": r.output, "logprobs": _completion_logprobs(r), "finish_reason": r.finish_reason, "label_scores": _label_scores(r)} for i, r in enumerate(results)]
    return {**head, "choices": choices, "usage": _usage(results)}


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, state: State, request: Request):
    task = _task(state, body.model)
    text = _chat_text(state, body.messages, generative=not task.spec.is_classification)
    sampling = body.sampling((body.top_logprobs or 1) if body.logprobs else 0)
    row = Row(task.name, text, body.new_tokens, sampling)
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()), "model": body.model}
    if body.stream:
        return await _stream(state, {**head, "object": "chat.completion.chunk"}, [row], chat=True, include_usage=body.include_usage)
    result = (await _rows(state, [row], request=request))[0]
    choice = {"index": 0, "message": {"role": "assistant", "content": result.output}, "logprobs": _chat_logprobs(result),
              "finish_reason": result.finish_reason, "label_scores": _label_scores(result)}
    return {**head, "choices": [choice], "usage": _usage([result])}


async def _stream(state: AppState, head: dict[str, Any], rows: list[Row], *, chat: bool, include_usage: bool) -> StreamingResponse:
    """Server-sent events: a chunk per piece of text as the engine produces it, one per
    classification answer, a final chunk per choice with its finish reason, then `[DONE]`. Rows
    are checked before the stream starts, so a bad row is an HTTP error, not a broken stream."""
    await asyncio.to_thread(state.engine.check, rows)
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[tuple[int, TokenEvent]] = asyncio.Queue()

    def sink_for(i: int):
        return lambda event: loop.call_soon_threadsafe(events.put_nowait, (i, event))

    rows = [Row(r.task, r.text, r.max_new_tokens, r.sampling, sink=sink_for(i)) for i, r in enumerate(rows)]

    def chunk(i: int, text: str | None, finish: str | None, extra: dict[str, Any] | None = None) -> str:
        if chat:
            choice = {"index": i, "delta": {} if text is None else {"content": text}, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": i, "text": text or "", "logprobs": None, "finish_reason": finish}
        payload = {**head, "choices": [{**choice, **(extra or {})}]}
        return f"data: {json.dumps(payload)}\n\n"

    async def produce() -> AsyncIterator[str]:
        job = asyncio.ensure_future(_rows(state, rows, checked=True))
        try:
            if chat:
                for i in range(len(rows)):
                    yield f"data: {json.dumps({**head, 'choices': [{'index': i, 'delta': {'role': 'assistant', 'content': ''}, 'logprobs': None, 'finish_reason': None}]})}\n\n"
            while not job.done() or not events.empty():
                waiter = asyncio.ensure_future(events.get())
                done, _ = await asyncio.wait({waiter, job}, return_when=asyncio.FIRST_COMPLETED)
                if waiter not in done:
                    waiter.cancel()
                    continue
                i, event = waiter.result()
                if event.finish_reason is None:
                    yield chunk(i, event.text, None)
            try:
                results = job.result()
            except Exception as exc:  # noqa: BLE001 - the stream has started: the error goes in the stream
                error = exc.to_dict() if isinstance(exc, TaskservError) else {"error": {"type": "internal", "message": str(exc)}}
                yield f"data: {json.dumps(error)}\n\n"
                yield "data: [DONE]\n\n"
                return
            for i, result in enumerate(results):
                if result.label is not None:  # a classification answer arrives whole
                    yield chunk(i, result.output, None)
                yield chunk(i, None if chat else "", result.finish_reason, {"label_scores": result.scores} if result.label is not None else None)
            if include_usage:
                yield f"data: {json.dumps({**head, 'choices': [], 'usage': _usage(results)})}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            job.cancel()  # a client that went away: rows not yet run are dropped

    return StreamingResponse(produce(), media_type="text/event-stream")
