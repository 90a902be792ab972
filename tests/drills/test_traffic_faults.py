"""Drills 2, 3, 12, 17, 18 and 19: traffic a server must survive — a burst past its queue bound,
a matrix of bad inputs, clients that leave, an engine that fails mid-batch, the admin surface
without the key, and metrics that agree with the client's counts and stay bounded in tasks.

One deployment serves them all (a real `taskserve serve`, tiny models, its own PostgreSQL
database) with the drill plugin `tests/plugins/drill_faults.py` loaded: tasks whose real forward,
while armed, raises torch.OutOfMemoryError (`oom-*`), raises a RuntimeError (`fail-*`) or waits
(`hold-*`). A held engine lets a drill queue exactly the rows it wants behind it and release it on
a condition (queue depth, a counter) — never after a sleep — so every count asserted is exact.
"""

from __future__ import annotations

import asyncio
import importlib
import re
import socket
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from harness import KEY, Deployment, deployment, record, scale
from serving import wait

from helpers import CLASSIFY
from server.data.spec import TaskSpec

PLUGIN, METHOD = "plugins.drill_faults", "drill_faults"
QUEUE = 128  # TASKSERVE_MAX_QUEUE: small enough to burst past, big enough for drill 12's 100 clients
MAX_TOKENS = 128  # TASKSERVE_MAX_INPUT_TOKENS (an IP row renders its description too: ~70 tokens)
LONG = "word " * (MAX_TOKENS + 50)  # past MAX_TOKENS, under the OpenAI prompt's 1024 characters
MAX_BODY = 65536  # TASKSERVE_MAX_BODY_BYTES
SERIES = 8  # TASKSERVE_METRICS_TASK_SERIES
FAULTS = ("hold-burst", "hold-leave", "hold-fault", "oom-x", "fail-x", "bare")
BARE = TaskSpec(template="{text}", labels=CLASSIFY.labels, scoring="sum")  # an empty text renders to nothing


def client_for(d: Deployment) -> httpx.AsyncClient:
    """A client with a connection per request in flight (no pool limit) and none kept alive: a
    kept-alive connection that uvicorn closes as idle (after 5 s) just as the client reuses it
    would fail a request for a reason that is not the drill's."""
    return httpx.AsyncClient(base_url=d.url, timeout=300, limits=httpx.Limits(max_connections=None, max_keepalive_connections=0), headers={"Connection": "close"})


@dataclass
class Served:
    d: Deployment
    gates: Path  # DRILL_GATES: a file named after a drill task arms it
    ok: list[str]  # plain tasks of the drill method (metrics over many tasks)

    def arm(self, task: str) -> None:
        (self.gates / task).touch()

    def disarm(self, task: str) -> None:
        (self.gates / task).unlink(missing_ok=True)


def publish_faults(d: Deployment, names: list[str]) -> None:
    """Tasks of the drill method, published by the second process; returns once the server serves them."""
    want = len(d.tasks) + len(names)
    for name in names:
        task = d.engine.tasks.new(name, METHOD, BARE if name == "bare" else CLASSIFY)
        d.writer.publish(task, d.engine.backbone.fingerprint)
    wait(lambda: d.metric("taskserve_tasks_loaded") >= want, f"{want} tasks loaded", 300)
    d.tasks += names


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[Served]:
    from server.methods import REGISTRY

    importlib.import_module(PLUGIN)  # the publishing process's engine (built by the harness) has the method too
    root = tmp_path_factory.mktemp("traffic")
    gates = root / "gates"
    gates.mkdir()
    env = {"TASKSERVE_PLUGINS": PLUGIN, "DRILL_GATES": str(gates), "TASKSERVE_MAX_QUEUE": str(QUEUE), "TASKSERVE_MAX_INPUT_TOKENS": str(MAX_TOKENS),
           "TASKSERVE_MAX_BODY_BYTES": str(MAX_BODY), "TASKSERVE_METRICS_TASK_SERIES": str(SERIES), "TASKSERVE_REQUEST_TIMEOUT_S": "300",
           "TASKSERVE_EMBEDDED_WORKER": "false"}
    try:
        with deployment(root, **env) as d:
            d.publish(per_method=1)  # a task of each built-in method
            ok = [f"ok-{i}" for i in range(scale(3 * SERIES, 1000))]  # more tasks than metric series: 24 / 1000
            publish_faults(d, list(FAULTS) + ok)
            yield Served(d, gates, ok)
    finally:
        REGISTRY.pop(METHOD, None)
        sys.modules.pop(PLUGIN, None)


