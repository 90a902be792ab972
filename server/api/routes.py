"""Thin routes over AppState: validation in the schemas and `server.creation`, work in the engine /
store / batcher."""

from __future__ import annotations

import asyncio
import dataclasses
import time

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server import creation
from server.api.schemas import JobList, JobPublic, JobStatus, PredictOne, PredictRequest, PredictResult, PredictResults, TaskCreate, TaskCreated, TaskList, TaskPrompt, TaskPublic
from server.api.state import Admin, RegistryUp, State, while_connected
from server.engine import Result
from server.errors import Conflict, TaskservError, Unavailable
from server.task import Request as Row, Task

router = APIRouter()
tasks_router = APIRouter()
"""The task, job and predict routes, under /v1 and, unversioned, under / (DESIGN.md's `POST /tasks`)."""


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(state: State) -> dict[str, object]:
    """200 while the engine serves its loaded tasks; 503 while starting or stopping. A registry that
    does not answer leaves the loaded tasks answering, so it does not fail readiness (a blip of the
    one registry every replica shares would take them all out of rotation): the status is then
    `degraded` and `down` says what is down and why."""
    ready = {"status": "ready", "tasks": len(state.engine.tasks), "backbone": state.engine.backbone.fingerprint}
    why = await state.registry_down() or state.store.registry.read_only()
    return ready if why is None else {**ready, "status": "degraded", "down": {"registry": why}}


@router.get("/metrics")
async def metrics(state: State) -> Response:
    state.metrics.queue_depth.set(state.batcher.depth)
    state.metrics.task_memory.set(state.engine.tasks.resident_bytes)
    for backend, rows in state.engine.rows_by_backend.items():
        state.metrics.backend_rows.labels(backend).set(rows)
    state.metrics.split_batches.set(state.engine.split_batches)
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@tasks_router.post("/predict", response_model=PredictResult | PredictResults)
async def predict(body: PredictRequest, state: State, request: Request):
    """Every row is validated before any is queued (a bad row never reaches the engine), all rows
    are admitted or none (429), the first failing row fails the request at once, and a client that
    disconnects takes its rows with it (those not yet run are dropped)."""
    start = time.perf_counter()
    rows = [Row(r.task, r.text, body.options.max_new_tokens) for r in body.rows()]
    try:
        await asyncio.to_thread(state.engine.check, rows)
        results = await while_connected(request, state.batcher.submit_all(rows, [len(r.text) + 1 for r in rows]))
    except TaskservError as exc:
        for r in rows:  # the request failed as a whole: count its rows under the error
            state.metrics.predicted(r.task if r.task in state.engine.tasks else "_unknown", exc.type)
        raise
    for r in rows:
        state.metrics.predicted(r.task, "ok")
    state.metrics.latency.labels("predict").observe(time.perf_counter() - start)
    public = [_public_result(result, body.options.return_scores) for result in results]
    return public[0] if isinstance(body, PredictOne) else PredictResults(results=public)


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


@tasks_router.get("/tasks", response_model=TaskList, dependencies=[RegistryUp])
async def list_tasks(state: State) -> TaskList:
    rows = await asyncio.to_thread(state.store.registry.list_tasks)
    served = state.engine.tasks.snapshot()
    return TaskList(tasks=[_public(r, served) for r in rows])


@tasks_router.get("/tasks/{name}", response_model=TaskPublic, dependencies=[RegistryUp])
async def show_task(name: str, state: State) -> TaskPublic:
    return _public(await asyncio.to_thread(state.store.registry.get_task, name), state.engine.tasks.snapshot())


@tasks_router.delete("/tasks/{name}", status_code=204, dependencies=[Admin, RegistryUp])
async def delete_task(name: str, state: State) -> Response:
    await asyncio.to_thread(state.store.registry.delete_task, name)

    def unload() -> None:
        state.changes += 1  # a store sync that read the registry before the delete must not bring it back
        state.engine.tasks.remove(name)

    await state.batcher.run_on_engine_thread(unload)
    return Response(status_code=204)


@tasks_router.post("/tasks", status_code=201, response_model=TaskCreated, dependencies=[Admin, RegistryUp])
async def create_task(body: TaskCreate, state: State, response: Response) -> TaskCreated:
    engine, registry = state.engine, state.store.registry
    accepted = creation.prepare(body, engine, state.settings)
    if accepted.trains:
        job = await asyncio.to_thread(registry.enqueue, body.name, body.method, body.model_dump(mode="json"), state.settings.max_queued_jobs)
        response.status_code = 202
        return TaskCreated(task=_public(await asyncio.to_thread(registry.get_task, body.name), engine.tasks.snapshot()), job=job["id"])
    if await asyncio.to_thread(registry.exists, body.name):
        raise Conflict(f"task {body.name!r} already exists")
    made = creation.ready_task(accepted, engine)

    def publish_and_load() -> Task:
        if registry.exists(body.name):  # checked again here, where creations publish one at a time
            raise Conflict(f"task {body.name!r} already exists")
        task = dataclasses.replace(made, version=state.store.next_version(made.name))  # a deleted task's versions are not reused
        try:
            state.store.publish(task, engine.backbone.fingerprint)
        except OSError as exc:  # a full or read-only disk: the artifact is written atomically, so nothing was published
            raise Unavailable(f"the store ({state.store.root}) could not be written: {exc.strerror or exc}; task {task.name!r} was not published") from exc
        state.changes += 1  # a store sync that read the registry before the publish must not unload it
        engine.tasks.add(task)
        return task

    task = await state.batcher.run_on_engine_thread(publish_and_load)
    created = {"name": task.name, "method": task.method, "status": "ready", "current_version": task.version, "error": None}
    return TaskCreated(task=_public(created, {task.name: task}))  # what was published (a delete may follow at once)


@tasks_router.get("/tasks/{name}/prompt", response_model=TaskPrompt, dependencies=[Admin])
async def task_prompt(name: str, state: State) -> TaskPrompt:
    """The fixed soft prompt a task prepends (what `taskserve tasks export-peft` writes); 422 with
    the reason for methods without one."""
    task = state.engine.tasks.get_task(name)
    prompt = state.engine.tasks.method(task.method, task.module_version).fixed_prompt(task)
    return TaskPrompt(name=task.name, method=task.method, version=task.version, seq2seq=state.engine.backbone.is_encoder_decoder,
                      backbone=state.engine.backbone.fingerprint, prompt=prompt.float().cpu().tolist())


@tasks_router.get("/jobs", response_model=JobList, dependencies=[RegistryUp])
async def list_jobs(state: State, status: JobStatus | None = None, limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> JobList:
    jobs = await asyncio.to_thread(state.store.registry.list_jobs, status, limit)
    return JobList(jobs=[JobPublic(**{k: job[k] for k in JobPublic.model_fields}) for job in jobs])


@tasks_router.get("/jobs/{job_id}", response_model=JobPublic, dependencies=[RegistryUp])
async def show_job(job_id: str, state: State) -> JobPublic:
    job = await asyncio.to_thread(state.store.registry.get_job, job_id)
    return JobPublic(**{k: job[k] for k in JobPublic.model_fields})


@tasks_router.delete("/jobs/{job_id}", response_model=JobPublic, dependencies=[Admin, RegistryUp])
async def cancel_job(job_id: str, state: State) -> JobPublic:
    job = await asyncio.to_thread(state.store.registry.cancel_job, job_id)
    return JobPublic(**{k: job[k] for k in JobPublic.model_fields})
