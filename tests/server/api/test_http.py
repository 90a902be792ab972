"""The HTTP API end to end: a real uvicorn server on a loopback port over a tiny T5 saved as a local
HF folder, a real store (SQLite) shared with a second Store handle that plays another process."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from adapters_store.store import Store
from helpers import tiny_t5
from serving import assert_concurrent_equals_solo, error, running_server
from server.backbone import load_backbone
from server.data.spec import TaskSpec
from server.engine import Engine
from server.settings import Settings
from server.store_sync import attach

KEY = {"Authorization": "Bearer s3cret"}
SPEC = TaskSpec(template="review: {text}", labels=("negative", "positive"), description="Tell me the sentiment:")


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[tuple[str, Path, Engine]]:
    root = tmp_path_factory.mktemp("api")
    backbone = tiny_t5()
    backbone.model.save_pretrained(root / "model")
    backbone.tokenizer.save_pretrained(root / "model")
    settings = Settings(backbone=str(root / "model"), store=root / "store", device="cpu", dtype="float32", seed_store=None, api_key="s3cret", sync_interval_s=0.2, max_input_tokens=300, embedded_worker=False, max_examples=50)
    with running_server(settings) as url:
        # a second "process": its own engine over the same folder, publishing into the same store
        yield url, root / "store", Engine(load_backbone(str(root / "model")))


def test_health_and_ready(server) -> None:
    url, _, _ = server
    assert httpx.get(f"{url}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{url}/readyz").json()["status"] == "ready"
    assert "taskserve_queue_depth" in httpx.get(f"{url}/metrics").text


def test_ip_from_description_is_created_at_once_and_served(server) -> None:
    url, _, _ = server
    body = {"name": "sent-ip", "method": "ip", "description": "Tell me the sentiment:", "labels": ["negative", "positive"], "template": "review: {text}"}
    error(httpx.post(f"{url}/v1/tasks", json=body), 401, "unauthorized")
    created = httpx.post(f"{url}/v1/tasks", json=body, headers=KEY)
    assert created.status_code == 201 and created.json()["task"]["served"] is True
    error(httpx.post(f"{url}/v1/tasks", json=body, headers=KEY), 409, "conflict")
    got = httpx.post(f"{url}/v1/predict", json={"task": "sent-ip", "text": "great"}).json()
    assert got["task"] == "sent-ip" and got["label"] in ("negative", "positive") and got["task_version"] == 1
    assert sum(got["scores"].values()) == pytest.approx(1.0, abs=1e-5)


def test_hot_load_from_another_process_then_tpv_combine_then_delete(server) -> None:
    url, store_root, other = server
    writer = Store(store_root)
    attach(writer, other)
    for i in range(2):
        task = other.tasks.new(f"tpv-{i}", "tpv", SPEC, seed=i)
        with __import__("torch").no_grad():
            task.params["tau"].normal_()
        writer.publish(task, other.backbone.fingerprint)
    start = time.monotonic()
    while httpx.post(f"{url}/v1/predict", json={"task": "tpv-1", "text": "x"}).status_code != 200:
        assert time.monotonic() - start < 2.0, "a published task must be servable within 2 s"
        time.sleep(0.05)
    combined = httpx.post(f"{url}/v1/tasks", json={"name": "tpv-mix", "method": "tpv", "labels": ["negative", "positive"], "template": "review: {text}", "init": {"combine": {"tpv-0": 1.0, "tpv-1": 0.5}}}, headers=KEY)
    assert combined.status_code == 201, combined.text
    batch = httpx.post(f"{url}/v1/predict", json={"inputs": [{"task": "tpv-mix", "text": "a"}, {"task": "tpv-0", "text": "b"}]}).json()
    assert [r["task"] for r in batch["results"]] == ["tpv-mix", "tpv-0"]
    assert httpx.delete(f"{url}/v1/tasks/tpv-0", headers=KEY).status_code == 204
    error(httpx.post(f"{url}/v1/predict", json={"task": "tpv-0", "text": "b"}), 404, "not_found")
    writer.close()


def test_training_request_is_queued_as_a_job(server) -> None:
    url, _, _ = server
    body = {"name": "pha-new", "method": "pha", "labels": ["no", "yes"], "examples": [{"text": "a", "label": "yes"}, {"text": "b", "label": "no"}]}
    created = httpx.post(f"{url}/v1/tasks", json=body, headers=KEY)
    assert created.status_code == 202 and created.json()["task"]["status"] == "pending"
    job = httpx.get(f"{url}/v1/jobs/{created.json()['job']}").json()
    assert job["status"] == "queued" and job["task"] == "pha-new"
    error(httpx.get(f"{url}/v1/jobs/nope"), 404, "not_found")
    error(httpx.delete(f"{url}/v1/jobs/{job['id']}"), 401, "unauthorized")
    assert httpx.delete(f"{url}/v1/jobs/{job['id']}", headers=KEY).json()["status"] == "cancelled"
    error(httpx.delete(f"{url}/v1/jobs/{job['id']}", headers=KEY), 409, "conflict")
    error(httpx.get(f"{url}/v1/tasks/pha-new"), 404, "not_found")  # the reservation is released
    bad_label = {**body, "examples": [{"text": "a", "label": "maybe"}, {"text": "b", "label": "no"}]}
    assert "examples[0].label" in httpx.post(f"{url}/v1/tasks", json=bad_label, headers=KEY).json()["error"]["message"]
    too_many = {**body, "examples": body["examples"] * 26}
    error(httpx.post(f"{url}/v1/tasks", json=too_many, headers=KEY), 422, "invalid_request")
    error(httpx.post(f"{url}/v1/tasks", json={**body, "train": {"steps": 10**6}}, headers=KEY), 422, "invalid_request")
    error(httpx.post(f"{url}/v1/tasks", json={"name": "pt", "method": "prompt_tuning", "labels": ["a"]}, headers=KEY), 422, "invalid_request")


@pytest.mark.parametrize("body", [{}, {"task": "x"}, {"text": "y"}, {"task": "a", "text": "b", "inputs": [{"task": "a", "text": "b"}]}, {"inputs": []}, {"task": 3, "text": []}, {"task": "a", "text": "b", "extra": 1}])
def test_bad_bodies_are_422(server, body) -> None:
    url, _, _ = server
    error(httpx.post(f"{url}/v1/predict", json=body), 422, "invalid_request")


def test_unknown_task_404_and_too_long_413(server) -> None:
    url, _, _ = server
    error(httpx.post(f"{url}/v1/predict", json={"task": "missing", "text": "x"}), 404, "not_found")
    error(httpx.post(f"{url}/v1/predict", json={"task": "sent-ip", "text": "x" * 1000}), 413, "input_too_long")
    error(httpx.get(f"{url}/v1/tasks/missing"), 404, "not_found")


def test_concurrent_mixed_requests_equal_solo(server) -> None:
    url, _, _ = server
    tasks = [t["name"] for t in httpx.get(f"{url}/v1/tasks").json()["tasks"] if t["served"]]
    assert len(tasks) >= 2
    rows = [{"task": tasks[i % len(tasks)], "text": f"review number {i}"} for i in range(60)]
    assert_concurrent_equals_solo(url, rows)


def test_python_clients_share_calls_and_map_errors(server) -> None:
    from client import AsyncClient, Client
    from server.errors import Conflict, InvalidRequest, NotFound, Unauthorized

    url, _, _ = server
    with Client(url, api_key="s3cret") as client:
        created = client.create_task("cli-ip", "ip", description="Tell me the sentiment:", labels=["negative", "positive"], template="review: {text}")
        assert created["task"]["served"]
        one = client.predict("cli-ip", "lovely")
        many = client.predict_many([("cli-ip", "lovely"), ("sent-ip", "awful")])
        assert one.label == many[0].label and one.scores == pytest.approx(many[0].scores, abs=1e-5)
        assert many[1].task == "sent-ip"
        assert "cli-ip" in [t["name"] for t in client.tasks()] and client.task("cli-ip")["version"] == 1
        with pytest.raises(NotFound):
            client.predict("nope", "x")
        with pytest.raises(Conflict):
            client.create_task("cli-ip", "ip", description="d", labels=["a", "b"])
        with pytest.raises(InvalidRequest):
            client.create_task("Bad Name", "ip")
        client.delete_task("cli-ip")
        with pytest.raises(NotFound):
            client.task("cli-ip")
    with Client(url) as anonymous, pytest.raises(Unauthorized):
        anonymous.delete_task("sent-ip")

    async def main():
        async with AsyncClient(url) as client:
            return await asyncio.gather(*(client.predict("sent-ip", f"text {i}") for i in range(5)))

    assert [p.task for p in asyncio.run(main())] == ["sent-ip"] * 5


def test_cli_tasks_and_jobs_over_the_client(server, capsys) -> None:
    from server.cli import main

    url, _, _ = server
    assert main(["tasks", "list", "--url", url]) == 0
    assert "sent-ip" in capsys.readouterr().out
    assert main(["tasks", "show", "sent-ip", "--url", url]) == 0
    assert '"method": "ip"' in capsys.readouterr().out
    assert main(["tasks", "show", "missing", "--url", url]) == 1
    assert "not_found" in capsys.readouterr().err


def test_fuzzed_bodies_never_5xx(server) -> None:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    url, _, _ = server
    scalars = st.none() | st.booleans() | st.integers(-5, 2000) | st.text(max_size=30) | st.sampled_from(["sent-ip", "ip", "tpv", "pha", "{text}"])
    values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=8)
    keys = st.sampled_from(["task", "text", "inputs", "options", "name", "method", "labels", "examples", "init", "description", "template", "scoring", "max_new_tokens"])
    bodies = st.dictionaries(keys, values, max_size=5)
    client = httpx.Client(base_url=url, timeout=30, headers=KEY)

    @settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
    @given(path=st.sampled_from(["/v1/predict", "/v1/tasks"]), body=bodies)
    def check(path: str, body: dict) -> None:
        response = client.post(path, json=body)
        assert response.status_code < 500, (path, body, response.text)
        if response.status_code >= 400:
            assert response.json()["error"]["type"]
        elif path == "/v1/tasks":  # a fuzzed body that created a task: clean up
            client.delete(f"/v1/tasks/{body['name']}")

    check()
    client.close()


@pytest.mark.parametrize("init", [{"combine": 5}, {"combine": {"sent-ip": 1.0}}, {"combine": {"tpv-1": "heavy"}}, {"prompt": "abc"}, {"prompt": [[1.0, 2.0]]}])
def test_malformed_init_is_a_client_error(server, init) -> None:
    url, _, _ = server
    method = "prompt_tuning" if "prompt" in init else "tpv"
    response = httpx.post(f"{url}/v1/tasks", json={"name": "bad-init", "method": method, "labels": ["a", "b"], "init": init}, headers=KEY)
    assert 400 <= response.status_code < 500, response.text
    assert response.json()["error"]["type"]


def test_200_concurrent_requests_over_all_five_methods_equal_solo(server) -> None:
    """Acceptance (serving issue): 200 concurrent requests over >= 10 tasks of all five methods, all
    answered, each equal (label and scores) to its solo answer."""
    import torch

    url, store_root, other = server
    writer = Store(store_root)
    attach(writer, other)
    names = []
    for method in ("prompt_tuning", "tpv", "attempt", "ip", "pha"):
        for i in range(2):
            task = other.tasks.new(f"e2e-{method}-{i}", method, SPEC, seed=10 + i)
            with torch.no_grad():
                for p in task.params.values():
                    p.add_(torch.randn_like(p) * 0.5)
            writer.publish(task, other.backbone.fingerprint)
            names.append(task.name)
    writer.close()
    deadline = time.monotonic() + 5
    while not all(t["served"] for t in httpx.get(f"{url}/v1/tasks").json()["tasks"] if t["name"] in names):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    rows = [{"task": names[i % len(names)], "text": f"review {i}: " + "good " * (i % 7)} for i in range(200)]
    answers = assert_concurrent_equals_solo(url, rows)
    assert len({a["task"] for a in answers}) == 10


def test_a_batch_of_long_and_short_rows_runs_as_two_passes_answering_as_alone(server) -> None:
    """ATTEMPT rows carry 100 prompt positions on T5, PHA rows none: one request mixing them runs as
    two passes (`taskserve_split_batches` counts it), and every row answers as it does alone."""
    import torch

    url, store_root, other = server
    writer = Store(store_root)
    attach(writer, other)
    for method in ("attempt", "pha"):
        task = other.tasks.new(f"split-{method}", method, SPEC, seed=3)
        with torch.no_grad():
            for p in task.params.values():
                p.add_(torch.randn_like(p) * 0.5)
        writer.publish(task, other.backbone.fingerprint)
    writer.close()
    deadline = time.monotonic() + 5
    while not all(t["served"] for t in httpx.get(f"{url}/v1/tasks").json()["tasks"] if t["name"].startswith("split-")):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    rows = [{"task": name, "text": f"good film {i}"} for i, name in enumerate(["split-attempt", "split-pha"] * 4)]
    before = _gauge(url, "taskserve_split_batches")
    together = httpx.post(f"{url}/v1/predict", json={"inputs": rows, "options": {"return_scores": True}}).json()["results"]
    assert _gauge(url, "taskserve_split_batches") == before + 1
    for row, got in zip(rows, together, strict=True):
        alone = httpx.post(f"{url}/v1/predict", json={**row, "options": {"return_scores": True}}).json()
        assert got["label"] == alone["label"]
        for label, p in alone["scores"].items():
            assert got["scores"][label] == pytest.approx(p, abs=1e-5)


def _gauge(url: str, name: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(f"{name} "):
            return float(line.split()[-1])
    raise AssertionError(f"no {name} in /metrics")


def _batches_run(url: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith("taskserve_batch_rows_count"):
            return float(line.split()[-1])
    raise AssertionError("no taskserve_batch_rows_count in /metrics")


def test_a_multi_row_request_with_a_bad_row_fails_before_any_row_runs(server) -> None:
    url, _, _ = server
    good = {"task": "sent-ip", "text": "fine"}
    before = _batches_run(url)
    error(httpx.post(f"{url}/v1/predict", json={"inputs": [good, {"task": "missing", "text": "x"}, good]}), 404, "not_found")
    error(httpx.post(f"{url}/v1/predict", json={"inputs": [good, {"task": "sent-ip", "text": "x" * 1000}]}), 413, "input_too_long")
    assert _batches_run(url) == before  # every row was checked before any was queued
    assert httpx.post(f"{url}/v1/predict", json={"inputs": [good, good]}).status_code == 200
    assert _batches_run(url) > before


def test_queue_time_and_engine_time_are_observed(server) -> None:
    url, _, _ = server
    batches, engine_s, request_s = (_gauge(url, n) for n in ("taskserve_batch_seconds_count", "taskserve_batch_seconds_sum", 'taskserve_request_seconds_sum{route="predict"}'))
    started = time.monotonic()
    assert httpx.post(f"{url}/v1/predict", json={"task": "sent-ip", "text": "fine"}).status_code == 200
    took = time.monotonic() - started
    assert _gauge(url, "taskserve_queue_seconds_count") >= 1
    assert _gauge(url, "taskserve_batch_seconds_count") == batches + 1  # one request, one batch
    engine = _gauge(url, "taskserve_batch_seconds_sum") - engine_s
    assert 0 < engine <= _gauge(url, 'taskserve_request_seconds_sum{route="predict"}') - request_s <= took  # the engine's share of what the caller waited


def test_unversioned_aliases_route_to_the_same_handlers(server) -> None:
    url, _, _ = server
    created = httpx.post(f"{url}/tasks", json={"name": "alias-plain", "method": "plain", "labels": ["negative", "positive"], "template": "review: {text}"}, headers=KEY)
    assert created.status_code == 201, created.text
    assert httpx.get(f"{url}/tasks").json() == httpx.get(f"{url}/v1/tasks").json()
    assert httpx.post(f"{url}/predict", json={"task": "alias-plain", "text": "great"}).json() == httpx.post(f"{url}/v1/predict", json={"task": "alias-plain", "text": "great"}).json()
    error(httpx.post(f"{url}/tasks", json={"name": "x", "method": "ip"}), 401, "unauthorized")
    assert "/tasks" not in httpx.get(f"{url}/openapi.json").json()["paths"]  # documented once, under /v1


def test_training_requests_are_bounded_in_bytes_and_queued_jobs(server, tmp_path) -> None:
    """413 past the examples' byte limit; 429 with Retry-After once the queue of jobs is full —
    and a refused request reserves nothing."""
    from adapters_store.registry import Registry

    url, store_root, _ = server
    big = {"name": "big", "method": "pha", "labels": ["no", "yes"], "examples": [{"text": "x" * 60_000, "label": "yes"}, {"text": "y" * 60_000, "label": "no"}] * 10}
    error(httpx.post(f"{url}/v1/tasks", json=big, headers=KEY), 413, "input_too_long")
    registry = Registry(f"sqlite:///{store_root / 'registry.db'}")
    try:
        queued = registry.count_jobs("queued")
        body = {"method": "pha", "labels": ["no", "yes"], "examples": [{"text": "a", "label": "yes"}, {"text": "b", "label": "no"}]}
        created = []
        for i in range(32 - queued):
            r = httpx.post(f"{url}/v1/tasks", json={**body, "name": f"queued-{i}"}, headers=KEY)
            assert r.status_code == 202, r.text
            created.append(r.json()["job"])
        full = httpx.post(f"{url}/v1/tasks", json={**body, "name": "one-too-many"}, headers=KEY)
        error(full, 429, "overloaded")
        assert int(full.headers["Retry-After"]) > 0
        error(httpx.get(f"{url}/v1/tasks/one-too-many"), 404, "not_found")  # nothing reserved
        for job in created:
            httpx.delete(f"{url}/v1/jobs/{job}", headers=KEY)
    finally:
        registry.close()