def total(samples: dict[str, float], name: str, **labels: str) -> float:
    """The sum of a metrics snapshot's samples of `name` whose labels include `labels`."""
    out = 0.0
    for key, value in samples.items():
        base, _, rest = key.partition("{")
        have = dict(item.split("=", 1) for item in rest.rstrip("}").split(",") if item)
        if base == name and all(have.get(k) == v for k, v in labels.items()):
            out += value
    return out


def outcomes(samples: dict[str, float]) -> Counter:
    """Predicted rows by outcome, summed over task labels."""
    out: Counter = Counter()
    for key, value in samples.items():
        if key.startswith("taskserve_predictions_total{"):
            out[re.search(r"outcome=([^,}]*)", key).group(1)] += value
    return out


async def until(predicate: Callable[[], bool], what: str, seconds: float = 120) -> None:
    """Wait for a condition (checked off the event loop: predicates read /metrics)."""
    deadline = time.monotonic() + seconds
    while not await asyncio.to_thread(predicate):
        assert time.monotonic() < deadline, f"timed out waiting for: {what}"
        await asyncio.sleep(0.05)


async def hold(s: Served, client: httpx.AsyncClient, task: str) -> asyncio.Future:
    """Arm `task`, send one row of it and return its pending answer once its batch is running: the
    engine takes nothing else until the task is disarmed."""
    s.arm(task)
    before = s.d.metric("taskserve_batch_rows_count")
    pending = asyncio.ensure_future(client.post("/v1/predict", json={"task": task, "text": "hold"}))
    await until(lambda: s.d.metric("taskserve_batch_rows_count") > before, f"the batch of {task} running")
    return pending


def raw(url: str, request: bytes) -> tuple[int, bytes]:
    """One HTTP/1.1 exchange on a socket of its own: the status and body of the answer, read whole
    (by its Content-Length) before the client closes — or status 0 when the server cut the
    connection first."""
    parts = urlsplit(url)
    data = b""
    with socket.create_connection((parts.hostname, parts.port), timeout=60) as sock:
        try:
            sock.sendall(request)
            while True:
                head, sep, body = data.partition(b"\r\n\r\n")
                length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
                if sep and length and len(body) >= int(length.group(1)):
                    break
                if not (chunk := sock.recv(65536)):
                    break
                data += chunk
        except (ConnectionResetError, BrokenPipeError):
            return 0, b""
    head, _, body = data.partition(b"\r\n\r\n")
    return (int(head.split()[1]), body) if head.startswith(b"HTTP/") else (0, b"")


