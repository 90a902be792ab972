"""What the routes depend on: the app's running parts (`AppState`), readiness and the API key."""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Annotated, TypeVar

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from adapters_store.store import Store
from server.api.metrics import Metrics
from server.batcher import Batcher
from server.engine import Engine
from server.errors import ClientGone, NotReady, Unauthorized, Unavailable
from server.settings import Settings


REGISTRY_TIMEOUT_S = 5.0
"""How long a registry ping may take before /readyz and the store poller count the registry as down."""


@dataclass
class AppState:
    settings: Settings
    engine: Engine
    store: Store
    batcher: Batcher
    metrics: Metrics
    ready: bool = False
    draining: bool = False  # SIGTERM came: admitted requests finish, new ones get 503
    changes: int = 0  # bumped on the engine thread by routes that change its task table themselves
    _ping: asyncio.Future | None = field(default=None, repr=False)  # the registry ping in flight
    _ping_since: float = 0.0

    async def registry_down(self) -> str | None:
        """Why the registry is down, or None when it answers: one ping at a time, off the engine
        thread, waited for at most REGISTRY_TIMEOUT_S. A registry that hangs (accepts connections,
        never answers) thus holds one thread, however many callers ask — and never the engine's."""
        if self._ping is None or self._ping.done():
            self._ping, self._ping_since = asyncio.ensure_future(asyncio.to_thread(self.store.registry.ping)), time.monotonic()
            self._ping.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved even when nobody waits any more
        try:
            await asyncio.wait_for(asyncio.shield(self._ping), max(0.0, self._ping_since + REGISTRY_TIMEOUT_S - time.monotonic()))
        except Unavailable as exc:
            return exc.message
        except TimeoutError:
            return f"the registry ({self.store.registry.where}) has not answered for {time.monotonic() - self._ping_since:.0f} s"
        return None


def get_state(request: Request) -> AppState:
    state: AppState | None = getattr(request.app.state, "taskserve", None)
    if state is not None and state.draining:
        raise NotReady("the server is stopping: requests already admitted complete, new ones are refused; retry on another replica")
    if state is None or not state.ready:
        raise NotReady("the server is starting or stopping")
    return state


State = Annotated[AppState, Depends(get_state)]

T = TypeVar("T")


async def while_connected(request: Request, work: Awaitable[T]) -> T:
    """`work` (a request's rows in the batcher), cancelled if the client disconnects first — its rows
    not yet run are then dropped, never run — with ClientGone. uvicorn does not cancel a handler
    whose client went away (only a streaming response listens), so the handler listens itself."""
    job, gone = asyncio.ensure_future(work), asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({job, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not job.done():
            raise ClientGone("the client disconnected before its rows ran")
        return job.result()
    finally:
        gone.cancel()
        job.cancel()


async def _disconnected(request: Request) -> None:
    """Returns when the client disconnects (the body is read: the next ASGI message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


# Declared as security schemes (not header parameters), so the OpenAPI schema says how admin calls authenticate
# and a client generated from it (or a fuzzer) sends the key rather than a made-up header value.
_bearer = HTTPBearer(auto_error=False, description="the API key: `Authorization: Bearer <key>`")
_api_key = APIKeyHeader(name="X-API-Key", auto_error=False, description="the API key, as a header of its own")


def require_key(
    state: State,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)] = None,
    x_api_key: Annotated[str | None, Depends(_api_key)] = None,
) -> None:
    expected = state.settings.api_key
    if not expected:
        return
    given = x_api_key or (bearer.credentials.strip() if bearer else "")
    if not hmac.compare_digest(given.encode(), expected.encode()):
        raise Unauthorized("this endpoint needs the API key (Authorization: Bearer <key> or X-API-Key)")


Admin = Depends(require_key)


async def require_registry(state: State) -> None:
    """Routes that read or change the registry answer 503 `unavailable` at once while it is down,
    instead of each holding a thread on a registry that hangs (threads predictions need too)."""
    why = await state.registry_down()
    if why is not None:
        raise Unavailable(why)


RegistryUp = Depends(require_registry)
