"""How well a few-shot job's selection chose: the test curve of the job's final fit.

For default-request jobs already run by `bench.jobs` (their records in docs/results/jobs-default*.jsonl),
the final fit — the same start, the same k examples, the job's config — is retrained for the whole
schedule on all examples, scoring the task's test rows at the start and at every candidate step. Beside the
job's recorded selection (its cross-validated curve) this shows what each selection rule would have
published and how that scored on the test rows, so a rule is chosen on evidence, not on one seed
(`--average β` retrains with weight averaging instead, to see what it does to the curve). A rule picks
a fold step; a job's own final fit then trains at least twice it and on until it fits every example
(`few_shot.learn`), so the job's published score is `job_test`, not the curve at its chosen step:

    python -m bench.selection_curves --store build/curves-store --task tweet-sentiment --methods tpv,ip --seeds 0,1,2

The store must hold what the job's server held when it ran (a scratch store seeded from demo_store/:
`taskserve store import demo_store --store build/curves-store`), since TPV and PHA pick their starts
among the served tasks. JSON to bench/results/selection-curves-<time>.json; a table per job on stdout.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
from datetime import UTC, datetime
from pathlib import Path

from bench.jobs import examples, task_rows
from bench.report import default_jobs
from server.data import catalog
from server.data.spec import TaskSpec
from server.settings import Settings
from server.task import Example
from server.training.experiments import TaskData
from server.training.few_shot import START, few_shot
from server.training.trainer import TrainConfig


def _key(entry: dict) -> tuple[float, float]:
    return entry["accuracy"], -entry["nll"]


def rules(selection: dict[str, dict]) -> dict[str, str]:
    """The candidate each selection rule picks from a job's recorded selection (trained steps and
    the untrained start; the description-only candidates are left out: their test score is the
    baseline's)."""
    steps = [c for c in selection if c == START or c.startswith("step ")]
    trained = [c for c in steps if c != START]
    smoothed = {c: statistics.fmean(selection[n]["accuracy"] for n in steps[max(0, i - 1): i + 2]) for i, c in enumerate(steps)}
    best = max(steps, key=lambda c: _key(selection[c]))
    p, n = selection[best]["accuracy"], selection[best]["rows"]
    within = selection[best]["accuracy"] - math.sqrt(p * (1 - p) / n)  # one standard error of the best's accuracy
    return {
        "accuracy, then misfit (the jobs' choice of fold step)": max(steps, key=lambda c: _key(selection[c])),
        "misfit alone": min(steps, key=lambda c: selection[c]["nll"]),
        "accuracy smoothed over neighbouring steps": max(steps, key=lambda c: (smoothed[c], -selection[c]["nll"])),
        "one standard error: the least training within 1 SE of the best": next(c for c in steps if selection[c]["accuracy"] >= within),
        "always the last step": trained[-1],
    }


def curve(engine, record: dict, data: TaskData, config: TrainConfig) -> dict[str, float]:
    """Test accuracy of the job's final fit (its start, its k examples, its config: `few_shot` is
    what `learn`'s final fit runs) at the start and at every evaluated step."""
    task, method, k, seed = record["task"], record["method"], record["k"], record["seed"]
    spec = catalog.get(task)
    rows = [Example(task, e.text, e.label) for e in examples(data, k, seed)]
    request_spec = TaskSpec.default(spec.description, spec.labels, seq2seq=engine.backbone.is_encoder_decoder)
    _, result, _ = few_shot(engine, f"curve-{method}-k{k}-s{seed}", method, request_spec, rows, data.test, {}, config, eval_at_start=True)
    return {START if h["step"] == 0 else f"step {h['step']}": h["val_accuracy"] for h in result.history}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", required=True)
    parser.add_argument("--task", default="tweet-sentiment")
    parser.add_argument("--methods", default="tpv,ip")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--records", default="docs/results")
    parser.add_argument("--eval-rows", type=int, default=200)
    parser.add_argument("--average", type=float, default=0.0, help="retrain with this weight-averaging decay (TrainConfig.average; the jobs ran with 0)")
    args = parser.parse_args(argv)

    from adapters_store.store import Store
    from server.factory import build_engine
    from server.store_sync import attach

    settings = Settings(store=args.store, seed_store="")
    engine = build_engine(settings, training=True)
    attach(Store(settings.store, settings.db_url), engine)
    jobs = default_jobs(Path(args.records))
    records = {(r["task"], r["method"], r["k"], r["seed"]): r for r in jobs if r.get("test")}
    base = next(r["test"]["accuracy"] for r in jobs if r["task"] == args.task and r["k"] == 0)
    data = task_rows(args.task, args.eval_rows)
    config = dataclasses.replace(TrainConfig.for_job(steps=60, seed=0), eval_rows=len(data.test), average=args.average)  # what a default request trains with
    out = []
    for method in args.methods.split(","):
        for seed in map(int, args.seeds.split(",")):
            record = records.get((args.task, method, args.k, seed))
            if record is None:
                print(f"no record of {args.task} {method} k={args.k} seed={seed}: skipped")
                continue
            selection = record["metrics"]["selection"]
            test_curve = curve(engine, record, data, config)
            picks = {rule: {"chosen": c, "test": test_curve[c]} for rule, c in rules(selection).items()}
            out.append({"task": args.task, "method": method, "k": args.k, "seed": seed, "job_test": record["test"]["accuracy"],
                        "baseline": base, "average": args.average, "cross_validated": {c: v["accuracy"] for c, v in selection.items()}, "test_curve": test_curve, "rules": picks})
            print(f"\n{args.task} {method} k={args.k} seed={seed} (job published {record['metrics']['chosen']}: test {record['test']['accuracy']:.3f}; baseline {base:.3f})")
            print(f"{'candidate':<10} {'cross-validated':>16} {'test (final fit)':>17}")
            for c, acc in test_curve.items():
                print(f"{c:<10} {selection.get(c, {}).get('accuracy', float('nan')):>16.3f} {acc:>17.3f}")
            for rule, pick in picks.items():
                print(f"  {rule:<44} {pick['chosen']:<8} test {pick['test']:.3f}")
    path = Path("bench/results") / f"selection-curves-{datetime.now(UTC).strftime('%Y%m%d-%H%M%S')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
