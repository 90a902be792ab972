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
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from adapters_store.store import Store
from server.api.metrics import Metrics
from server.api.supervisor import WorkerProcess
from server.batcher import Batcher, BatcherConfig
from server.engine import Engine, EngineConfig, Request as Row, Result
from server.errors import Overloaded, TaskservError
from server.settings import Settings

log = logging.getLogger("taskserve.api")


@dataclass
class AppState:
    settings: Settings
    engine: Engine
    store: Store
    batcher: Batcher
    metrics: Metrics
    ready: bool = False


def load_engine(settings: Settings, task_memory: bool = True) -> Engine:
    """The backbone (+ form module) the settings name; `task_memory=False` for a training worker,
    whose trained tensors must stay resident."""
    from server import assets
    from server.backbone import load_backbone, load_form_module

    device, dtype = settings.resolved_device(), settings.resolved_dtype()
    backbone = load_backbone(assets.resolve_backbone(settings.backbone, settings.cache_dir), device=device, dtype=dtype)
    form = None
    if not backbone.is_encoder_decoder and settings.form_module != "none":
        form = load_form_module(assets.resolve_form_module(settings.form_module, settings.cache_dir), device=device)
    memory = int(settings.task_memory_mb * 2**20) if settings.task_memory_mb and task_memory else None
    return Engine(backbone, form, config=EngineConfig(max_input_tokens=settings.max_input_tokens, task_memory_bytes=memory))


def create_app(settings: Settings | None = None, engine: Engine | None = None) -> FastAPI:
    settings = settings or Settings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        eng = engine or await asyncio.to_thread(load_engine, settings)
        store = Store(settings.store, settings.db_url)
        metrics = Metrics()

        def run_batch(rows: Sequence[Row]) -> list[Result]:
            metrics.batch_rows.observe(len(rows))
            return eng.run(list(rows))

        batcher = Batcher(run_batch, BatcherConfig(settings.max_batch_rows, settings.max_batch_tokens, settings.max_wait_ms, settings.max_queue, settings.request_timeout_s))
        state = AppState(settings, eng, store, batcher, metrics)
        app.state.taskserve = state
        seeded = await asyncio.to_thread(store.seed, settings.seed_store)
        if seeded:
            log.info("store seeded from %s: %s", settings.seed_store, ", ".join(seeded))
        await batcher.run_on_engine_thread(store.attach, eng)
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

    app = FastAPI(title="taskserve", version="1", lifespan=lifespan)

    @app.exception_handler(TaskservError)
    async def _taskserv_error(request: Request, exc: TaskservError) -> JSONResponse:
        headers = {"Retry-After": str(max(1, round(exc.retry_after)))} if isinstance(exc, Overloaded) else None
        return JSONResponse(exc.to_dict(), status_code=exc.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}" for e in exc.errors())
        return JSONResponse({"error": {"type": "invalid_request", "message": errors}}, status_code=422)

    from server.api.routes import router

    app.include_router(router)
    return app


async def _poll(state: AppState) -> None:
    while True:
        await asyncio.sleep(state.settings.sync_interval_s)
        try:
            report = await state.batcher.run_on_engine_thread(state.store.sync, state.engine)
            if report.loaded or report.removed or report.failed:
                log.info("store sync: loaded %s, removed %s, failed %s", report.loaded, report.removed, sorted(report.failed))
            state.metrics.tasks_loaded.set(len(state.engine.tasks))
        except Exception:  # noqa: BLE001 - a broken store read must not stop hot-loading for good
            log.exception("store sync failed")

