"""Thin routes over AppState: validation in the schemas, work in the engine / store / batcher."""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import time
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server.api.app import AppState
from server.api.schemas import JobPublic, PredictRequest, PredictResult, PredictResults, TaskCreate, TaskCreated, TaskList, TaskPublic
from server.engine import Request as Row, Result
from server.task import Task
from server.errors import Conflict, InvalidRequest, NotReady, TaskservError, Unauthorized

router = APIRouter()


def get_state(request: Request) -> AppState:
    state: AppState | None = getattr(request.app.state, "taskserve", None)
    if state is None or not state.ready:
        raise NotReady("the server is starting or stopping")
    return state


State = Annotated[AppState, Depends(get_state)]


def require_key(state: State, authorization: Annotated[str | None, Header()] = None, x_api_key: Annotated[str | None, Header()] = None) -> None:
    expected = state.settings.api_key
    if not expected:
        return
    given = x_api_key or (authorization.removeprefix("Bearer ").strip() if authorization else "")
    if not hmac.compare_digest(given.encode(), expected.encode()):
        raise Unauthorized("this endpoint needs the API key (Authorization: Bearer <key> or X-API-Key)")


Admin = Depends(require_key)


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(state: State) -> dict[str, object]:
    await asyncio.to_thread(state.store.registry.list_tasks)  # the store answers
    return {"status": "ready", "tasks": len(state.engine.tasks), "backbone": state.engine.backbone.fingerprint}


@router.get("/metrics")
async def metrics(state: State) -> Response:
    state.metrics.queue_depth.set(state.batcher.depth)
    state.metrics.task_memory.set(state.engine.resident_bytes)
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.post("/v1/predict", response_model=PredictResult | PredictResults)
async def predict(body: PredictRequest, state: State):
    start = time.perf_counter()
    rows = body.rows()

    async def one(row) -> PredictResult:
        try:
            result = await state.batcher.submit(Row(row.task, row.text, body.options.max_new_tokens), tokens=len(row.text) + 1)
        except TaskservError as exc:
            state.metrics.predictions.labels(row.task if row.task in state.engine.tasks else "_unknown", exc.type).inc()
            raise
        state.metrics.predictions.labels(row.task, "ok").inc()
        return _public_result(result, body.options.return_scores)

    results = await asyncio.gather(*(one(r) for r in rows))
    state.metrics.latency.labels("predict").observe(time.perf_counter() - start)
    return results[0] if body.inputs is None else PredictResults(results=list(results))


def _public_result(result: Result, return_scores: bool) -> PredictResult:
    """Labels as the user wrote them: decoder-only verbalizers carry a leading space for
    tokenization (" positive"), which is not part of the label."""
    if result.label is None:
        return PredictResult(task=result.task, output=result.output, task_version=result.task_version)
    scores = {k.strip(): v for k, v in result.scores.items()} if return_scores and result.scores else None
    label = result.label.strip()
    return PredictResult(task=result.task, output=label, label=label, scores=scores, task_version=result.task_version)


def _public(row: dict, served: dict[str, Task]) -> TaskPublic:
    """A registry row as the API shows it; `served` is the engine's task table (read once per call)."""
    task = served.get(row["name"])
    spec = dataclasses.asdict(task.spec) if task is not None else None
    if spec is not None:
        spec.pop("extra", None)
        spec["labels"] = [label.strip() for label in spec["labels"]]
    return TaskPublic(name=row["name"], method=row["method"], status=row["status"], version=row["current_version"], served=task is not None, error=row.get("error"), spec=spec)


@router.get("/v1/tasks", response_model=TaskList)
async def list_tasks(state: State) -> TaskList:
    rows = await asyncio.to_thread(state.store.registry.list_tasks)
    served = state.engine.tasks
    return TaskList(tasks=[_public(r, served) for r in rows])


@router.get("/v1/tasks/{name}", response_model=TaskPublic)
async def show_task(name: str, state: State) -> TaskPublic:
    return _public(await asyncio.to_thread(state.store.registry.get_task, name), state.engine.tasks)


@router.delete("/v1/tasks/{name}", status_code=204, dependencies=[Admin])
async def delete_task(name: str, state: State) -> Response:
    await asyncio.to_thread(state.store.registry.delete_task, name)
    await state.batcher.run_on_engine_thread(state.engine.remove_task, name)
    return Response(status_code=204)


@router.post("/v1/tasks", status_code=201, response_model=TaskCreated, dependencies=[Admin])
async def create_task(body: TaskCreate, state: State, response: Response) -> TaskCreated:
    engine, registry = state.engine, state.store.registry
    spec = body.spec(engine.backbone.is_encoder_decoder)
    method = engine.method(body.method)
    try:  # init is method-specific free-form JSON: malformed values are the caller's error, not a 500
        init = method.resolve_init(body.init, engine.tasks)
    except (TypeError, ValueError) as exc:
        raise InvalidRequest(f"init: {exc}") from None
    if body.examples:
        rows = body.training_rows(spec)
        limit = state.settings.max_examples
        if not 2 <= len(rows) <= limit:
            raise InvalidRequest(f"examples: give between 2 and {limit} examples, got {len(rows)}")
        if body.train.steps > state.settings.max_train_steps:
            raise InvalidRequest(f"train.steps: at most {state.settings.max_train_steps}")
        await asyncio.to_thread(registry.reserve, body.name, body.method)
        job = await asyncio.to_thread(registry.create_job, body.name, body.model_dump(mode="json"))
        response.status_code = 202
        return TaskCreated(task=_public(await asyncio.to_thread(registry.get_task, body.name), engine.tasks), job=job["id"])
    if not method.ready_without_training(spec, init):
        raise InvalidRequest(f"examples: a {body.method} task with this init needs training examples")
    if await asyncio.to_thread(registry.exists, body.name):
        raise Conflict(f"task {body.name!r} already exists")
    try:
        task = engine.new_task(body.name, body.method, spec, init=init)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise InvalidRequest(f"init: {exc}") from None

    def publish_and_load() -> None:
        state.store.publish(task, engine.backbone.fingerprint)
        engine.add_task(task)

    await state.batcher.run_on_engine_thread(publish_and_load)
    return TaskCreated(task=_public(await asyncio.to_thread(registry.get_task, body.name), engine.tasks))


@router.get("/v1/jobs/{job_id}", response_model=JobPublic)
async def show_job(job_id: str, state: State) -> JobPublic:
    job = await asyncio.to_thread(state.store.registry.get_job, job_id)
    return JobPublic(**{k: job[k] for k in JobPublic.model_fields})


@router.delete("/v1/jobs/{job_id}", response_model=JobPublic, dependencies=[Admin])
async def cancel_job(job_id: str, state: State) -> JobPublic:
    job = await asyncio.to_thread(state.store.registry.cancel_job, job_id)
    return JobPublic(**{k: job[k] for k in JobPublic.model_fields})
