"""Serving a decoder-only backbone (tiny Llama + a tiny form module for IP) through the real server
with the registry on a real PostgreSQL server: shared modules and tasks published by another
process, mixed-task concurrency, labels as written, and version swaps under load."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
import torch

from adapters_store.store import Store
from helpers import METHODS, perturb
from server.backbone import load_backbone, load_form_module
from server.data.spec import TaskSpec
from server.engine import Engine, Request
from server.settings import Settings
from server.store_sync import attach, sync
from serving import assert_concurrent_equals_solo, postgres_database, running_server, save_tiny_models

SPEC = TaskSpec(template="Review: {text}\nSentiment:", labels=(" negative", " positive"), description="Tell me the sentiment of the review:", scoring="sum")


@pytest.fixture(scope="module")
def deployment(tmp_path_factory) -> Iterator[tuple[str, Store, Engine]]:
    root = tmp_path_factory.mktemp("decoder")
    models = save_tiny_models(root)
    with postgres_database() as db_url:
        # the embedded worker runs training jobs in its own process, on the same PostgreSQL registry
        settings = Settings(**models, store=root / "store", db_url=db_url, device="cpu", dtype="float32", seed_store=None, sync_interval_s=0.2, api_key="k", worker_poll_s=0.2)
        with running_server(settings) as url:
            # another process: trains shared modules (here: perturbs them) and publishes tasks
            other = Engine(load_backbone(str(root / "model")), load_form_module(str(root / "form")))
            writer = Store(root / "store", db_url)
            attach(writer, other)  # the server already published the built-in modules as v1
            perturb(other)
            for module in other.methods.values():
                writer.publish_module(module, other.backbone.fingerprint, other.form_fingerprint)
            sync(writer, other)
            assert all(v == 2 for v in other.tasks.versions.values())
            yield url, writer, other
            writer.close()


def publish_tasks(writer: Store, engine: Engine, names: list[tuple[str, str]], version: int = 1, seed: int = 0) -> None:
    for name, method in names:
        task = engine.tasks.new(name, method, SPEC, seed=seed, version=version)
        with torch.no_grad():
            for p in task.params.values():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed + version)) * 0.5)
        writer.publish(task, engine.backbone.fingerprint)
        engine.tasks.add(task)


def wait_served(url: str, names: list[str], version: int = 1) -> None:
    deadline = time.monotonic() + 15
    while True:
        served = {t["name"]: t for t in httpx.get(f"{url}/v1/tasks").json()["tasks"]}
        if all(n in served and served[n]["served"] and served[n]["version"] == version for n in names):
            return
        assert time.monotonic() < deadline, "published tasks must be served within seconds"
        time.sleep(0.05)


def test_decoder_only_mixed_concurrency_over_postgres(deployment) -> None:
    url, writer, other = deployment
    names = [(f"dec-{m}-{i}", m) for m in METHODS for i in range(2)]
    publish_tasks(writer, other, names)
    wait_served(url, [n for n, _ in names])
    rows = [{"task": names[i % len(names)][0], "text": f"film number {i} was {'great' if i % 3 else 'dull'}"} for i in range(200)]
    got = assert_concurrent_equals_solo(url, rows)
    assert len(got) == 200
    for row, answer in zip(rows[:20], got[:20]):
        assert answer["label"] in ("negative", "positive")  # as written: no tokenizer space
        assert set(answer["scores"]) == {"negative", "positive"}
        want = other.run([Request(row["task"], row["text"])])[0].scores  # the publishing process agrees
        assert answer["scores"]["positive"] == pytest.approx(want["positive"], abs=1e-5)
    assert httpx.get(f"{url}/v1/tasks/dec-ip-0").json()["spec"]["labels"] == ["negative", "positive"]


def test_version_swap_under_load_loses_no_request(deployment) -> None:
    url, writer, other = deployment
    publish_tasks(writer, other, [("swap", "attempt")], version=1, seed=7)
    wait_served(url, ["swap"])
    texts = [f"review {i}" for i in range(8)]
    expected: dict[int, dict[str, float]] = {1: {t: other.run([Request("swap", t)])[0].scores["positive"] for t in texts}}

    def publisher() -> None:
        for version in (2, 3, 4):
            time.sleep(0.3)
            publish_tasks(writer, other, [("swap", "attempt")], version=version, seed=7)
            expected[version] = {t: other.run([Request("swap", t)])[0].scores["positive"] for t in texts}

    async def load() -> list[httpx.Response]:
        responses: list[httpx.Response] = []
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            while thread.is_alive() or len(responses) < 400:
                wave = [client.post("/v1/predict", json={"task": "swap", "text": texts[i % len(texts)]}) for i in range(40)]
                responses += await asyncio.gather(*wave)
            await asyncio.sleep(0.6)  # the last version is hot-loaded
            responses += await asyncio.gather(*(client.post("/v1/predict", json={"task": "swap", "text": t}) for t in texts))
        return responses

    thread = threading.Thread(target=publisher)
    thread.start()
    responses = asyncio.run(load())
    thread.join()
    assert all(r.status_code == 200 for r in responses), {r.status_code for r in responses}
    versions = [r.json()["task_version"] for r in responses]
    assert len(set(versions)) >= 3 and versions[-1] == 4, sorted(set(versions))
    for r in responses:  # every answer is exactly the version it names, never a mix
        body = r.json()
        text = json.loads(r.request.content)["text"]
        assert body["scores"]["positive"] == pytest.approx(expected[body["task_version"]][text], abs=1e-5)



def test_few_shot_job_through_the_embedded_worker(deployment) -> None:
    url, _, _ = deployment
    examples = [{"text": f"{'aaaa' if i % 2 else 'zzzz'} film {i}", "label": "positive" if i % 2 else "negative"} for i in range(20)]
    body = {"name": "learned", "method": "tpv", "labels": ["negative", "positive"], "scoring": "sum", "template": SPEC.template, "examples": examples, "train": {"steps": 20}}
    created = httpx.post(f"{url}/v1/tasks", json=body, headers={"X-API-Key": "k"})
    assert created.status_code == 202, created.text
    job_url = f"{url}/v1/jobs/{created.json()['job']}"
    deadline = time.monotonic() + 600  # a generous bound for loaded CI machines, not a timing claim
    while (job := httpx.get(job_url).json())["status"] in ("queued", "running"):
        assert time.monotonic() < deadline, job
        time.sleep(0.2)
    assert job["status"] == "succeeded", job["error"]
    # selection by 2-fold cross-validation: every example held out once; 2 × 20 fold steps, then the final fit
    metrics = job["metrics"]
    assert metrics["folds"] == 2 and metrics["validation"]["rows"] == 20 and metrics["chosen"] in metrics["selection"]
    assert job["progress"]["step"] == 2 * 20 + metrics["steps_trained"]
    wait_served(url, ["learned"])
    got = httpx.post(f"{url}/v1/predict", json={"task": "learned", "text": "aaaa film"}).json()
    assert got["task_version"] == 1 and got["label"] in ("negative", "positive")


def test_cli_creates_a_task_from_a_file_and_follows_its_job(deployment, tmp_path, monkeypatch, capsys) -> None:
    """`taskserve tasks create ... --wait` and `taskserve jobs watch` against the real server: a
    progress bar on stderr, the final status on stdout."""
    from server.cli import main

    url, _, _ = deployment
    monkeypatch.setenv("TASKSERVE_API_KEY", "k")
    examples = tmp_path / "examples.csv"
    examples.write_text("text,label\n" + "".join(f"{'aaaa' if i % 2 else 'zzzz'} film {i},{'positive' if i % 2 else 'negative'}\n" for i in range(12)))
    assert main(["tasks", "create", "from-file", "--method", "pha", "--examples", str(examples), "--labels", "negative,positive",
                 "--template", SPEC.template, "--scoring", "sum", "--steps", "10", "--wait", "--url", url]) == 0
    captured = capsys.readouterr()
    assert "training job" in captured.out and "succeeded: published" in captured.out
    assert "succeeded" in captured.err and "step" in captured.err  # the bar: the job's steps, then its status
    job_id = captured.out.split("training job ")[1].split()[0]
    assert main(["jobs", "watch", job_id, "--url", url]) == 0
    assert f"job {job_id} succeeded" in capsys.readouterr().out
    assert main(["jobs", "list", "--url", url]) == 0
    assert job_id in capsys.readouterr().out
    wait_served(url, ["from-file"])  # published is not yet hot-loaded: the server picks it up at its next sync
    assert httpx.post(f"{url}/v1/predict", json={"task": "from-file", "text": "aaaa film"}).status_code == 200
