"""Few-shot task creation through a running server, as a new user does it.

For held-out catalog tasks (never in the multi-task mix), per method, k and seed: POST /v1/tasks with
the *default request* — name, method, description, labels and k label-balanced examples, nothing
else (no template, no scoring, no train options) — poll the job to its end (timing it), then score
the new task on the task's test rows through POST /v1/predict and delete it, so that every job
starts from the same store: a task left served would be a transfer source for the next seed of the
same data set (TPV's and PHA's retrieval pick it), and the seeds would not be independent. The baseline on the same rows is the
description-only IP task (POST /v1/tasks without examples: ready at once). One JSON line per job
goes to `--out` as it finishes; a rerun skips the (task, method, k, seed) already there.

    python -m bench.jobs --url http://127.0.0.1:8000 --tasks nyt-sentiment,tweet-sentiment --k 32 \
        --seeds 0,1,2 [--methods M1,M2,...] --out docs/results/jobs-default-k32.jsonl

The test rows are the seeded test split (split seed 0) whatever the sampling seed, so every seed
and method is scored on the same rows. Needs the data (`taskserve data fetch`) on this machine and
a server with a worker (`make serve`). The description-only baseline method is asked of the
registry (the method that makes a task from a description alone and reads the form module).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx

from server.data import catalog
from server.data.readers import LabeledText
from server.data.splits import few_shot
from server.data.spec import TaskSpec
from server.methods import method_class, method_ids
from server.settings import Settings
from server.training.evaluate import classification_metrics
from server.training.experiments import TaskData, load_task_data

BASELINE = next(m for m in method_ids() if method_class(m).uses_form)  # the description-only zero-shot of the acceptance


def task_rows(task: str, eval_rows: int) -> TaskData:
    """A held-out task's rows as every job sees them: split seed 0 whatever the sampling seed, so
    every seed and method is scored on the same test rows."""
    return load_task_data(task, Settings().cache_dir / "data", seed=0, max_test=eval_rows)


def examples(data: TaskData, k: int, seed: int) -> list[LabeledText]:
    """The k label-balanced examples of a job's default request (the seed picks which)."""
    return few_shot([LabeledText(e.text, e.target) for e in data.train], k, seed)


def _post(client: httpx.Client, path: str, body: dict, attempts: int = 5) -> httpx.Response:
    """POST, retried while the server answers 503 (not ready, registry unavailable, overloaded: each
    says to come back) after its Retry-After; the reason is printed, so a sweep shows why it waited."""
    answer = client.post(path, json=body)
    for _ in range(attempts - 1):
        if answer.status_code != 503:
            break
        print(f"{path}: 503 {answer.text[:300]}; retrying", file=sys.stderr, flush=True)
        time.sleep(float(answer.headers.get("Retry-After", 2)))
        answer = client.post(path, json=body)
    answer.raise_for_status()
    return answer


def _score(client: httpx.Client, name: str, test: list, labels: tuple[str, ...]) -> dict:
    predicted = []
    for start in range(0, len(test), 64):
        chunk = test[start : start + 64]
        answer = _post(client, "/v1/predict", {"inputs": [{"task": name, "text": e.text} for e in chunk]})
        predicted += [r["label"] for r in answer.json()["results"]]
    return classification_metrics([e.target for e in test], predicted, list(labels))


def baseline(client: httpx.Client, task: str, eval_rows: int, stamp: str) -> dict:
    """The description-only task on the test rows (created once per run, then deleted)."""
    data = task_rows(task, eval_rows)
    spec = catalog.get(task)
    name = f"zs-{task}-{stamp}"[:64]
    _post(client, "/v1/tasks", {"name": name, "method": BASELINE, "description": spec.description, "labels": list(spec.labels)})
    try:
        return _score(client, name, data.test[:eval_rows], spec.labels)
    finally:
        client.delete(f"/v1/tasks/{name}")


