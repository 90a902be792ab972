"""The server measured over HTTP, side by side in one run (`make bench-serve`).

Starts `taskserve serve` on a scratch store seeded with the demo tasks (no worker), then measures:
  1. single-row latency, p50 / p99 per method, sequential requests of a ~30-token review;
  2. throughput (rows/s) and p99 at concurrency 1 / 8 / 32: rows over all demo tasks mixed vs the
     same rows all on one task — and, from the server's counters, how many rows a batch had, the
     engine's time per row and how busy the engine was (its seconds over the run's);
  3. the cost of the API + batcher as a ratio: the same requests' time inside the server's engine
     (`taskserve_batch_seconds`, read around each sequential run) — and the same single rows through
     an engine alone in this process (no HTTP, no batcher), with the server's torch threads and with
     one thread, interleaved (1 vs 2 threads side by side). The in-server ratio is the one to read:
     it times the very requests, while this process's engine runs at another moment of a noisy
     machine, and right after it its OpenMP threads still spin (a few ms) beside the server's;
  5. a `plain` task (the backbone alone, the prompt-tuning task's template) as the reference row: a
     prompt-tuning / TPV row over a plain row of the same input is what their soft prompt costs;
  6. at concurrency 32, one-task throughput for a task of each method, combined in the mix's own
     proportions (rows are spread evenly over the mixed tasks, so 1 / Σ_m f_m / rate_m, f_m the
     share of method m's tasks): what the same rows would cost served one task at a time, so
     "mixed / one-task, same rows" is what mixing itself costs, apart from what the mix's rows cost —
     and the same in the engine alone: one 32-row batch over all tasks vs a batch per method;
  4. the HF + PEFT way a user would serve the demo's prompt-tuning tasks: one PeftModel holding one
     PROMPT_TUNING adapter per task, rows grouped per task, `set_adapter` and one padded forward per
     group — on the same rows, as the anchor ratio.
Configurations are interleaved in rounds and medians reported (the machine is shared: say what
else ran). JSON goes to bench/results/serve-<device>-<time>.json, a Markdown table to stdout.

    python -m bench.serve [--rounds 3] [--requests 40] [--dtype auto|float32|bfloat16] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path

import httpx

from bench.run import clock, device_name
from server.methods import method_for_peft, method_ids

ROOT = Path(__file__).parents[1]
RESULTS = Path(__file__).parent / "results"
PLAIN = next(m for m in method_ids() if m not in method_ids(trainable=True))  # the backbone alone: the reference row
REVIEWS = [
    "The film was a quiet and moving story, but its plot felt thin and the ending dragged on.",
    "A wonderful cast gives warm, sharp performances in a script that never quite finds its voice.",
    "Dull, tedious and far too long; I checked my watch every ten minutes and regretted the ticket.",
    "One of the best films of the year: funny, tender and beautifully shot from start to finish.",
]


def start_server(store: Path, port: int, dtype: str, threads: int | None, **settings: str) -> subprocess.Popen:
    """`taskserve serve` on `store` (seeded with the demo tasks; no worker unless `settings`, as
    TASKSERVE_* names without the prefix, say otherwise), once it answers /readyz."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TASKSERVE_STORE": str(store), "TASKSERVE_PORT": str(port), "TASKSERVE_EMBEDDED_WORKER": "false",
           "TASKSERVE_DTYPE": dtype, "TASKSERVE_SEED_STORE": str(ROOT / "demo_store"), **({"TASKSERVE_THREADS": str(threads)} if threads else {}),
           **{f"TASKSERVE_{name.upper()}": value for name, value in settings.items()}}
    log = store.with_name(f"{store.name}.log")  # a file, not a pipe nobody drains: a chatty server (its worker too) never blocks on it
    log.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-m", "server.cli", "serve"], env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log.open("w"))
    for _ in range(600):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise SystemExit(f"taskserve serve exited: {log.read_text()[-2000:]}")
        time.sleep(0.5)
    raise SystemExit("taskserve serve did not become ready")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def sequential(url: str, tasks: list[str], n: int) -> list[float]:
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        times = []
        for i in range(n):
            t0 = time.perf_counter()
            r = await client.post("/v1/predict", json={"task": tasks[i % len(tasks)], "text": REVIEWS[i % len(REVIEWS)]})
            r.raise_for_status()
            times.append(time.perf_counter() - t0)
        return times


def batch_counters(url: str) -> dict[str, float]:
    """The server's batch counters: batches run, rows in them, the engine's seconds on them."""
    wanted = {"taskserve_batch_rows_count": "batches", "taskserve_batch_rows_sum": "rows", "taskserve_batch_seconds_sum": "engine_s"}
    out = {}
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        name, _, value = line.partition(" ")
        if name in wanted:
            out[wanted[name]] = float(value)
    return out


