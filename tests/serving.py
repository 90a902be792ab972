"""Helpers for end-to-end serving tests: a per-run PostgreSQL database, a real uvicorn server on a
loopback port (in this process, or a `taskserve serve` process), and the concurrent-equals-solo check."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn

from helpers import free_port
from server.api import create_app
from server.settings import Settings

ROOT = Path(__file__).parents[1]
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


def wait(predicate: Callable[[], object], what: str, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for: {what}"
        time.sleep(0.1)


def serve_process(root: Path, models: dict[str, str], env: dict[str, str]) -> tuple[subprocess.Popen, Path, str]:
    """`taskserve serve` as a process on a free loopback port, on a store in `root` (no seed store),
    the tiny models of `save_tiny_models`, fp32 on the CPU, fast store sync and worker polling, and
    the TASKSERVE_* overrides in env; returns (process, log file, URL) once /readyz is 200."""
    port = free_port()
    log = root / f"server-{port}.log"
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
                "TASKSERVE_BACKBONE": models["backbone"], "TASKSERVE_FORM_MODULE": models["form_module"], "TASKSERVE_STORE": str(root / "store"),
                "TASKSERVE_SEED_STORE": "", "TASKSERVE_PORT": str(port), "TASKSERVE_DEVICE": "cpu", "TASKSERVE_DTYPE": "float32",
                "TASKSERVE_SYNC_INTERVAL_S": "0.2", "TASKSERVE_WORKER_POLL_S": "0.2", **env}
    with log.open("w") as out:  # a file, not a pipe: nobody reads a pipe, and a full one blocks the server
        proc = subprocess.Popen([sys.executable, "-m", "server.cli", "serve"], env=full_env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return proc, log, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"taskserve serve did not become ready:\n{log.read_text()[-4000:]}")
        time.sleep(0.2)


def stop_process(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
    """Signal a server process and wait for it (killed past `timeout`); its exit status."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


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
