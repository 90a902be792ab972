"""What the routes depend on: the app's running parts (`AppState`), readiness and the API key."""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Header, Request

from adapters_store.store import Store
from server.api.metrics import Metrics
from server.batcher import Batcher
from server.engine import Engine
from server.errors import NotReady, Unauthorized
from server.settings import Settings


@dataclass
class AppState:
    settings: Settings
    engine: Engine
    store: Store
    batcher: Batcher
    metrics: Metrics
    ready: bool = False


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
