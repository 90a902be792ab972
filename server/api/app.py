"""`create_app(settings)`: the FastAPI application, its lifespan and its one error handler.

The lifespan loads the backbone (and IP's form module on decoder-only backbones), opens the store,
loads every ready task into the engine, starts the dynamic batcher and a poller that re-syncs the
engine with the registry every `sync_interval_s` (hot-loading). Nothing happens at import time.
Store syncs run on the engine thread, between batches, so a batch never sees a half-applied sync.
While the registry is unavailable the loaded tasks keep answering and the poller keeps retrying; it
reads the registry off the engine thread and only applies what it read there, so a registry that
hangs never stalls a batch.

`serve(settings)` runs the app under uvicorn with a drain in front of its shutdown (`DrainingServer`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import AsyncIterator, Iterator
from types import FrameType

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from adapters_store.store import Store
from server.api.metrics import Metrics
from server.api.openai_routes import router as openai_router
from server.api.routes import router, tasks_router
from server.api.state import AppState, require_registry
from server.api.supervisor import WorkerProcess
from server.batcher import Batcher, BatcherConfig, Partial
from server.engine import Engine, Running
from server.errors import EngineFailed, InputTooLong, InvalidRequest, OutOfMemory, Overloaded, TaskservError, Unavailable
from server.factory import build_engine
from server.methods import load_plugins
from server.settings import Settings
from server.store_sync import Seen, SyncReport, attach, read_registry, sync

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
        metrics = Metrics(settings.metrics_task_series)
        metrics.watch(eng.tasks)
        config = BatcherConfig(max_rows=settings.max_batch_rows, max_chars=settings.max_batch_chars, max_wait_ms=settings.max_wait_ms,
                               max_queue=settings.max_queue, default_timeout_s=settings.request_timeout_s, return_wait=settings.return_wait)
        batcher = Batcher(_batch_function(eng), config, observe=metrics.observe_batch, observe_run=metrics.batch_seconds.observe)
        state = AppState(settings, eng, store, batcher, metrics)
        app.state.taskserve = state
        seeded = await asyncio.to_thread(store.seed, settings.seed_store)
        if seeded:
            log.info("store seeded from %s: %s", settings.seed_store, ", ".join(seeded))
        await batcher.run_on_engine_thread(attach, store, eng)
        metrics.tasks_loaded.set(len(eng.tasks))
        metrics.count_jobs(await asyncio.to_thread(store.registry.job_counts))
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
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)

    @app.exception_handler(TaskservError)
    async def _taskserv_error(request: Request, exc: TaskservError) -> JSONResponse:
        headers = {"Retry-After": str(max(1, round(exc.retry_after)))} if isinstance(exc, Overloaded) else None
        return JSONResponse(exc.to_dict(), status_code=exc.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}" for e in exc.errors())
        return JSONResponse({"error": {"type": "invalid_request", "message": errors}}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        """What the router answers itself (no such path: 404, a path without that method: 405, a body
        past max_body_bytes: 413, a body that cannot be decoded, e.g. not UTF-8: 422 like any invalid
        body) in the one error body."""
        kind = {400: "invalid_request", 404: "not_found", 405: "method_not_allowed", 413: "input_too_long"}.get(exc.status_code, "http_error")
        status = 422 if exc.status_code == 400 else exc.status_code
        return JSONResponse({"error": {"type": kind, "message": f"{request.method} {request.url.path}: {exc.detail}"}}, status_code=status, headers=exc.headers)

    app.include_router(router)
    app.include_router(tasks_router, prefix="/v1")
    app.include_router(tasks_router, include_in_schema=False)  # the unversioned aliases
    app.include_router(openai_router)
    return app


class BodyLimit:
    """ASGI middleware: a request body past `max_bytes` is refused with 413 `input_too_long` — at
    once when its Content-Length says so (the body is never read), else as soon as the bytes read
    pass the limit — so no client makes the server buffer more than that. (FastAPI's own
    `max_body_size` answers a declared length in plain text, outside the one error body.)"""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        too_long = f"body: more than {self.max_bytes} bytes (max_body_bytes)"
        if declared.isdigit() and int(declared) > self.max_bytes:
            await JSONResponse(InputTooLong(f"body: {declared} bytes, limit {self.max_bytes} (max_body_bytes)").to_dict(), status_code=413)(scope, receive, send)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:  # raised inside the route's body read: the app's handler answers
                    raise StarletteHTTPException(413, too_long)
            return message

        await self.app(scope, counted, send)


def _batch_function(engine: Engine):
    """The batcher's view of the engine: each row's outcome, and generating rows as a continuation
    the batcher advances token by token between other batches. What the engine raises that is not a
    taskserve error (a device out of memory, a bug) becomes one, so its rows get a typed answer."""

    def run_batch(rows: list) -> list | Partial:
        with _engine_errors():
            outcomes, running = engine.start_each(list(rows))
        return Partial(outcomes, _Typed(running)) if running is not None else [outcomes[i] for i in range(len(rows))]

    return run_batch


@contextlib.contextmanager
def _engine_errors() -> Iterator[None]:
    try:
        yield
    except TaskservError:
        raise
    except torch.OutOfMemoryError as exc:
        log.warning("the engine ran out of device memory: %s", exc)
        raise OutOfMemory(f"the device ran out of memory running this row: {exc}") from exc
    except Exception as exc:
        log.exception("the engine failed")
        raise EngineFailed(f"the engine failed running this row: {type(exc).__name__}: {exc}") from exc


class _Typed:
    """A generating batch whose failures come out as taskserve errors (see `_engine_errors`)."""

    def __init__(self, rest: Running) -> None:
        self.rest = rest

    @property
    def done(self) -> bool:
        return self.rest.done

    def advance(self) -> dict:
        with _engine_errors():
            return self.rest.advance()


async def _poll(state: AppState) -> None:
    down = None  # the registry's error while it is unavailable: logged when it starts and when it ends
    while True:
        await asyncio.sleep(state.settings.sync_interval_s)
        try:
            await require_registry(state)  # Unavailable while it is down, as the registry routes answer
            state.store.registry.read_only()  # a SQLite file writable again: its read-only connections are dropped
            report = None
            while report is None:  # the registry is read off the engine thread: one that hangs never stalls a batch
                mark = state.changes
                seen = await asyncio.to_thread(read_registry, state.store)
                report = await state.batcher.run_on_engine_thread(_apply, state, mark, seen)
            if down is not None:
                log.warning("store sync: the registry answers again")
                down = None
            if report.loaded or report.removed or report.failed:
                log.info("store sync: loaded %s, removed %s, failed %s", report.loaded, report.removed, sorted(report.failed))
            state.metrics.tasks_loaded.set(len(state.engine.tasks))
            state.metrics.count_jobs(await asyncio.to_thread(state.store.registry.job_counts))
        except Unavailable as exc:
            if down is None:
                log.error("store sync: %s; the %d loaded tasks keep answering, retrying every %s s", exc.message, len(state.engine.tasks), state.settings.sync_interval_s)
            down = exc.message
        except Exception:  # noqa: BLE001 - a broken store read must not stop hot-loading for good
            log.exception("store sync failed")


def _apply(state: AppState, mark: int, seen: Seen) -> SyncReport | None:
    """On the engine thread: the sync of what was read — unless a route changed the task table since
    (`state.changes`), which that read may predate; None then, and the poller reads again."""
    return sync(state.store, state.engine, seen) if state.changes == mark else None


class DrainingServer(uvicorn.Server):
    """uvicorn with a drain in front of its graceful shutdown. On the first SIGTERM (or SIGINT) the
    app stops taking work at once: /readyz and every new request answer 503 `not_ready` while the
    socket stays open, so a load balancer sees the replica leave rather than refused connections,
    and the requests already running finish. Then uvicorn's shutdown closes the socket and runs the
    lifespan's (batcher drain, worker stop). Both phases share `drain_s`; a second signal skips the
    wait, a second SIGINT forces the exit (as in uvicorn). The process then exits 0: uvicorn would
    re-raise the signal (exit 143 outside a container; a container's PID 1 ignores it and exits 0)."""

    def __init__(self, config: uvicorn.Config, app: FastAPI, drain_s: float) -> None:
        super().__init__(config)
        self.app, self.drain_s = app, drain_s
        self._drain: tuple[set[asyncio.Task], float] | None = None  # requests running at the signal, deadline
        self._logged = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._drain is None:
            state = getattr(self.app.state, "taskserve", None)
            if state is not None:
                state.draining = True
            self._drain = (set(self.server_state.tasks), time.monotonic() + self.drain_s)
        elif sig == signal.SIGINT and self.should_exit:
            self.force_exit = True
        else:
            self.should_exit = True

    async def on_tick(self, counter: int) -> bool:
        if self._drain is not None and not self.should_exit:
            running, deadline = self._drain
            if not self._logged:
                log.warning("stopping: %d requests in flight finish first (at most %.0f s), new ones get 503", sum(not t.done() for t in running), self.drain_s)
                self._logged = True
            left = deadline - time.monotonic()
            if left <= 0 or all(task.done() for task in running):
                if left <= 0:
                    log.error("stopping: drain timeout (%.0f s) reached with requests still running", self.drain_s)
                self.config.timeout_graceful_shutdown = max(1.0, left)  # what is left of the drain, for uvicorn's phase
                self.should_exit = True
        return await super().on_tick(counter)


def serve(settings: Settings) -> int:
    """`taskserve serve`: the app on settings.host:port under `DrainingServer`; 0 after a clean stop."""
    app = create_app(settings)
    drain = settings.drain_timeout_s
    server = DrainingServer(uvicorn.Config(app, host=settings.host, port=settings.port, timeout_graceful_shutdown=drain), app, drain)
    server.run()
    return 0 if server.started else 3  # 3: uvicorn's start-up failure status

