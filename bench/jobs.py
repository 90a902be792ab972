"""Few-shot task creation through a running server, for every method (issue 4's acceptance run).

For a held-out catalog task (never in the multi-task mix): POST /v1/tasks with k label-balanced
training examples per method, poll each job to its end (timing it), then score the new task on
the task's test rows through POST /v1/predict and compare with the backbone's zero-shot accuracy
on the same rows (`taskserve eval --zero-shot`'s JSON, same seed and split).

    python -m bench.jobs --url http://127.0.0.1:8000 --task nyt-sentiment --k 32 \
        --zero-shot docs/results/zero-shot.json [--methods M1,M2,...] [--out FILE]

Needs the data (`taskserve data fetch`) on this machine and a server with a worker (`make serve`).
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
from server.methods import method_ids
from server.settings import Settings
from server.training.evaluate import classification_metrics
from server.training.experiments import load_task_data


def run(url: str, task: str, k: int, methods: list[str], zero_shot: float | None, eval_rows: int, steps: int, seed: int, api_key: str | None, prompt_lr: float | None = None) -> dict:
    data = load_task_data(task, Settings().cache_dir / "data", seed=seed, max_test=eval_rows)
    shots = few_shot([LabeledText(e.text, e.target.strip()) for e in data.train], k, seed)
    spec = catalog.get(task)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    stamp = datetime.now(UTC).strftime("%H%M%S")
    rows = []
    with httpx.Client(base_url=url, timeout=120, headers=headers) as client:
        for method in methods:
            name = f"{task}-{method}-k{k}-{stamp}"
            body = {
                "name": name, "method": method, "description": spec.description, "template": spec.template,
                "labels": list(spec.labels), "scoring": spec.scoring,
                "examples": [{"text": e.text, "label": e.label} for e in shots], "train": {"steps": steps, "seed": seed, **({"prompt_lr": prompt_lr} if prompt_lr else {})},
            }
            started = time.monotonic()
            created = client.post("/v1/tasks", json=body)
            created.raise_for_status()
            job_id = created.json()["job"]
            while (job := client.get(f"/v1/jobs/{job_id}").json())["status"] in ("queued", "running"):
                time.sleep(2)
            seconds = time.monotonic() - started
            row = {"method": method, "task": name, "job": job_id, "status": job["status"], "seconds": round(seconds, 1), "error": job["error"]}
            if job["status"] == "succeeded":
                while not client.get(f"/v1/tasks/{name}").json()["served"]:
                    time.sleep(0.5)
                test = data.test[:eval_rows]
                predicted = []
                for start in range(0, len(test), 64):
                    chunk = test[start : start + 64]
                    answer = client.post("/v1/predict", json={"inputs": [{"task": name, "text": e.text} for e in chunk]}).json()
                    predicted += [r["label"] for r in answer["results"]]
                row["test"] = classification_metrics([e.target.strip() for e in test], predicted, [label.strip() for label in data.spec.labels])
                row["validation"] = job["metrics"].get("validation")
            rows.append(row)
            acc = row.get("test", {}).get("accuracy")
            print(f"{method:<14} {row['status']:<10} {row['seconds']:>7.1f} s  test acc {acc if acc is not None else float('nan'):.3f}"
                  f"  (zero-shot {zero_shot if zero_shot is not None else float('nan'):.3f})", flush=True)
    return {"task": task, "k": k, "seed": seed, "steps": steps, "prompt_lr": prompt_lr, "eval_rows": eval_rows, "zero_shot_accuracy": zero_shot, "jobs": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--task", default="nyt-sentiment")
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--methods", default=",".join(method_ids(trainable=True)), help="comma-separated (default: every trainable method)")
    parser.add_argument("--zero-shot", help="JSON written by `taskserve eval --zero-shot` (same seed and eval rows)")
    parser.add_argument("--eval-rows", type=int, default=200)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prompt-lr", type=float, help="train.prompt_lr of the jobs (default: the server's)")
    parser.add_argument("--api-key")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    zero = None
    if args.zero_shot:
        zero = json.loads(Path(args.zero_shot).read_text())["zero_shot"].get(args.task, {}).get("accuracy")
    report = run(args.url, args.task, args.k, args.methods.split(","), zero, args.eval_rows, args.steps, args.seed, args.api_key, args.prompt_lr)
    out = Path(args.out or f"bench/results/jobs-{args.task}-k{args.k}-{datetime.now(UTC).strftime('%Y%m%d-%H%M%S')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}", file=sys.stderr)
    return 0 if all(r["status"] == "succeeded" for r in report["jobs"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
