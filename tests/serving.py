"""Helpers for end-to-end serving tests: a per-run PostgreSQL database, a real uvicorn server on a
loopback port, and the concurrent-equals-solo check."""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest
import uvicorn

from helpers import free_port
from server.api import create_app
from server.settings import Settings

PG_ADMIN = os.environ.get("TASKSERVE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")


@contextlib.contextmanager
def postgres_database() -> Iterator[str]:
    """A fresh database on the local PostgreSQL server (SQLAlchemy URL), dropped afterwards.
    Skips, with the reason shown, where no server answers."""
    psycopg = pytest.importorskip("psycopg")
    try:
        admin = psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        pytest.skip(f"no PostgreSQL server at {PG_ADMIN}: {exc}")
    name = f"taskserve_test_{uuid.uuid4().hex[:12]}"
    admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://") + f"/{name}"
    finally:
        admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        admin.close()


@contextlib.contextmanager
def running_server(settings: Settings, ready_s: float = 60) -> Iterator[str]:
    """`create_app(settings)` under uvicorn on a free loopback port; yields its base URL once ready
    (within `ready_s`)."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + ready_s
    while True:
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not become ready"
        time.sleep(0.1)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(10)


def assert_concurrent_equals_solo(url: str, rows: list[dict]) -> list[dict]:
    """Send rows all at once, then one by one: every concurrent answer equals its solo answer."""

    async def main():
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            together = await asyncio.gather(*(client.post("/v1/predict", json=r) for r in rows))
            solo = [await client.post("/v1/predict", json=r) for r in rows]
            return together, solo

    together, solo = asyncio.run(main())
    for a, b in zip(together, solo, strict=True):
        assert a.status_code == b.status_code == 200
        ja, jb = a.json(), b.json()
        assert ja["label"] == jb["label"]
        for label, p in jb["scores"].items():
            assert ja["scores"][label] == pytest.approx(p, abs=1e-5)
    return [r.json() for r in together]


def error(resp: httpx.Response, status: int, kind: str) -> None:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert body["error"]["type"] == kind and body["error"]["message"]


def save_tiny_models(root) -> dict[str, str]:
    """Tiny Llama + tiny form module saved as local HF folders; Settings kwargs that load them."""
    from helpers import tiny_form, tiny_llama

    backbone, form = tiny_llama(), tiny_form()
    for model, tokenizer, folder in ((backbone.model, backbone.tokenizer, "model"), (form.model, form.tokenizer, "form")):
        model.save_pretrained(root / folder)
        tokenizer.save_pretrained(root / folder)
    return {"backbone": str(root / "model"), "form_module": str(root / "form")}