def run_job(client: httpx.Client, task: str, method: str, k: int, seed: int, eval_rows: int, stamp: str) -> dict:
    data = task_rows(task, eval_rows)
    shots = examples(data, k, seed)
    spec = catalog.get(task)
    name = f"{task}-{method.replace('_', '-')}-k{k}-s{seed}-{stamp}"[:64]
    body = {"name": name, "method": method, "description": spec.description, "labels": list(spec.labels),
            "examples": [{"text": e.text, "label": e.label} for e in shots]}
    started = time.monotonic()
    created = _post(client, "/v1/tasks", body)
    job_id = created.json()["job"]
    while (job := client.get(f"/v1/jobs/{job_id}").json())["status"] in ("queued", "running"):
        time.sleep(2)
    record = {"task": task, "method": method, "k": k, "seed": seed, "name": name, "job": job_id, "status": job["status"],
              "seconds": round(time.monotonic() - started, 1), "error": job["error"], "metrics": job["metrics"], "request": "default",
              "template": TaskSpec.default(spec.description, spec.labels, seq2seq=False).template}
    if job["status"] == "succeeded":
        while not client.get(f"/v1/tasks/{name}").json()["served"]:
            time.sleep(0.5)
        try:
            record["test"] = _score(client, name, data.test[:eval_rows], spec.labels)
        finally:
            client.delete(f"/v1/tasks/{name}").raise_for_status()
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--tasks", default="nyt-sentiment", help="comma-separated held-out catalog tasks, or `held-out` for all")
    parser.add_argument("--k", default="32", help="comma-separated numbers of examples")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--methods", default=",".join(method_ids(trainable=True)), help="comma-separated (default: every trainable method)")
    parser.add_argument("--eval-rows", type=int, default=200)
    parser.add_argument("--api-key")
    parser.add_argument("--out", help="JSON lines, appended (default: bench/results/jobs-<time>.jsonl)")
    args = parser.parse_args(argv)
    tasks = [t.name for t in catalog.HELD_OUT] if args.tasks == "held-out" else args.tasks.split(",")
    out = Path(args.out or f"bench/results/jobs-{datetime.now(UTC).strftime('%Y%m%d-%H%M%S')}.jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    done = {(r["task"], r["method"], r["k"], r["seed"]) for r in map(json.loads, out.read_text().splitlines())} if out.exists() else set()
    have_baseline = {r["task"] for r in map(json.loads, out.read_text().splitlines()) if r.get("method") == f"{BASELINE} zero-shot"} if out.exists() else set()
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    stamp = datetime.now(UTC).strftime("%H%M%S")
    failures = 0
    with httpx.Client(base_url=args.url, timeout=300, headers=headers) as client:
        for task in tasks:
            if task not in have_baseline:
                test = baseline(client, task, args.eval_rows, stamp)
                with out.open("a") as f:
                    f.write(json.dumps({"task": task, "method": f"{BASELINE} zero-shot", "k": 0, "seed": None, "request": "default", "test": test}) + "\n")
                print(f"{task:<16} {BASELINE} zero-shot (description only): test acc {test['accuracy']:.3f}", flush=True)
            for k in map(int, args.k.split(",")):
                for seed in map(int, args.seeds.split(",")):
                    for method in args.methods.split(","):
                        if (task, method, k, seed) in done:
                            continue
                        record = run_job(client, task, method, k, seed, args.eval_rows, stamp)
                        with out.open("a") as f:
                            f.write(json.dumps(record, default=str) + "\n")
                        failures += record["status"] != "succeeded"
                        acc = record.get("test", {}).get("accuracy", float("nan"))
                        print(f"{task:<16} {method:<14} k={k:<3} seed={seed} {record['status']:<10} {record['seconds']:>7.1f} s  test acc {acc:.3f}"
                              f"  chosen {record['metrics'].get('chosen')}", flush=True)
    print(f"wrote {out}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
