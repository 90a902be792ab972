"""`taskserve serve` as a real process: 429 under overload, SIGTERM drains in-flight requests."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from adapters_store.store import Store
from helpers import free_port, tiny_t5
from server.backbone import load_backbone
from server.data.spec import TaskSpec
from server.engine import Engine
from server.store_sync import attach

SPEC = TaskSpec(template="review: {text}", labels=("negative", "positive"), description="Tell me the sentiment:")


@pytest.fixture(scope="module")
def model_and_store(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("life")
    backbone = tiny_t5()
    backbone.model.save_pretrained(root / "model")
    backbone.tokenizer.save_pretrained(root / "model")
    engine = Engine(load_backbone(str(root / "model")))
    store = Store(root / "store")
    attach(store, engine)
    store.publish(engine.tasks.new("sent", "ip", SPEC), engine.backbone.fingerprint)
    store.close()
    return root / "model", root / "store"


def start(model: Path, store: Path, **env: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    environ = {**os.environ, "HF_HUB_OFFLINE": "1", "TASKSERVE_BACKBONE": str(model), "TASKSERVE_STORE": str(store), "TASKSERVE_SEED_STORE": "", "TASKSERVE_EMBEDDED_WORKER": "false",
               "TASKSERVE_PORT": str(port), "TASKSERVE_DEVICE": "cpu", "TASKSERVE_DTYPE": "float32", **env}
    proc = subprocess.Popen([sys.executable, "-m", "server.cli", "serve"], env=environ, cwd=Path(__file__).parents[3],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(proc.stdout.read().decode())
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError("server did not become ready")


async def fire(url: str, n: int) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        return await asyncio.gather(*(client.post("/v1/predict", json={"task": "sent", "text": f"row {i}"}) for i in range(n)))


def test_overload_answers_429_with_retry_after(model_and_store) -> None:
    proc, url = start(*model_and_store, TASKSERVE_MAX_QUEUE="2", TASKSERVE_MAX_BATCH_ROWS="1", TASKSERVE_MAX_WAIT_MS="200")
    try:
        responses = asyncio.run(fire(url, 30))
        codes = [r.status_code for r in responses]
        assert 429 in codes and 200 in codes and set(codes) <= {200, 429}
        refused = next(r for r in responses if r.status_code == 429)
        assert refused.json()["error"]["type"] == "overloaded" and int(refused.headers["Retry-After"]) >= 1
    finally:
        proc.terminate()
        proc.wait(30)


def test_sigterm_completes_in_flight_requests(model_and_store) -> None:
    proc, url = start(*model_and_store, TASKSERVE_MAX_WAIT_MS="3000", TASKSERVE_MAX_BATCH_ROWS="64")

    async def main() -> list[httpx.Response]:
        pending = asyncio.ensure_future(fire(url, 20))
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:  # the rows wait in the batcher (3 s window) ...
            deadline = time.monotonic() + 20  # polled every 0.1 s: at most ~200 access-log lines in the unread stdout pipe
            while "taskserve_queue_depth 20.0" not in (await client.get("/metrics")).text:
                assert time.monotonic() < deadline, "the 20 rows were never queued together"
                await asyncio.sleep(0.1)
        proc.send_signal(signal.SIGTERM)  # ... when the server is told to stop (requests after it get 503)
        return await pending

    responses = asyncio.run(main())
    assert [r.status_code for r in responses] == [200] * 20
    # taskserve's server drains and exits 0 (plain uvicorn would re-raise the SIGTERM: -15);
    # the log shows the lifespan (batcher drain, store close) finished first
    assert proc.wait(30) == 0
    assert "Application shutdown complete" in proc.stdout.read().decode()


def test_rows_waiting_past_their_deadline_get_504(model_and_store) -> None:
    # one row per batch, 50 ms between batches: rows behind the first few wait past a 20 ms deadline
    proc, url = start(*model_and_store, TASKSERVE_REQUEST_TIMEOUT_S="0.02", TASKSERVE_MAX_BATCH_ROWS="1", TASKSERVE_MAX_WAIT_MS="50")
    try:
        responses = asyncio.run(fire(url, 20))
        codes = [r.status_code for r in responses]
        assert 504 in codes and set(codes) <= {200, 504}
        late = next(r for r in responses if r.status_code == 504)
        assert late.json()["error"]["type"] == "deadline_exceeded" and late.json()["error"]["message"]
    finally:
        proc.terminate()
        proc.wait(30)


def test_not_started_app_answers_503(tmp_path: Path) -> None:
    """Before its lifespan has loaded the backbone and the store, the app refuses work with 503."""
    from server.api import create_app
    from server.settings import Settings

    app = create_app(Settings(store=tmp_path / "store", seed_store=None, embedded_worker=False))

    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app") as client:
            return await client.get("/readyz"), await client.post("/v1/predict", json={"task": "a", "text": "b"}), await client.get("/healthz")

    ready, predict, health = asyncio.run(main())
    for response in (ready, predict):
        assert response.status_code == 503 and response.json()["error"]["type"] == "not_ready"
    assert health.status_code == 200  # alive, just not ready


def test_serve_refuses_an_open_admin_surface_off_loopback(monkeypatch, capsys) -> None:
    """Bound to anything but loopback without an API key, `taskserve serve` refuses to start."""
    from server.api.app import check_exposure
    from server.cli import main
    from server.settings import Settings

    monkeypatch.setenv("TASKSERVE_HOST", "0.0.0.0")
    monkeypatch.delenv("TASKSERVE_API_KEY", raising=False)
    assert main(["serve"]) == 1
    assert "refusing to bind 0.0.0.0 without an API key" in capsys.readouterr().err
    check_exposure(Settings(host="0.0.0.0", api_key="k"))  # a key: fine
    check_exposure(Settings(host="0.0.0.0", allow_open_admin=True))  # an explicit opt-out: fine
    check_exposure(Settings(host="127.0.0.1"))  # loopback: fine
