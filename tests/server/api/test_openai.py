"""The OpenAI-compatible API through the official `openai` client against a real server (uvicorn on
a loopback port) on a tiny Llama + form module: models, completions, chat, streaming, seeded
sampling, errors, and a long generation that never holds a classification request behind it."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from serving import running_server, save_tiny_models
from server.settings import Settings

KEY = "k"
CLASSIFY = {"name": "sentiment", "method": "plain", "labels": ["negative", "positive"], "description": "Tell me the sentiment:", "template": "Review: {text}\nSentiment: "}
GENERATE = {"name": "writer", "method": "plain", "template": "{text}"}


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("openai")
    settings = Settings(**save_tiny_models(root), store=root / "store", device="cpu", dtype="float32", seed_store=None, api_key=KEY, embedded_worker=False, max_wait_ms=2)
    with running_server(settings) as url:
        for body in (CLASSIFY, GENERATE):
            assert httpx.post(f"{url}/v1/tasks", json=body, headers={"X-API-Key": KEY}).status_code == 201
        yield url


@pytest.fixture()
def client(server: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0) as c:
        yield c


def test_models_lists_the_backbone_and_every_task(client: openai.OpenAI) -> None:
    models = {m.id: m for m in client.models.list()}
    assert {"sentiment", "writer"} <= set(models)
    backbone = next(m for m in models.values() if getattr(m, "parent", None) is None)
    assert models["sentiment"].parent == backbone.id and models["sentiment"].root == "taskserve:plain"
    assert models["sentiment"].labels == ["negative", "positive"] and models["writer"].labels is None
    assert client.models.retrieve("sentiment").id == "sentiment"


def test_completions_over_a_classification_task_answer_labels_in_order(client: openai.OpenAI, server: str) -> None:
    texts = ["a great film", "dull", "I loved it", "awful acting", "fine"]
    got = client.completions.create(model="sentiment", prompt=texts)
    assert [c.index for c in got.choices] == list(range(len(texts)))
    want = httpx.post(f"{server}/v1/predict", json={"inputs": [{"task": "sentiment", "text": t} for t in texts]}).json()["results"]
    assert [c.text for c in got.choices] == [w["label"] for w in want]
    for choice, w in zip(got.choices, want):
        assert choice.model_extra["label_scores"] == pytest.approx(w["scores"], abs=1e-5)
    assert got.usage.prompt_tokens > 0 and got.usage.total_tokens == got.usage.prompt_tokens + got.usage.completion_tokens


def test_streaming_concatenates_to_the_greedy_text(client: openai.OpenAI) -> None:
    whole = client.completions.create(model="writer", prompt="Once upon a time", max_tokens=24, temperature=0)
    pieces = list(client.completions.create(model="writer", prompt="Once upon a time", max_tokens=24, temperature=0, stream=True))
    assert "".join(p.choices[0].text for p in pieces) == whole.choices[0].text
    assert pieces[-1].choices[0].finish_reason == whole.choices[0].finish_reason == "length"
    assert whole.usage.completion_tokens == 24


def test_chat_on_both_kinds_of_task(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(model="sentiment", messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "a great film"}])
    assert answer.choices[0].message.content in ("negative", "positive") and answer.choices[0].message.role == "assistant"
    chat = client.chat.completions.create(model="writer", messages=[{"role": "user", "content": "hi"}], max_tokens=8, temperature=0)
    streamed = list(client.chat.completions.create(model="writer", messages=[{"role": "user", "content": "hi"}], max_tokens=8, temperature=0, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == chat.choices[0].message.content
    assert streamed[0].choices[0].delta.role == "assistant"


def test_an_unknown_model_is_a_not_found_error(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="nope", prompt="x")
    assert "nope" in str(info.value)
    with pytest.raises(openai.UnprocessableEntityError, match="n: "):  # one choice per prompt: a clear 422
        client.completions.create(model="writer", prompt="x", n=3)


def test_the_same_seed_samples_the_same_tokens_in_different_batches(client: openai.OpenAI, server: str) -> None:
    alone = client.completions.create(model="writer", prompt="hello", max_tokens=16, temperature=1.0, seed=7, logprobs=2)

    async def crowded() -> dict:  # the same request among others, in one batch
        async with httpx.AsyncClient(base_url=server, timeout=60) as http:
            others = [http.post("/v1/completions", json={"model": m, "prompt": p, "max_tokens": 16, "temperature": 1.0, "seed": s})
                      for m, p, s in (("writer", "abc", 1), ("sentiment", "great", None), ("writer", "zzz", 3))]
            mine = http.post("/v1/completions", json={"model": "writer", "prompt": "hello", "max_tokens": 16, "temperature": 1.0, "seed": 7, "logprobs": 2})
            return (await asyncio.gather(mine, *others))[0].json()

    again = asyncio.run(crowded())
    assert again["choices"][0]["text"] == alone.choices[0].text
    assert again["choices"][0]["logprobs"]["tokens"] == alone.choices[0].logprobs.tokens
    other_seed = client.completions.create(model="writer", prompt="hello", max_tokens=16, temperature=1.0, seed=8, logprobs=2)
    assert other_seed.choices[0].logprobs.tokens != alone.choices[0].logprobs.tokens


def test_a_long_generation_does_not_hold_a_classification_request_behind_it(server: str) -> None:
    """A 200-token stream is running; a classification request of another task sent meanwhile is
    answered before the stream ends (the batcher runs it between two decode steps)."""
    events: dict[str, float] = {}
    first_token = threading.Event()
    alone = []
    for _ in range(5):  # the same classification with nothing else running (recorded for comparison)
        t0 = time.perf_counter()
        assert httpx.post(f"{server}/v1/predict", json={"task": "sentiment", "text": "a great film"}).status_code == 200
        alone.append(time.perf_counter() - t0)

    def stream() -> None:
        with httpx.stream("POST", f"{server}/v1/completions", json={"model": "writer", "prompt": "Once upon a time", "max_tokens": 200, "temperature": 0, "stream": True}, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data: ") and not first_token.is_set():
                    events["first_token"] = time.perf_counter()
                    first_token.set()
        events["stream_end"] = time.perf_counter()

    thread = threading.Thread(target=stream)
    thread.start()
    assert first_token.wait(60)
    sent = time.perf_counter()
    answer = httpx.post(f"{server}/v1/predict", json={"task": "sentiment", "text": "a great film"}, timeout=60)
    events["classified"] = time.perf_counter()
    thread.join(120)
    assert answer.status_code == 200 and answer.json()["label"] in ("negative", "positive")
    assert events["classified"] < events["stream_end"], events
    step_ms = 1000 * (events["stream_end"] - events["first_token"]) / 199
    print(f"classification during a 200-token stream: {1000 * (events['classified'] - sent):.1f} ms (alone: median {1000 * sorted(alone)[2]:.1f} ms); "
          f"one decode step of the stream: {step_ms:.1f} ms")