# ---- drill 2 -------------------------------------------------------------------------------------
def test_a_burst_past_the_queue_bound_is_refused_at_once_and_the_queue_drains(served: Served) -> None:
    """QUEUE + 100 single-row requests at once while the engine is held: exactly QUEUE are admitted
    and wait, the other 100 are answered 429 with Retry-After while the engine is still held (a
    refusal never waits for capacity), none is a 5xx, and the queue depth returns to 0."""
    d, excess = served.d, 100
    burst = QUEUE + excess
    task = d.tasks[0]
    before = d.metrics()

    async def main():
        async with client_for(d) as client:
            held = await hold(served, client, "hold-burst")
            sent, answered_at = time.monotonic(), {}
            futures = [asyncio.ensure_future(client.post("/v1/predict", json={"task": task, "text": f"burst {i}"})) for i in range(burst)]
            for i, f in enumerate(futures):
                f.add_done_callback(lambda _, i=i: answered_at.setdefault(i, time.monotonic() - sent))
            await until(lambda: sum(f.done() for f in futures) >= excess and d.metric("taskserve_queue_depth") == QUEUE, f"{excess} answers and a full queue")
            early = [f.result() for f in futures if f.done()]  # answered while the engine is held
            depth_held = d.metric("taskserve_queue_depth")
            served.disarm("hold-burst")
            responses = await asyncio.gather(*futures)
            await held
            return early, depth_held, responses, answered_at

    early, depth_held, responses, answered_at = asyncio.run(main())
    after = d.metrics()
    statuses = Counter(r.status_code for r in responses)
    refused = [r for r in responses if r.status_code == 429]
    assert len(early) == excess and all(r.status_code == 429 for r in early), Counter(r.status_code for r in early)
    assert statuses == {200: QUEUE, 429: excess}, statuses
    assert all(r.json()["error"]["type"] == "overloaded" and int(r.headers["Retry-After"]) >= 1 for r in refused)
    assert depth_held == QUEUE
    assert after["taskserve_queue_depth"] == 0.0
    assert outcomes(after)["overloaded"] - outcomes(before)["overloaded"] == excess
    refusal_s = sorted(answered_at[i] for i, r in enumerate(responses) if r.status_code == 429)
    record("burst", queue_bound=QUEUE, sent=burst, admitted=statuses[200], refused_429=len(refused), with_retry_after=len(refused),
           refused_while_engine_held=len(early), responses_5xx=sum(n for s, n in statuses.items() if s >= 500), queue_depth_held=depth_held,
           queue_depth_after=after["taskserve_queue_depth"], slowest_429_s=round(refusal_s[-1], 3))