def measured(url: str, fn):
    """`fn()`'s value and what the server's batch counters moved by while it ran."""
    before = batch_counters(url)
    value = fn()
    return value, {k: v - before[k] for k, v in batch_counters(url).items()}


async def concurrent(url: str, tasks: list[str], concurrency: int, n: int) -> tuple[float, list[float]]:
    """n rows from `concurrency` clients, each sending its next row when the last came back."""
    rows = [(tasks[i % len(tasks)], REVIEWS[i % len(REVIEWS)]) for i in range(n)]
    random.Random(0).shuffle(rows)
    queue = list(rows)
    latencies: list[float] = []

    async def client_loop(client: httpx.AsyncClient) -> None:
        while queue:
            task, text = queue.pop()
            t0 = time.perf_counter()
            r = await client.post("/v1/predict", json={"task": task, "text": text})
            r.raise_for_status()
            latencies.append(time.perf_counter() - t0)

    async with httpx.AsyncClient(base_url=url, timeout=120, limits=httpx.Limits(max_connections=concurrency)) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
        return n / (time.perf_counter() - t0), latencies


def engine_alone(dtype: str, store: Path, by_method: dict[str, str], n: int):
    """The same single rows through an engine in this process: returns fn(method) -> latencies."""
    from adapters_store.store import Store
    from server.engine import Request
    from server.factory import build_engine
    from server.settings import Settings
    from server.store_sync import attach

    settings = Settings(dtype=dtype, store=store, seed_store=None)
    engine = build_engine(settings)
    attach(Store(store), engine)

    def run(method: str, threads: int | None = None) -> list[float]:
        import torch

        server_threads = torch.get_num_threads()
        torch.set_num_threads(threads or server_threads)
        try:
            times = []
            for i in range(n):
                t0 = time.perf_counter()
                engine.run([Request(by_method[method], REVIEWS[i % len(REVIEWS)])])
                times.append(time.perf_counter() - t0)
            return times
        finally:
            torch.set_num_threads(server_threads)

    return engine, run


def peft_way(engine, prompt_tasks: list[str]):
    """One PeftModel with one PROMPT_TUNING adapter per demo prompt task (their very prompts),
    rows grouped per task: fn(rows) -> seconds for the batch."""
    import copy

    import torch
    from peft import PromptTuningConfig, TaskType, get_peft_model

    backbone = engine.backbone
    first = engine.tasks[prompt_tasks[0]]
    n = first.params["prompt"].shape[0]
    model = get_peft_model(copy.deepcopy(backbone.model), PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=n), adapter_name=prompt_tasks[0])
    for name in prompt_tasks[1:]:
        model.add_adapter(name, PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=n))
    with torch.no_grad():
        for name in prompt_tasks:
            model.prompt_encoder[name].embedding.weight.copy_(engine.tasks[name].params["prompt"].to(model.dtype))
    model.eval()
    tokenizer = copy.deepcopy(backbone.tokenizer)
    tokenizer.padding_side = "left"

    def run(rows: list[tuple[str, str]]) -> float:
        t0 = time.perf_counter()
        groups: dict[str, list[str]] = defaultdict(list)
        for task, text in rows:
            groups[task].append(engine.tasks[task].spec.render(text))
        with torch.no_grad():
            for task, texts in groups.items():
                model.set_adapter(task)
                enc = tokenizer(texts, padding=True, return_tensors="pt")
                model(**enc, logits_to_keep=1)
        return time.perf_counter() - t0

    return run


