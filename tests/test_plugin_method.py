"""A method is one registration: a sixth method defined only in tests/plugins/toy_bias.py is served
over HTTP in batches mixed with the five built-in methods, trained by the worker from examples,
listed in the API schema and accepted by the CLI — through a real `taskserve serve` process (with
its embedded worker process) that loads it as a plugin."""

from __future__ import annotations

import importlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from adapters_store.store import Store
from helpers import METHODS, perturb
from server.backbone import load_backbone, load_form_module
from server.cli import main
from server.data.spec import TaskSpec
from server.engine import Engine, Request
from server.methods import REGISTRY, method_ids
from server.store_sync import attach
from serving import assert_concurrent_equals_solo, save_tiny_models, serve_process, stop_process, wait

ROOT = Path(__file__).parents[1]
PLUGIN, TOY = "plugins.toy_bias", "toy_bias"
KEY = "k3y"
SPEC = TaskSpec(template="Review: {text}\nSentiment:", labels=("negative", "positive"), description="Tell me the sentiment of the review:", scoring="sum")
TEXTS = [f"{'aaaa' if i % 2 else 'zzzz'} film {i}" for i in range(12)]


@pytest.fixture(scope="module")
def toy() -> Iterator[None]:
    """The plugin registered in this process too (it publishes tasks); unregistered afterwards so
    the rest of the suite sees the built-in methods only."""
    importlib.import_module(PLUGIN)
    yield
    REGISTRY.pop(TOY, None)
    sys.modules.pop(PLUGIN, None)


@pytest.fixture(scope="module")
def deployment(toy, tmp_path_factory) -> Iterator[tuple[str, Engine, Store]]:
    root = tmp_path_factory.mktemp("plugin")
    models = save_tiny_models(root)
    proc, _, url = serve_process(root, models, {"TASKSERVE_PLUGINS": PLUGIN, "TASKSERVE_API_KEY": KEY})
    try:
        # another process's engine (this one) publishes tasks of all six methods into the same store
        other = Engine(load_backbone(models["backbone"]), load_form_module(models["form_module"]))
        perturb(other)  # off the identity init, only in this process: its tasks use the store's modules
        writer = Store(root / "store")
        attach(writer, other)
        yield url, other, writer
        writer.close()
    finally:
        stop_process(proc)


def test_the_sixth_method_is_registered_everywhere(deployment) -> None:
    url, _, _ = deployment
    schema = httpx.get(f"{url}/openapi.json").json()
    assert TOY in schema["components"]["schemas"]["TaskCreate"]["properties"]["method"]["enum"]
    assert TOY in method_ids(trainable=True) and set(METHODS) < set(method_ids())


def test_served_in_a_batch_mixed_with_the_five_methods(deployment) -> None:
    url, other, writer = deployment
    names = []
    for method in (*METHODS, TOY):
        for i in range(2):
            task = other.tasks.new(f"mix-{method.replace('_', '-')}-{i}", method, SPEC, seed=20 + i)
            with torch.no_grad():
                for p in task.params.values():
                    p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) * 0.5)
            writer.publish(task, other.backbone.fingerprint)
            other.tasks.add(task)
            names.append(task.name)
    wait(lambda: all(t["served"] for t in httpx.get(f"{url}/v1/tasks").json()["tasks"] if t["name"] in names), "published tasks are served")
    rows = [{"task": names[i % len(names)], "text": TEXTS[i % len(TEXTS)]} for i in range(48)]
    assert_concurrent_equals_solo(url, rows)  # every answer of the mixed load equals its solo answer
    mixed = httpx.post(f"{url}/v1/predict", json={"inputs": rows[: len(names)]}).json()["results"]  # one request, all six methods
    assert {r["task"] for r in mixed} == set(names)
    for row, got in zip(rows, mixed):
        want = other.run([Request(row["task"], row["text"])])[0]  # the plugin computes the same function in both processes
        assert got["label"] == want.label
        assert got["scores"]["positive"] == pytest.approx(want.scores["positive"], abs=1e-5)
    with other.tasks.temporary(other.tasks.new("backbone-alone", "plain", SPEC)):  # the toy really modulates
        for row, got in zip(rows, mixed):
            if got["task"].startswith("mix-toy-bias"):
                alone = other.run([Request("backbone-alone", row["text"])])[0]
                assert abs(got["scores"]["positive"] - alone.scores["positive"]) > 1e-3


def test_trained_by_the_worker_from_examples_through_the_cli(deployment, tmp_path: Path, monkeypatch, capsys) -> None:
    url, other, _ = deployment
    probe = other.tasks.new("toy-probe", TOY, SPEC)  # the untrained start: bias 0, the plain backbone
    with other.tasks.temporary(probe):
        start = [r.label for r in other.run([Request(probe.name, t) for t in TEXTS])]
    target = min(SPEC.labels, key=start.count)  # the label the untrained task prefers less often
    examples = tmp_path / "examples.jsonl"
    examples.write_text("\n".join(json.dumps({"text": t, "label": target}) for t in TEXTS) + "\n")
    monkeypatch.setenv("TASKSERVE_API_KEY", KEY)
    assert main(["tasks", "create", "toy-learned", "--method", TOY, "--examples", str(examples), "--labels", "negative,positive",
                 "--template", SPEC.template, "--scoring", "sum", "--steps", "30", "--prompt-lr", "0.3", "--url", url]) == 0
    job = capsys.readouterr().out.strip().rsplit(" ", 1)[-1]
    jobs = lambda: httpx.get(f"{url}/v1/jobs/{job}", timeout=60).json()  # noqa: E731
    wait(lambda: jobs()["status"] in ("succeeded", "failed", "cancelled"), "the worker finishes the job", 120)
    assert jobs()["status"] == "succeeded", jobs()
    wait(lambda: httpx.post(f"{url}/v1/predict", json={"task": "toy-learned", "text": "x"}, timeout=60).status_code == 200, "the trained task is hot-loaded")
    got = httpx.post(f"{url}/v1/predict", json={"inputs": [{"task": "toy-learned", "text": t} for t in TEXTS]}, timeout=60).json()["results"]
    assert start.count(target) <= len(TEXTS) // 2 and [r["label"] for r in got] == [target] * len(TEXTS)
