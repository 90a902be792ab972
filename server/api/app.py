"""`create_app(settings)`: the FastAPI application, its lifespan and its one error handler.

The lifespan loads the backbone (and IP's form module on decoder-only backbones), opens the store,
loads every ready task into the engine, starts the dynamic batcher and a poller that re-syncs the
engine with the registry every `sync_interval_s` (hot-loading). Nothing happens at import time.
Store syncs run on the engine thread, between batches, so a batch never sees a half-applied sync.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from adapters_store.store import Store
from server.api.metrics import Metrics
from server.api.openai_routes import router as openai_router
from server.api.routes import router, tasks_router
from server.api.state import AppState
from server.api.supervisor import WorkerProcess
from server.batcher import Batcher, BatcherConfig, Partial
from server.engine import Engine
from server.errors import InvalidRequest, Overloaded, TaskservError
from server.factory import build_engine
from server.methods import load_plugins
from server.settings import Settings
from server.store_sync import attach, sync

log = logging.getLogger("taskserve.api")


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def check_exposure(settings: Settings) -> None:
    """Refuse to serve task-changing routes without an API key to anyone but this machine: bound
    to another address, the server needs TASKSERVE_API_KEY, or an explicit TASKSERVE_ALLOW_OPEN_ADMIN."""
    if settings.api_key or settings.allow_open_admin or settings.host in LOOPBACK:
        return
    raise InvalidRequest(
        f"host: refusing to bind {settings.host} without an API key — every route that creates or deletes tasks would be open "
        "to whoever reaches it. Set TASKSERVE_API_KEY (clients send `Authorization: Bearer <key>`), bind to 127.0.0.1, or "
        "set TASKSERVE_ALLOW_OPEN_ADMIN=true on a network you trust."
    )


def create_app(settings: Settings | None = None, engine: Engine | None = None) -> FastAPI:
    settings = settings or Settings()

    load_plugins(settings.plugin_modules)  # before the first schema is generated: plugin methods are listed

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        eng = engine or await asyncio.to_thread(build_engine, settings)
        store = Store(settings.store, settings.db_url)
        metrics = Metrics()
        config = BatcherConfig(settings.max_batch_rows, settings.max_batch_chars, settings.max_wait_ms, settings.max_queue, settings.request_timeout_s)
        batcher = Batcher(_batch_function(eng), config, observe=metrics.observe_batch)
        state = AppState(settings, eng, store, batcher, metrics)
        app.state.taskserve = state
        seeded = await asyncio.to_thread(store.seed, settings.seed_store)
        if seeded:
            log.info("store seeded from %s: %s", settings.seed_store, ", ".join(seeded))
        await batcher.run_on_engine_thread(attach, store, eng)
        metrics.tasks_loaded.set(len(eng.tasks))
        state.ready = True
        poller = asyncio.create_task(_poll(state))
        worker = WorkerProcess(settings) if settings.embedded_worker else None
        if worker is not None:
            worker.start()
        try:
            yield
        finally:
            state.ready = False
            poller.cancel()
            if worker is not None:
                await worker.stop()
            await batcher.close()  # drain: queued and in-flight rows complete
            store.close()
            if engine is None:  # an engine built here is closed here (vLLM's processes)
                await asyncio.to_thread(eng.close)

    app = FastAPI(title="taskserve", version="1", lifespan=lifespan)

    @app.exception_handler(TaskservError)
    async def _taskserv_error(request: Request, exc: TaskservError) -> JSONResponse:
        headers = {"Retry-After": str(max(1, round(exc.retry_after)))} if isinstance(exc, Overloaded) else None
        return JSONResponse(exc.to_dict(), status_code=exc.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}" for e in exc.errors())
        return JSONResponse({"error": {"type": "invalid_request", "message": errors}}, status_code=422)

    app.include_router(router)
    app.include_router(tasks_router, prefix="/v1")
    app.include_router(tasks_router, include_in_schema=False)  # the unversioned aliases
    app.include_router(openai_router)
    return app


def _batch_function(engine: Engine):
    """The batcher's view of the engine: each row's outcome, and generating rows as a continuation
    the batcher advances token by token between other batches."""

    def run_batch(rows: list) -> list | Partial:
        outcomes, running = engine.start_each(list(rows))
        return Partial(outcomes, running) if running is not None else [outcomes[i] for i in range(len(rows))]

    return run_batch


async def _poll(state: AppState) -> None:
    while True:
        await asyncio.sleep(state.settings.sync_interval_s)
        try:
            report = await state.batcher.run_on_engine_thread(sync, state.store, state.engine)
            if report.loaded or report.removed or report.failed:
                log.info("store sync: loaded %s, removed %s, failed %s", report.loaded, report.removed, sorted(report.failed))
            state.metrics.tasks_loaded.set(len(state.engine.tasks))
        except Exception:  # noqa: BLE001 - a broken store read must not stop hot-loading for good
            log.exception("store sync failed")