def print_tables(summary: dict) -> None:
    """A run's tables (markdown), from its JSON summary."""
    n_tasks = summary["tasks"]
    lat, rates, threads, wait = summary["latency_ms"], summary["throughput_rows_s"], summary["threads"], summary["max_wait_ms"]
    print(f"### taskserve over HTTP on {summary['device']} ({summary['dtype']}{f', max_wait_ms {wait}' if wait else ''}); {summary['note']}\n")
    print(f"| method | HTTP p50 ms | HTTP p99 ms | HTTP / engine in the server | engine alone p50 ms | HTTP / engine alone | over plain (HTTP) | over plain (engine) "
          f"| engine, 1 thread p50 ms | 1 / {threads} threads |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for m, v in lat.items():
        in_server = f"{v['http_over_server_engine']:.2f}x" if "http_over_server_engine" in v else "–"
        print(f"| {m} | {v['p50']:.0f} | {v['p99']:.0f} | {in_server} | {v['engine_p50']:.0f} | {v['p50'] / v['engine_p50']:.2f}x | {v['p50'] / lat[PLAIN]['p50']:.2f}x "
              f"| {v['engine_p50'] / lat[PLAIN]['engine_p50']:.2f}x | {v['engine_1_thread_p50']:.0f} | {v['engine_1_thread_p50'] / v['engine_p50']:.2f}x |")
    batches = summary.get("batches", {})
    print("\n| concurrency | mixed rows/s | one-task rows/s | mixed / one | mixed p99 ms | one p99 ms | rows a batch, mixed / one | engine ms a row, mixed / one | engine busy, mixed / one |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for c in (1, 8, 32):
        mixed, single = rates[f"mixed@{c}"], rates[f"one@{c}"]
        b = [batches.get(f"{label}@{c}") for label in ("mixed", "one")]
        shape = (f"{b[0]['rows_per_batch']:.1f} / {b[1]['rows_per_batch']:.1f} | {1000 * b[0]['engine_s_per_row']:.0f} / {1000 * b[1]['engine_s_per_row']:.0f} "
                 f"| {b[0]['engine_busy']:.0%} / {b[1]['engine_busy']:.0%}") if all(b) else "– | – | –"
        print(f"| {c} | {mixed:.1f} | {single:.1f} | {mixed / single:.2f}x | {summary['p99_ms'][f'mixed@{c}']:.0f} | {summary['p99_ms'][f'one@{c}']:.0f} | {shape} |")
    print("\n| at concurrency 32 | rows/s | share of the mix |\n|---|---:|---:|")
    for m, share in summary["mix_share"].items():
        print(f"| one {m} task | {rates[f'{m}@32']:.1f} | {share:.0%} |")
    matched = summary["one_task_same_rows_at_32"]
    print(f"| one task at a time, the mix's rows (1 / Σ share / rate) | {matched:.1f} | |")
    print(f"| mixed over {n_tasks} tasks | {rates['mixed@32']:.1f} | |")
    print(f"\nmixed / one-task, same rows: {rates['mixed@32'] / matched:.2f}x (mixed / one {method_for_peft('PROMPT_TUNING')} task: {rates['mixed@32'] / rates['one@32']:.2f}x)")
    batch = summary["engine_32_rows_s"]
    print(f"engine alone, one batch of 32 rows over the {n_tasks} tasks: {batch['mixed']:.2f} s mixed, {batch['grouped_per_method']:.2f} s "
          f"grouped per method (a batch per method) — mixed / grouped speed {batch['grouped_per_method'] / batch['mixed']:.2f}x")
    print(f"\nHF + PEFT grouped per task ({summary['peft']['runs'][0]['tasks']} prompt-tuning tasks, 32 rows): ours (engine) is "
          f"{summary['peft']['ours_over_peft_speed']:.2f}x faster.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=40, help="sequential requests per method per round")
    parser.add_argument("--rows", type=int, default=192, help="rows per throughput measurement")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--max-wait-ms", help="the server's batch window (TASKSERVE_MAX_WAIT_MS; default: the server's)")
    parser.add_argument("--port", type=int, default=8191)
    parser.add_argument("--quick", action="store_true", help="1 round, 10 requests, 64 rows (a smoke run)")
    parser.add_argument("--note", default="", help="what else ran on the machine")
    parser.add_argument("--report", type=Path, metavar="JSON", help="print the tables of an earlier run's JSON and exit")
    args = parser.parse_args(argv)
    if args.report:
        print_tables(json.loads(args.report.read_text()))
        return 0
    if args.quick:
        args.rounds, args.requests, args.rows = 1, 10, 64
    store = ROOT / "build" / f"bench-serve-store-{os.getpid()}"
    proc = start_server(store, args.port, args.dtype, args.threads, **({"max_wait_ms": args.max_wait_ms} if args.max_wait_ms else {}))
    url = f"http://127.0.0.1:{args.port}"
    try:
        methods_of = {t["name"]: t["method"] for t in httpx.get(f"{url}/v1/tasks").json()["tasks"] if t["served"]}
        tasks = list(methods_of)
        mix_share = {m: sum(1 for n in tasks if methods_of[n] == m) / len(tasks) for m in sorted(set(methods_of.values()))}
        by_method = {}
        for name in sorted(tasks):
            by_method.setdefault(methods_of[name], name)
        one = by_method[method_for_peft("PROMPT_TUNING")]
        reference = httpx.get(f"{url}/v1/tasks/{one}").json()["spec"]
        plain = httpx.post(f"{url}/v1/tasks", json={"name": "bench-plain", "method": PLAIN, "description": reference["description"],
                                                    "labels": reference["labels"], "template": reference["template"]})
        plain.raise_for_status()
        by_method[PLAIN] = "bench-plain"
        engine, alone = engine_alone(args.dtype, store, by_method, args.requests)
        import torch

        engine_threads = torch.get_num_threads()
        prompt_tasks = [n for n in tasks if methods_of[n] == method_for_peft("PROMPT_TUNING")]
        peft_run = peft_way(engine, prompt_tasks)
        results: dict = {"latency": defaultdict(list), "engine": defaultdict(list), "engine_1t": defaultdict(list), "throughput": defaultdict(list), "p99": defaultdict(list), "peft": [],
                   "engine_mixed": [], "engine_grouped": [], "server_engine_s": defaultdict(float), "batches": defaultdict(list)}
        for _ in range(args.rounds):  # every configuration once per round: background load hits all alike
            for method, name in by_method.items():
                times, moved = measured(url, lambda name=name: asyncio.run(sequential(url, [name], args.requests)))
                results["latency"][method] += times
                results["server_engine_s"][method] += moved["engine_s"]  # the same requests' batches, timed inside the server
                results["engine"][method] += alone(method)
                results["engine_1t"][method] += alone(method, threads=1)
            for concurrency in (1, 8, 32):
                for label, pool in (("mixed", tasks), ("one", [one])):
                    (rate, lats), moved = measured(url, lambda pool=pool, c=concurrency: asyncio.run(concurrent(url, pool, c, args.rows)))
                    results["throughput"][f"{label}@{concurrency}"].append(rate)
                    results["batches"][f"{label}@{concurrency}"].append({**moved, "wall_s": args.rows / rate})
                    results["p99"][f"{label}@{concurrency}"].append(percentile(lats, 0.99))
            for method in mix_share:
                results["throughput"][f"{method}@32"].append(asyncio.run(concurrent(url, [by_method[method]], 32, args.rows))[0])
            from server.engine import Request

            mixed_rows = [Request(tasks[i % len(tasks)], REVIEWS[i % len(REVIEWS)]) for i in range(32)]
            results["engine_mixed"].append(clock(lambda: engine.run_each(mixed_rows), cuda=False))  # as the server runs a batch: passes by length
            groups = [[r for r in mixed_rows if methods_of[r.task] == m] for m in mix_share]
            results["engine_grouped"].append(sum(clock(lambda g=g: engine.run_each(g), cuda=False) for g in groups))
            rows = [(prompt_tasks[i % len(prompt_tasks)], REVIEWS[i % len(REVIEWS)]) for i in range(32)]
            ours_s = clock(lambda: engine.run([Request(t, x) for t, x in rows]), cuda=False)
            results["peft"].append({"ours_s": ours_s, "peft_s": peft_run(rows), "rows": len(rows), "tasks": len(prompt_tasks)})
    finally:
        proc.terminate()
        proc.wait(30)
    summary = {
        "device": device_name("cpu"), "dtype": args.dtype, "note": args.note, "rounds": args.rounds, "max_wait_ms": args.max_wait_ms,
        "threads": engine_threads, "tasks": len(tasks),
        "latency_ms": {m: {"p50": 1000 * statistics.median(v), "p99": 1000 * percentile(v, 0.99), "engine_p50": 1000 * statistics.median(results["engine"][m]),
                           "engine_1_thread_p50": 1000 * statistics.median(results["engine_1t"][m]),
                           "http_over_server_engine": sum(v) / results["server_engine_s"][m]} for m, v in results["latency"].items()},
        "batches": {k: {"rows_per_batch": sum(r["rows"] for r in v) / sum(r["batches"] for r in v), "engine_s_per_row": sum(r["engine_s"] for r in v) / sum(r["rows"] for r in v),
                        "engine_busy": sum(r["engine_s"] for r in v) / sum(r["wall_s"] for r in v)} for k, v in results["batches"].items()},
        "throughput_rows_s": {k: statistics.median(v) for k, v in results["throughput"].items()},
        "mix_share": mix_share,
        "engine_32_rows_s": {"mixed": statistics.median(results["engine_mixed"]), "grouped_per_method": statistics.median(results["engine_grouped"])},
        "p99_ms": {k: 1000 * statistics.median(v) for k, v in results["p99"].items()},
        "peft": {"ours_over_peft_speed": statistics.median(r["peft_s"] / r["ours_s"] for r in results["peft"]), "runs": results["peft"]},
    }
    rates = summary["throughput_rows_s"]
    matched = 1 / sum(share / rates[f"{m}@32"] for m, share in mix_share.items())  # the mix's rows, one task at a time
    summary["one_task_same_rows_at_32"] = matched
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"serve-cpu-{datetime.now(UTC).strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(summary, indent=2))
    print_tables(summary)
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
