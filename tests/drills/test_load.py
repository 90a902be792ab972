"""Drills 1 and 19: many concurrent clients over tasks of all five methods — every answer 2xx and
equal to its solo answer, and the server's counters agree with the client's."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import pytest
from harness import Deployment, deployment, record, scale


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[Deployment]:
    with deployment(tmp_path_factory.mktemp("load"), TASKSERVE_MAX_QUEUE="4096") as d:
        d.publish(per_method=scale(2, 10))  # 10 / 50 tasks
        yield d


def test_concurrent_clients_get_their_solo_answers_and_the_counters_agree(served: Deployment) -> None:
    clients = scale(60, 500)
    rows = [{"task": served.tasks[i % len(served.tasks)], "text": f"review {i}: {'great' if i % 3 else 'dull'} film"} for i in range(clients)]
    before = served.metrics()

    async def main():
        limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
        async with httpx.AsyncClient(base_url=served.url, timeout=120, limits=limits) as client:
            together = await asyncio.gather(*(client.post("/v1/predict", json=r) for r in rows))
            solo = [await client.post("/v1/predict", json=r) for r in rows]
            return together, solo

    together, solo = asyncio.run(main())
    statuses = [r.status_code for r in together + solo]
    assert statuses.count(200) == len(statuses), {s: statuses.count(s) for s in set(statuses)}
    mismatched = 0
    for a, b in zip(together, solo, strict=True):
        ja, jb = a.json(), b.json()
        same = ja["label"] == jb["label"] and all(abs(ja["scores"][k] - p) <= 1e-5 for k, p in jb["scores"].items())
        mismatched += not same
    assert mismatched == 0, f"{mismatched} of {clients} concurrent answers differ from their solo answers"

    after = served.metrics()
    delta = lambda name: after.get(name, 0.0) - before.get(name, 0.0)  # noqa: E731
    served_rows = sum(v - before.get(k, 0.0) for k, v in after.items() if k.startswith("taskserve_predictions_total{") and "outcome=ok" in k)
    assert served_rows == 2 * clients, f"the server counted {served_rows} answered rows, the clients {2 * clients}"
    assert after.get("taskserve_queue_depth", 0.0) == 0.0
    record("load", clients=clients, tasks=len(served.tasks), methods=5, non_2xx=len(statuses) - statuses.count(200),
           differing_from_solo=mismatched, server_rows_ok=served_rows, client_rows=2 * clients, batches=delta("taskserve_batch_rows_count"))