# ---- drill 3 -------------------------------------------------------------------------------------
def test_every_bad_input_gets_its_documented_4xx_and_never_reaches_the_engine(served: Served) -> None:
    """Each bad input (README's error list) gets its status and `{"error": {"type", "message"}}`
    body and nothing else; a request head too big for the HTTP layer gets uvicorn's 400 (or a cut
    connection) and the server carries on; and not one batch runs for the whole matrix."""
    d = served.d
    task = d.tasks[0]
    predict = f"{d.url}/v1/predict"
    json_head = {"Content-Type": "application/json"}
    cases: list[tuple[str, Callable[[], httpx.Response], int, str]] = [
        ("empty text under a bare {text} template", lambda: httpx.post(predict, json={"task": "bare", "text": ""}), 422, "invalid_request"),
        ("empty prompt, completions", lambda: httpx.post(f"{d.url}/v1/completions", json={"model": "bare", "prompt": ""}), 422, "invalid_request"),
        ("empty inputs list", lambda: httpx.post(predict, json={"inputs": []}), 422, "invalid_request"),
        ("text past max_input_tokens", lambda: httpx.post(predict, json={"task": task, "text": LONG}), 413, "input_too_long"),
        ("a multi-row request with one row too long", lambda: httpx.post(predict, json={"inputs": [{"task": task, "text": "fine"}, {"task": task, "text": LONG}]}), 413, "input_too_long"),
        ("prompt past max_input_tokens, completions", lambda: httpx.post(f"{d.url}/v1/completions", json={"model": task, "prompt": LONG}), 413, "input_too_long"),
        ("max_new_tokens past the schema", lambda: httpx.post(predict, json={"task": task, "text": "x", "options": {"max_new_tokens": 10**6}}), 422, "invalid_request"),
        ("max_new_tokens past the engine", lambda: httpx.post(predict, json={"task": task, "text": "x", "options": {"max_new_tokens": 1024}}), 422, "invalid_request"),
        ("max_new_tokens 0", lambda: httpx.post(predict, json={"task": task, "text": "x", "options": {"max_new_tokens": 0}}), 422, "invalid_request"),
        ("unknown task", lambda: httpx.post(predict, json={"task": "no-such-task", "text": "x"}), 404, "not_found"),
        ("unknown task in a multi-row request", lambda: httpx.post(predict, json={"inputs": [{"task": task, "text": "x"}, {"task": "no-such-task", "text": "x"}]}), 404, "not_found"),
        ("unknown model, completions", lambda: httpx.post(f"{d.url}/v1/completions", json={"model": "no-such-task", "prompt": "x"}), 404, "not_found"),
        ("a 100001-character text (past the schema, and the body limit here)", lambda: httpx.post(predict, json={"task": task, "text": "x" * 100_001}), 413, "input_too_long"),
        ("body past max_body_bytes", lambda: httpx.post(predict, json={"inputs": [{"task": task, "text": "x" * 1000}] * (MAX_BODY // 1000 + 1)}), 413, "input_too_long"),
        ("2000 headers, a 10 KB head (otherwise an unknown task)", lambda: httpx.post(predict, json={"task": "no-such-task", "text": "x"}, headers=[("x", "")] * 2000), 404, "not_found"),
        ("invalid UTF-8 inside a JSON string", lambda: httpx.post(predict, content=b'{"task": "' + task.encode() + b'", "text": "caf\xe9 \xff\xfe"}', headers=json_head), 422, "invalid_request"),
        ("a body of binary garbage", lambda: httpx.post(predict, content=bytes(range(256)) * 4, headers=json_head), 422, "invalid_request"),
        ("a lone surrogate escaped in JSON", lambda: httpx.post(predict, content=b'{"task": "' + task.encode() + b'", "text": "\\ud800 x"}', headers=json_head), 422, "invalid_request"),
        ("a JSON array body", lambda: httpx.post(predict, json=[{"task": task, "text": "x"}]), 422, "invalid_request"),
    ]
    before = d.metrics()
    answers = {}
    for name, send, status, kind in cases:
        response = send()
        body = response.json() if response.headers.get("content-type", "").startswith("application/json") else None
        answers[name] = (response.status_code, body)
        assert response.status_code == status and body is not None and body["error"]["type"] == kind and body["error"]["message"], (name, response.status_code, response.text[:300])
        assert set(body) == {"error"} and set(body["error"]) == {"type", "message"}, (name, body)

    # on a socket of its own: a body declared past the limit is refused before it is sent, and one
    # streamed past it (chunked, no length) as soon as the limit is crossed
    host = urlsplit(d.url).netloc
    declared = raw(d.url, f"POST /v1/predict HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {10**9}\r\n\r\n".encode())
    chunk = b"x" * (MAX_BODY + 1)
    chunked = raw(d.url, f"POST /v1/predict HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
                  + f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n0\r\n\r\n")
    for name, (status, body) in {"a 1 GB body declared, never sent": declared, "a chunked body past the limit": chunked}.items():
        answers[name] = (status, body[:200])
        assert status == 413 and b'"input_too_long"' in body, (name, status, body[:300])
    # a request head too big for the HTTP layer: uvicorn (h11) refuses it before the app sees it —
    # a plain-text 400, or the connection cut while the client still sends; never a 5xx, and the server carries on
    huge = "".join(f"x-drill-{i}: {'v' * 40}\r\n" for i in range(20_000))
    status, body = raw(d.url, f"POST /v1/predict HTTP/1.1\r\nHost: {host}\r\n{huge}Content-Length: 2\r\n\r\n{{}}".encode())
    answers["20000 headers (1 MB head)"] = (status, body[:60])
    assert status in (0, 400), (status, body[:200])
    assert httpx.get(f"{d.url}/healthz").status_code == 200

    after = d.metrics()
    for name in ("taskserve_batch_rows_count", "taskserve_batch_rows_sum", "taskserve_queue_seconds_count"):
        assert after[name] == before[name], f"{name}: {before[name]} -> {after[name]}: a bad input reached the engine"
    assert after["taskserve_queue_depth"] == 0.0
    record("bad_inputs", cases=len(answers), documented_4xx_json=len(cases) + 2, http_layer_refusals=1, responses_5xx=sum(s >= 500 for s, _ in answers.values()),
           batches_run_by_the_matrix=after["taskserve_batch_rows_count"] - before["taskserve_batch_rows_count"],
           by_status=dict(sorted(Counter(status for status, _ in answers.values()).items())))


# ---- drill 12 ------------------------------------------------------------------------------------
def test_clients_that_leave_take_their_queued_rows_with_them(served: Served) -> None:
    """N clients queue one row each behind a held engine; half of them disconnect. Their rows never
    reach the engine: the rows run are exactly the hold's, the staying clients' and one more
    request's, and taskserve_rows_dropped_total counts the others."""
    d = served.d
    clients = scale(20, 100)
    leaving = clients // 2
    staying = clients - leaving
    task = d.tasks[1]
    before = d.metrics()

    async def main():
        async with client_for(d) as client:
            held = await hold(served, client, "hold-leave")
            stay = [asyncio.ensure_future(client.post("/v1/predict", json={"task": task, "text": f"stay {i}"})) for i in range(staying)]
            others = [client_for(d) for _ in range(leaving)]
            leave = [asyncio.ensure_future(c.post("/v1/predict", json={"task": task, "text": f"leave {i}"})) for i, c in enumerate(others)]
            await until(lambda: d.metric("taskserve_queue_depth") == clients, f"{clients} rows queued behind the held engine")
            for f in leave:  # the clients give up: their connections close
                f.cancel()
            await asyncio.gather(*leave, return_exceptions=True)
            for c in others:
                await c.aclose()
            await until(lambda: d.metric("taskserve_predictions_total", outcome="client_gone") - total(before, "taskserve_predictions_total", outcome="client_gone") == leaving,
                        f"the server to see {leaving} clients go")
            served.disarm("hold-leave")
            stayed = await asyncio.gather(*stay)
            await held
            flush = await client.post("/v1/predict", json={"task": task, "text": "after"})  # the batch after them counts what was dropped
            return stayed, flush

    stayed, flush = asyncio.run(main())
    after = d.metrics()
    delta = lambda name: after[name] - before[name]  # noqa: E731
    assert [r.status_code for r in stayed] == [200] * staying and flush.status_code == 200
    rows_run = delta("taskserve_batch_rows_sum")
    assert rows_run == 1 + staying + 1, f"{rows_run} rows ran; the hold, {staying} staying clients and one more request are {staying + 2}"
    assert delta("taskserve_queue_seconds_count") == rows_run
    assert delta("taskserve_rows_dropped_total") == leaving
    assert after["taskserve_queue_depth"] == 0.0
    record("clients_leave", clients=clients, left=leaving, stayed=staying, stayed_answered_200=staying, rows_run=rows_run - 2,
           rows_dropped=delta("taskserve_rows_dropped_total"), counted_client_gone=outcomes(after)["client_gone"] - outcomes(before)["client_gone"])


# ---- drill 17 ------------------------------------------------------------------------------------
def test_an_engine_failure_mid_batch_fails_only_its_rows_with_a_typed_error(served: Served) -> None:
    """Rows of tasks whose forward raises (out of memory; anything else) queued in one batch with
    good rows of every built-in method: the failing rows get 503 `out_of_memory` / 500
    `engine_failed`, the good rows their solo answers, the queue empties, the next batch is fine."""
    d = served.d
    good_n, bad_n = scale(12, 40), scale(2, 8)
    good = [{"task": d.tasks[i % 5], "text": f"good {i}: {'great' if i % 2 else 'dull'} film"} for i in range(good_n)]
    bad = [{"task": "oom-x", "text": f"big {i}"} for i in range(bad_n)] + [{"task": "fail-x", "text": f"bug {i}"} for i in range(bad_n)]
    mixed = {"inputs": [good[0], bad[0], good[1]]}  # a multi-row request: one failing row fails it whole
    before = d.metrics()

    async def main():
        async with client_for(d) as client:
            held = await hold(served, client, "hold-fault")
            served.arm("oom-x")
            served.arm("fail-x")
            batch_before = d.metric("taskserve_batch_rows_count")
            futures = [asyncio.ensure_future(client.post("/v1/predict", json=body)) for body in [*good, *bad, mixed]]
            rows = len(good) + len(bad) + 3
            await until(lambda: d.metric("taskserve_queue_depth") == rows, f"{rows} rows queued")
            served.disarm("hold-fault")
            answers = await asyncio.gather(*futures)
            await held
            batches = d.metric("taskserve_batch_rows_count") - batch_before
            served.disarm("oom-x")
            served.disarm("fail-x")
            solo = [await client.post("/v1/predict", json=body) for body in good]
            later = await asyncio.gather(*(client.post("/v1/predict", json=body) for body in [*good, *bad, mixed]))
            return answers, batches, solo, later

    answers, batches, solo, later = asyncio.run(main())
    after = d.metrics()
    got_good, got_oom, got_fail, got_mixed = answers[:good_n], answers[good_n:good_n + bad_n], answers[good_n + bad_n:-1], answers[-1]
    assert batches == 1, f"the queued rows ran in {batches} batches, not one: the failure was not mid-batch"
    assert [r.status_code for r in got_good] == [200] * good_n, [r.text[:200] for r in got_good if r.status_code != 200]
    assert all(r.status_code == 503 and r.json()["error"]["type"] == "out_of_memory" for r in got_oom), [r.text[:200] for r in got_oom]
    assert all(r.status_code == 500 and r.json()["error"]["type"] == "engine_failed" for r in got_fail), [r.text[:200] for r in got_fail]
    assert got_mixed.status_code == 503 and got_mixed.json()["error"]["type"] == "out_of_memory", got_mixed.text
    differing = sum(a.json() != b.json() for a, b in zip(got_good, solo, strict=True))
    assert differing == 0, f"{differing} batch-mates of the failing rows differ from their solo answers"
    assert [r.status_code for r in later] == [200] * len(later), Counter(r.status_code for r in later)
    assert after["taskserve_queue_depth"] == 0.0
    counted = outcomes(after) - outcomes(before)
    assert counted["out_of_memory"] == bad_n + 3 and counted["engine_failed"] == bad_n, counted
    record("engine_failure", rows_in_the_failing_batch=good_n + 2 * bad_n + 3, out_of_memory_rows=bad_n, other_failure_rows=bad_n, multi_row_requests_failed=1,
           good_rows_answered=good_n, good_rows_differing_from_solo=differing, later_requests_ok=len(later), queue_depth_after=after["taskserve_queue_depth"])


# ---- drill 18 ------------------------------------------------------------------------------------
OPEN = {("POST", "/v1/predict"), ("POST", "/predict"), ("POST", "/v1/completions"), ("POST", "/v1/chat/completions")}
"""The routes that change no state and take no key: predictions. Any other non-GET route needs it."""


def test_every_state_changing_route_needs_the_api_key(served: Served, tmp_path: Path) -> None:
    """Every route of the app (create_app's own list, the hidden unversioned aliases included)
    whose method is not GET/HEAD answers 401 without the key unless it is in OPEN — a new route
    must be added there or be guarded — and answers something else (no 5xx) with it; health,
    readiness and metrics stay open."""
    from server.api import create_app
    from server.settings import Settings

    d = served.d
    app = create_app(Settings(store=tmp_path / "store", seed_store=None, embedded_worker=False, plugins=PLUGIN, api_key=KEY))
    try:  # this FastAPI includes routers lazily: app.routes lists them, not their routes
        from fastapi.routing import iter_route_contexts
    except ImportError:  # an older one: app.routes is flat
        every = list(app.routes)
    else:
        every = list(iter_route_contexts(app.routes))
    routes = sorted({(m, r.path) for r in every for m in getattr(r, "methods", None) or () if m not in ("GET", "HEAD")})
    assert OPEN <= set(routes), f"OPEN names routes the app does not have: {OPEN - set(routes)}"
    schema = httpx.get(f"{d.url}/openapi.json").json()
    documented = {(m.upper(), p) for p, ops in schema["paths"].items() for m in ops if m.upper() not in ("GET", "HEAD")}
    assert documented <= set(routes), documented - set(routes)
    guarded, answers = [], {}
    for method, path in routes:
        url = d.url + re.sub(r"\{[^}]+\}", "drill-absent", path)
        bare = httpx.request(method, url, json={})
        wrong = httpx.request(method, url, json={}, headers={"Authorization": "Bearer not-the-key"})
        keyed = httpx.request(method, url, json={}, headers=d.headers)
        answers[f"{method} {path}"] = (bare.status_code, wrong.status_code, keyed.status_code)
        assert bare.status_code < 500 and wrong.status_code < 500 and keyed.status_code < 500, (method, path, answers[f"{method} {path}"])
        if (method, path) in OPEN:
            assert bare.status_code != 401, (method, path, bare.text)
            continue
        guarded.append(f"{method} {path}")
        assert bare.status_code == 401 and bare.json()["error"]["type"] == "unauthorized", (method, path, bare.status_code, bare.text)
        assert wrong.status_code == 401, (method, path, wrong.status_code)
        assert keyed.status_code != 401, (method, path, keyed.text)
    open_gets = {path: httpx.get(d.url + path).status_code for path in ("/healthz", "/readyz", "/metrics")}
    assert open_gets == {"/healthz": 200, "/readyz": 200, "/metrics": 200}, open_gets
    record("admin_surface", state_changing_routes=len(routes), guarded_401=len(guarded), open_by_design=len(OPEN), open_gets_200=len(open_gets),
           guarded_routes="; ".join(guarded), responses_5xx=sum(s >= 500 for triple in answers.values() for s in triple))


# ---- drill 19 ------------------------------------------------------------------------------------
def test_metrics_agree_with_the_clients_counts_and_stay_bounded_in_tasks(served: Served) -> None:
    """A load run over every built-in method and many drill tasks (more than metrics_task_series),
    with known numbers of bad requests: rows by outcome, latency observations, queue-time
    observations and rows per batch all equal the client's counts; the task label takes at most
    metrics_task_series + 1 values (`_other`). (The ok-row count alone is drill 1's, test_load.py.)"""
    d = served.d
    rows = [{"task": t, "text": f"row {i}: {'great' if i % 3 else 'dull'} film"} for i, t in enumerate(d.tasks[:5] * scale(4, 20) + served.ok)]
    bad = scale(5, 20)
    bodies = rows + [{"task": f"missing-{i}", "text": "x"} for i in range(bad)] + [{"task": d.tasks[0], "text": LONG}] * bad \
        + [{"task": "bare", "text": ""}] * bad
    expected = Counter({"ok": len(rows), "not_found": bad, "input_too_long": bad, "invalid_request": bad})
    before = d.metrics()

    async def main():
        gate = asyncio.Semaphore(QUEUE // 2)  # in flight at most: no 429 can blur the counts

        async def one(client, body):
            async with gate:
                return await client.post("/v1/predict", json=body)

        async with client_for(d) as client:
            return await asyncio.gather(*(one(client, b) for b in bodies))

    responses = asyncio.run(main())
    after = d.metrics()
    delta = lambda name, **labels: total(after, name, **labels) - total(before, name, **labels)  # noqa: E731
    client = Counter("ok" if r.status_code == 200 else r.json()["error"]["type"] for r in responses)
    server = Counter({k: v for k, v in (outcomes(after) - outcomes(before)).items() if v})
    assert client == expected, client
    assert server == client, f"the server counted {dict(server)}, the client {dict(client)}"
    assert delta("taskserve_request_seconds_count", route="predict") == client["ok"]
    assert delta("taskserve_queue_seconds_count") == client["ok"] == delta("taskserve_batch_rows_sum"), "rows queued, rows run and rows answered differ"
    batches = delta("taskserve_batch_rows_count")
    assert 1 <= batches <= client["ok"]
    assert after["taskserve_queue_depth"] == 0.0
    labels = {re.search(r"task=([^,}]*)", k).group(1) for k in after if k.startswith("taskserve_predictions_total{")}
    tasks_predicted = len({b["task"] for b in bodies})
    assert tasks_predicted > SERIES + 1
    assert len(labels) <= SERIES + 1 and "_other" in labels, sorted(labels)
    series = sum(1 for k in after if k.startswith("taskserve_predictions_total{"))
    record("metrics", requests=len(bodies), tasks_predicted=tasks_predicted, client_counts=dict(client), server_counts=dict(server),
           latency_observations=delta("taskserve_request_seconds_count", route="predict"), queue_time_observations=delta("taskserve_queue_seconds_count"),
           batch_rows_sum=delta("taskserve_batch_rows_sum"), batches=batches, metrics_task_series=SERIES, task_label_values=len(labels),
           prediction_series=series)
