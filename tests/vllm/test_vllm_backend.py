"""The vLLM backend (TASKSERVE_BACKEND=vllm) on the REAL SmolLM2 in fp32, through a real server.

The server serves the demo store with prompt tuning, TPV, ATTEMPT and plain rows on vLLM
(`prompt_embeds`) and IP / PHA rows on its native engine. A second, native-only engine over the
same store plays the reference (and the process that publishes tasks): every vLLM answer must be
what the native engine answers — labels, per-label probabilities within 1e-4, greedy tokens.

vLLM lives in its own venv (`make venv-vllm`: its transformers pin differs from the main venv's);
`make test` runs this folder there. Elsewhere it is skipped with that reason.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is installed in .venv-vllm only: `make test` runs tests/vllm there (`make test-vllm`)")

import openai  # noqa: E402

from adapters_store.store import Store  # noqa: E402
from serving import running_server  # noqa: E402
from server import assets  # noqa: E402
from server.backbone import load_backbone, load_form_module  # noqa: E402
from server.data.spec import TaskSpec  # noqa: E402
from server.decoding import Sampling  # noqa: E402
from server.engine import Engine, Request  # noqa: E402
from server.settings import Settings  # noqa: E402
from server.store_sync import attach, sync  # noqa: E402

pytestmark = pytest.mark.real

REPO = Path(__file__).resolve().parents[2]
KEY = "k"
ON_VLLM = ["movie-sentiment-prompt_tuning", "movie-sentiment-tpv", "movie-sentiment-attempt"]
NATIVE = ["movie-sentiment-ip", "movie-sentiment-pha"]
REVIEWS = ["A wonderful, moving film with superb acting.", "Dull, tedious and far too long. I hated it.",
           "One of the best films of the year.", "A boring mess with a terrible script.", "It was fine, I guess."]
PROMPTS = ["The capital of France is", "Once upon a time, a little robot", "Here is a list of three fruits:"]
CONTINUE = TaskSpec(template="{text}", description="Continue the text:", max_new_tokens=24)
SENTIMENT = TaskSpec(template="Review: {text}\nSentiment:", labels=("negative", "positive"), description="Tell me the sentiment of the film review:", scoring="first")
GENERATIVE = {"gen-prompt_tuning": "prompt_tuning", "gen-tpv": "tpv", "gen-attempt": "attempt", "gen-plain": "plain"}


def publish(writer: Store, engine: Engine, name: str, method: str, spec: TaskSpec, *, version: int = 1, seed: int = 0) -> None:
    """A task with its tensors moved off their initialisation, as a training worker would publish it."""
    task = engine.tasks.new(name, method, spec, seed=seed, version=version)
    with torch.no_grad():
        for p in task.params.values():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed + version)) * 0.3 * p.std())
    writer.publish(task, engine.backbone.fingerprint)
    engine.tasks.add(task)


def served_versions(url: str) -> dict[str, int]:
    return {t["name"]: t["version"] for t in httpx.get(f"{url}/v1/tasks").json()["tasks"] if t["served"]}


def wait_until(check, what: str, seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def backend_rows(url: str) -> dict[str, float]:
    rows = {}
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith("taskserve_backend_rows{"):
            rows[line.split('backend="')[1].split('"')[0]] = float(line.rsplit(" ", 1)[1])
    return rows


@pytest.fixture(scope="module")
def deployment(tmp_path_factory) -> Iterator[tuple[str, Store, Engine]]:
    root = tmp_path_factory.mktemp("vllm")
    settings = Settings(store=root / "store", seed_store=REPO / "demo_store", device="cpu", dtype="float32", backend="vllm", api_key=KEY,
                        embedded_worker=False, sync_interval_s=0.2, max_wait_ms=2, vllm_kv_cache_gb=1, request_timeout_s=120)
    with running_server(settings, ready_s=600) as url:
        cache = settings.cache_dir
        reference = Engine(load_backbone(assets.resolve_backbone("smollm2", cache)), load_form_module(str(assets.minilm_dir())))
        writer = Store(root / "store")
        attach(writer, reference)
        publish(writer, reference, "sentiment-plain", "plain", SENTIMENT)
        for name, method in GENERATIVE.items():
            publish(writer, reference, name, method, CONTINUE, seed=3)
        wait_until(lambda: {"sentiment-plain", *GENERATIVE} <= served_versions(url).keys(), "published tasks are served within seconds", 15)
        yield url, writer, reference
        writer.close()


@pytest.fixture()
def client(deployment) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{deployment[0]}/v1", api_key=KEY, max_retries=0, timeout=120) as c:
        yield c


def predict(url: str, rows: list[dict], **options) -> list[dict]:
    response = httpx.post(f"{url}/v1/predict", json={"inputs": rows, "options": options}, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()["results"]


def test_prompt_family_labels_and_probabilities_equal_the_native_engine(deployment) -> None:
    url, _, reference = deployment
    before = backend_rows(url)
    rows = [{"task": task, "text": text} for task in [*ON_VLLM, "sentiment-plain"] for text in REVIEWS]
    got = predict(url, rows)
    want = reference.run([Request(r["task"], r["text"]) for r in rows])
    for row, answer, native in zip(rows, got, want, strict=True):
        assert answer["label"] == native.label, row
        for label, p in native.scores.items():
            assert answer["scores"][label] == pytest.approx(p, abs=1e-4), (row, label)
    after = backend_rows(url)
    assert after["vllm"] - before.get("vllm", 0) == len(rows)  # every one of them ran on vLLM
    assert after["native"] == before.get("native", 0)


def test_greedy_generations_are_token_identical(deployment, client: openai.OpenAI) -> None:
    url, _, reference = deployment
    for name in GENERATIVE:
        for prompt in PROMPTS:
            got = client.completions.create(model=name, prompt=prompt, max_tokens=24, temperature=0)
            native = reference.run([Request(name, prompt, max_new_tokens=24)])[0]
            assert got.choices[0].text == native.output, (name, prompt)
            assert got.usage.completion_tokens == native.completion_tokens and got.choices[0].finish_reason == native.finish_reason
    greedy = reference.run([Request("gen-plain", PROMPTS[2], max_new_tokens=24)])[0].output
    stop = greedy.split()[2]  # a word the greedy text reaches: generation must end just before it
    stopped = client.completions.create(model="gen-plain", prompt=PROMPTS[2], max_tokens=24, temperature=0, stop=[stop])
    native = reference.run([Request("gen-plain", PROMPTS[2], max_new_tokens=24, sampling=Sampling(stop=(stop,)))])[0]
    assert stopped.choices[0].text == native.output == greedy[: greedy.index(stop)] and stopped.choices[0].finish_reason == "stop"


def test_a_request_mixing_vllm_and_native_tasks_answers_every_row_as_alone(deployment) -> None:
    url, _, reference = deployment
    before = backend_rows(url)
    rows = [{"task": task, "text": REVIEWS[i % len(REVIEWS)]} for i, task in enumerate([*ON_VLLM, *NATIVE, "sentiment-plain"] * 2)]
    rows += [{"task": name, "text": PROMPTS[i % len(PROMPTS)]} for i, name in enumerate(GENERATIVE)]
    together = predict(url, rows, max_new_tokens=12)
    after = backend_rows(url)
    assert after["native"] - before["native"] == 2 * len(NATIVE) and after["vllm"] - before["vllm"] == len(rows) - 2 * len(NATIVE)

    async def alone() -> list[dict]:
        async with httpx.AsyncClient(base_url=url, timeout=120) as c:
            answers = await asyncio.gather(*(c.post("/v1/predict", json={**r, "options": {"max_new_tokens": 12}}) for r in rows))
        return [a.json() for a in answers]

    for row, mixed, solo in zip(rows, together, asyncio.run(alone()), strict=True):
        assert mixed["output"] == solo["output"], row
        if mixed["scores"] is not None:
            assert mixed["scores"] == pytest.approx(solo["scores"], abs=1e-4), row
    want = reference.run([Request(r["task"], r["text"], max_new_tokens=12) for r in rows])
    assert [r["output"] for r in together] == [w.output for w in want]


def test_streaming_through_the_openai_client_and_seeded_sampling(client: openai.OpenAI) -> None:
    whole = client.completions.create(model="gen-attempt", prompt=PROMPTS[1], max_tokens=20, temperature=0)
    pieces, finish = [], None
    for chunk in client.completions.create(model="gen-attempt", prompt=PROMPTS[1], max_tokens=20, temperature=0, stream=True):
        pieces.append(chunk.choices[0].text)
        finish = chunk.choices[0].finish_reason or finish
    assert len([p for p in pieces if p]) > 1 and "".join(pieces) == whole.choices[0].text and finish == whole.choices[0].finish_reason
    chat = client.chat.completions.create(model="gen-prompt_tuning", messages=[{"role": "user", "content": "Say hello."}], max_tokens=12, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chat if c.choices)

    def sample(seed: int) -> str:
        return client.completions.create(model="gen-tpv", prompt=PROMPTS[0], max_tokens=16, temperature=1.0, top_p=0.9, seed=seed).choices[0].text

    first = sample(11)
    assert sample(11) == first  # the same seed, the same tokens
    assert len({sample(s) for s in (12, 13, 14, 15)} | {first}) > 1  # and the seed matters


def test_publish_update_delete_while_serving_and_isolation(deployment) -> None:
    url, writer, reference = deployment
    probe = [{"task": task, "text": REVIEWS[0]} for task in [*ON_VLLM, *NATIVE]]
    untouched = predict(url, probe)
    for version in (1, 2):
        publish(writer, reference, "hot-pt", "prompt_tuning", SENTIMENT, version=version, seed=5)
        wait_until(lambda: served_versions(url).get("hot-pt") == version, f"version {version} is hot-loaded within the sync window")
        got = predict(url, [{"task": "hot-pt", "text": t} for t in REVIEWS])
        want = reference.run([Request("hot-pt", t) for t in REVIEWS])
        assert all(g["task_version"] == version for g in got)
        for g, w in zip(got, want):
            assert g["label"] == w.label and g["scores"]["positive"] == pytest.approx(w.scores["positive"], abs=1e-4)
    assert predict(url, probe) == untouched  # other tasks' answers never move
    writer.registry.delete_task("hot-pt")
    sync(writer, reference)
    wait_until(lambda: httpx.post(f"{url}/v1/predict", json={"task": "hot-pt", "text": "x"}).status_code == 404, "a deleted task stops being served")
