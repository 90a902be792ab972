"""Serving while a job trains beside it (`make bench-colocated`).

`taskserve serve` with its embedded worker shares the CPU with the training jobs it runs. This
measures, for each worker niceness (`worker_nice`), on a scratch store seeded with the demo tasks:
  1. sequential single-row `/v1/predict` latency of a demo prompt-tuning task with nothing training;
  2. a default-request few-shot job (prompt tuning, tweet-sentiment, 32 examples): its training
     rate (steps/s, from the job's progress) alone, then
  3. the same latency and training rate while the sequential requests run beside it;
then cancels the job. Configurations alternate in rounds; medians are reported. JSON goes to
bench/results/colocated-cpu-<time>.json, a Markdown table to stdout.

    python -m bench.colocated [--nice 0,10] [--rounds 1] [--seconds 45]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx

from bench.jobs import examples, task_rows
from bench.run import device_name
from bench.serve import RESULTS, REVIEWS, ROOT, percentile, start_server
from server.data import catalog
from server.methods import method_for_peft

JOB_TASK, JOB_K = "tweet-sentiment", 32
JOB_METHOD = method_for_peft("PROMPT_TUNING")  # the job trained, and the demo task predicted beside it


async def latencies(client: httpx.AsyncClient, task: str, *, seconds: float | None = None, n: int | None = None) -> list[float]:
    """Sequential single-row predicts: `n` of them, or as many as fit in `seconds`."""
    times: list[float] = []
    end = time.monotonic() + (seconds or 0)
    while (len(times) < n) if n is not None else (time.monotonic() < end):
        t0 = time.perf_counter()
        (await client.post("/v1/predict", json={"task": task, "text": REVIEWS[len(times) % len(REVIEWS)]})).raise_for_status()
        times.append(time.perf_counter() - t0)
    return times


async def training_rate(client: httpx.AsyncClient, job: str, seconds: float) -> float:
    """Training steps per second over `seconds`, from the job's progress (steps of every phase it
    went through meanwhile: a new phase counts from 0)."""
    async def progress() -> tuple[str, int]:
        p = (await client.get(f"/v1/jobs/{job}")).json()["progress"]
        return p.get("phase", ""), int(p.get("step") or 0)

    steps, (phase, step) = 0, await progress()
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        await asyncio.sleep(1.0)
        now_phase, now_step = await progress()
        steps += now_step - step if now_phase == phase else now_step
        phase, step = now_phase, now_step
    return steps / (time.monotonic() - t0)


async def measure(url: str, task: str, seconds: float, requests: int) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        idle = await latencies(client, task, n=requests)
        spec, data = catalog.get(JOB_TASK), task_rows(JOB_TASK, 200)
        body = {"name": "colocated-job", "method": JOB_METHOD, "description": spec.description, "labels": list(spec.labels),
                "examples": [{"text": e.text, "label": e.label} for e in examples(data, JOB_K, 0)]}
        created = await client.post("/v1/tasks", json=body)
        created.raise_for_status()
        job = created.json()["job"]
        try:
            deadline = time.monotonic() + 600
            while not (await client.get(f"/v1/jobs/{job}")).json()["progress"].get("step"):  # training has begun
                if time.monotonic() > deadline:
                    raise SystemExit("the job did not start training within 10 minutes")
                await asyncio.sleep(0.5)
            alone = await training_rate(client, job, seconds)
            busy, beside = await asyncio.gather(latencies(client, task, seconds=seconds), training_rate(client, job, seconds))
        finally:
            await client.delete(f"/v1/jobs/{job}")
    return {"idle_ms": [1000 * t for t in idle], "busy_ms": [1000 * t for t in busy], "steps_s_alone": alone, "steps_s_serving": beside}


def children_cpu_s(pid: int) -> float:
    """CPU seconds used so far by the child processes of `pid` (the embedded worker)."""
    total = 0.0
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            fields = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
    return total


def wait_until_the_worker_is_idle(pid: int, timeout: float = 300) -> None:
    """The embedded worker builds its engine after the server is ready: measuring "nothing training"
    before it settles would measure its start-up."""
    deadline, last = time.monotonic() + timeout, children_cpu_s(pid)
    while time.monotonic() < deadline:
        time.sleep(2.0)
        now = children_cpu_s(pid)
        if now - last < 0.1:  # under 5% of a core: polling for jobs
            return
        last = now
    raise SystemExit("the embedded worker did not settle")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nice", default="0,10", help="comma-separated worker niceness values to compare")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=45.0, help="length of each training-rate / latency window")
    parser.add_argument("--requests", type=int, default=20, help="sequential requests with nothing training")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--port", type=int, default=8192)
    parser.add_argument("--note", default="", help="what else ran on the machine")
    args = parser.parse_args(argv)
    runs: dict[int, list[dict]] = {int(n): [] for n in args.nice.split(",")}
    for _ in range(args.rounds):
        for nice in runs:  # alternating: background load hits every configuration alike
            store = ROOT / "build" / f"bench-colocated-store-{nice}"
            shutil.rmtree(store, ignore_errors=True)
            proc = start_server(store, args.port, args.dtype, None, embedded_worker="true", worker_nice=str(nice))
            url = f"http://127.0.0.1:{args.port}"
            try:
                wait_until_the_worker_is_idle(proc.pid)
                task = next(t["name"] for t in httpx.get(f"{url}/v1/tasks").json()["tasks"] if t["served"] and t["method"] == JOB_METHOD)
                runs[nice].append(asyncio.run(measure(url, task, args.seconds, args.requests)))
            finally:
                proc.terminate()
                proc.wait(60)
                shutil.rmtree(store, ignore_errors=True)
    summary = {"device": device_name("cpu"), "dtype": args.dtype, "note": args.note, "rounds": args.rounds, "seconds": args.seconds,
               "job": f"{JOB_METHOD} {JOB_TASK} k={JOB_K}", "by_nice": {}}
    for nice, rs in runs.items():
        idle = [t for r in rs for t in r["idle_ms"]]
        busy = [t for r in rs for t in r["busy_ms"]]
        summary["by_nice"][nice] = {"idle_p50_ms": statistics.median(idle), "busy_p50_ms": statistics.median(busy), "busy_p99_ms": percentile(busy, 0.99),
                                    "busy_requests": len(busy), "steps_s_alone": statistics.median(r["steps_s_alone"] for r in rs),
                                    "steps_s_serving": statistics.median(r["steps_s_serving"] for r in rs), "runs": rs}
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"colocated-cpu-{datetime.now(UTC).strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(summary, indent=2))
    print(f"### serving beside a training job on {summary['device']} ({args.dtype}); job: {summary['job']}; {args.note}\n")
    print("| worker nice | p50 ms, nothing training | p50 ms, job training | p99 ms, job training | latency while training / idle | job steps/s alone | job steps/s while serving |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for nice, v in summary["by_nice"].items():
        print(f"| {nice} | {v['idle_p50_ms']:.0f} | {v['busy_p50_ms']:.0f} | {v['busy_p99_ms']:.0f} | {v['busy_p50_ms'] / v['idle_p50_ms']:.2f}x "
              f"| {v['steps_s_alone']:.3f} | {v['steps_s_serving']:.3f} |")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
