"""Thin routes over AppState: validation in the schemas and `server.creation`, work in the engine /
store / batcher."""

from __future__ import annotations

import asyncio
import dataclasses
import time

from typing import Annotated

from fastapi import APIRouter, Query, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server import creation
from server.api.schemas import JobList, JobPublic, PredictRequest, PredictResult, PredictResults, TaskCreate, TaskCreated, TaskList, TaskPrompt, TaskPublic
from server.api.state import Admin, State
from server.engine import Result
from server.errors import Conflict, TaskservError
from server.task import Request as Row, Task

router = APIRouter()
tasks_router = APIRouter()
"""The task, job and predict routes, under /v1 and, unversioned, under / (DESIGN.md's `POST /tasks`)."""


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
    state.metrics.task_memory.set(state.engine.tasks.resident_bytes)
    for backend, rows in state.engine.rows_by_backend.items():
        state.metrics.backend_rows.labels(backend).set(rows)
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@tasks_router.post("/predict", response_model=PredictResult | PredictResults)
async def predict(body: PredictRequest, state: State):
    """Every row is validated before any is queued, all rows are admitted or none (429), and the
    first failing row fails the request at once (the others are dropped if they have not run)."""
    start = time.perf_counter()
    rows = [Row(r.task, r.text, body.options.max_new_tokens) for r in body.rows()]
    try:
        if len(rows) > 1:
            await asyncio.to_thread(state.engine.check, rows)
        results = await state.batcher.submit_all(rows, [len(r.text) + 1 for r in rows])
    except TaskservError as exc:
        for r in rows:  # the request failed as a whole: count its rows under the error
            state.metrics.predictions.labels(r.task if r.task in state.engine.tasks else "_unknown", exc.type).inc()
        raise
    for r in rows:
        state.metrics.predictions.labels(r.task, "ok").inc()
    state.metrics.latency.labels("predict").observe(time.perf_counter() - start)
    public = [_public_result(result, body.options.return_scores) for result in results]
    return public[0] if body.inputs is None else PredictResults(results=public)


def _public_result(result: Result, return_scores: bool) -> PredictResult:
    scores = result.scores if return_scores else None
    return PredictResult(task=result.task, output=result.output, label=result.label, scores=scores, task_version=result.task_version)


def _public(row: dict, served: dict[str, Task]) -> TaskPublic:
    """A registry row as the API shows it; `served` is the engine's task table (read once per call)."""
    task = served.get(row["name"])
    spec = dataclasses.asdict(task.spec) if task is not None else None
    if spec is not None:
        spec.pop("extra", None)
    return TaskPublic(name=row["name"], method=row["method"], status=row["status"], version=row["current_version"], served=task is not None, error=row.get("error"), spec=spec)


@tasks_router.get("/tasks", response_model=TaskList)
async def list_tasks(state: State) -> TaskList:
    rows = await asyncio.to_thread(state.store.registry.list_tasks)
    served = state.engine.tasks.snapshot()
    return TaskList(tasks=[_public(r, served) for r in rows])


@tasks_router.get("/tasks/{name}", response_model=TaskPublic)
async def show_task(name: str, state: State) -> TaskPublic:
    return _public(await asyncio.to_thread(state.store.registry.get_task, name), state.engine.tasks.snapshot())


@tasks_router.delete("/tasks/{name}", status_code=204, dependencies=[Admin])
async def delete_task(name: str, state: State) -> Response:
    await asyncio.to_thread(state.store.registry.delete_task, name)
    await state.batcher.run_on_engine_thread(state.engine.tasks.remove, name)
    return Response(status_code=204)


@tasks_router.post("/tasks", status_code=201, response_model=TaskCreated, dependencies=[Admin])
async def create_task(body: TaskCreate, state: State, response: Response) -> TaskCreated:
    engine, registry = state.engine, state.store.registry
    accepted = creation.prepare(body, engine, state.settings)
    if accepted.trains:
        job = await asyncio.to_thread(registry.enqueue, body.name, body.method, body.model_dump(mode="json"), state.settings.max_queued_jobs)
        response.status_code = 202
        return TaskCreated(task=_public(await asyncio.to_thread(registry.get_task, body.name), engine.tasks.snapshot()), job=job["id"])
    if await asyncio.to_thread(registry.exists, body.name):
        raise Conflict(f"task {body.name!r} already exists")
    task = creation.ready_task(accepted, engine)

    def publish_and_load() -> None:
        state.store.publish(task, engine.backbone.fingerprint)
        engine.tasks.add(task)

    await state.batcher.run_on_engine_thread(publish_and_load)
    return TaskCreated(task=_public(await asyncio.to_thread(registry.get_task, body.name), engine.tasks.snapshot()))


@tasks_router.get("/tasks/{name}/prompt", response_model=TaskPrompt, dependencies=[Admin])
async def task_prompt(name: str, state: State) -> TaskPrompt:
    """The fixed soft prompt a task prepends (what `taskserve tasks export-peft` writes); 422 with
    the reason for methods without one."""
    task = state.engine.tasks.get_task(name)
    prompt = state.engine.tasks.method(task.method, task.module_version).fixed_prompt(task)
    return TaskPrompt(name=task.name, method=task.method, version=task.version, seq2seq=state.engine.backbone.is_encoder_decoder,
                      backbone=state.engine.backbone.fingerprint, prompt=prompt.float().cpu().tolist())


@tasks_router.get("/jobs", response_model=JobList)
async def list_jobs(state: State, status: str | None = None, limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> JobList:
    jobs = await asyncio.to_thread(state.store.registry.list_jobs, status, limit)
    return JobList(jobs=[JobPublic(**{k: job[k] for k in JobPublic.model_fields}) for job in jobs])


@tasks_router.get("/jobs/{job_id}", response_model=JobPublic)
async def show_job(job_id: str, state: State) -> JobPublic:
    job = await asyncio.to_thread(state.store.registry.get_job, job_id)
    return JobPublic(**{k: job[k] for k in JobPublic.model_fields})


@tasks_router.delete("/jobs/{job_id}", response_model=JobPublic, dependencies=[Admin])
async def cancel_job(job_id: str, state: State) -> JobPublic:
    job = await asyncio.to_thread(state.store.registry.cancel_job, job_id)
    return JobPublic(**{k: job[k] for k in JobPublic.model_fields})
