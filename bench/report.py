"""Markdown tables for docs/results.md from the JSON reports in docs/results/ (nothing is typed by
hand): the multi-task table (zero-shot vs every method, per task and average), the few-shot
transfer table (mean ± std over seeds) and the few-shot jobs run through the server.

    python -m bench.report [docs/results]
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from server.methods import method_ids

METHODS = method_ids(trainable=True)


def multitask_table(folder: Path) -> str:
    zero = json.loads((folder / "zero-shot.json").read_text())["zero_shot"] if (folder / "zero-shot.json").exists() else {}
    runs = {m: json.loads(p.read_text()) for m in METHODS if (p := folder / f"train-{m}.json").exists()}
    tasks = list(next(iter(runs.values()))["tasks"]) if runs else []
    head = "| task | zero-shot | " + " | ".join(runs) + " |\n|---|---:|" + "---:|" * len(runs) + "\n"
    lines = []
    for task in tasks:
        cells = [f"{runs[m]['tasks'][task]['test']['accuracy']:.3f}" for m in runs]
        lines.append(f"| {task} | {zero.get(task, {}).get('accuracy', float('nan')):.3f} | " + " | ".join(cells) + " |")
    if tasks:
        zs = statistics.fmean(zero[t]["accuracy"] for t in tasks if t in zero) if zero else float("nan")
        avg = [f"**{statistics.fmean(runs[m]['tasks'][t]['test']['accuracy'] for t in tasks):.3f}**" for m in runs]
        lines.append(f"| **average** | **{zs:.3f}** | " + " | ".join(avg) + " |")
        sizes = ", ".join(f"{t} {next(iter(runs.values()))['tasks'][t]['test']['n']}" for t in tasks)
        lines.append("")
        lines.append(f"Test rows per task (the first ones of the seeded test split): {sizes}. Training: " + "; ".join(
            f"{m} {r['config']['steps']} steps × {r['config']['batch_size']} rows, {r['train_seconds']:.0f} s" for m, r in runs.items()) + ".")
    return head + "\n".join(lines) + "\n"


def few_shot_runs(folder: Path) -> tuple[list[dict], dict]:
    """Every few-shot run in `few-shot*.json` reports and their `.partial.jsonl` logs (a sweep cut
    short still counts), one per (task, method, k, seed); plus the zero-shot accuracies they carry."""
    runs: dict[tuple, dict] = {}
    zero: dict = {}
    if (baseline := folder / "zero-shot.json").exists():  # the same seeded test rows as the sweeps
        zero.update(json.loads(baseline.read_text()).get("zero_shot", {}))
    for path in sorted(folder.glob("few-shot*.json")):
        report = json.loads(path.read_text())
        zero.update(report.get("zero_shot", {}))
        for r in report.get("few_shot", []):
            runs[(r["task"], r["method"], r["k"], r["seed"])] = r
    for path in sorted(folder.glob("few-shot*.partial.jsonl")):
        for line in path.read_text().splitlines():
            r = json.loads(line)
            runs.setdefault((r["task"], r["method"], r["k"], r["seed"]), r)
    return list(runs.values()), zero


def few_shot_table(folder: Path) -> str:
    runs, zero = few_shot_runs(folder)
    if not runs:
        return "(not run)\n"
    ks = sorted({r["k"] for r in runs})
    head = "| task | method | " + " | ".join(f"k={k}" for k in ks) + " |\n|---|---|" + "---:|" * len(ks) + "\n"
    lines = []
    for task in sorted({r["task"] for r in runs}):
        if task in zero:
            lines.append(f"| {task} | zero-shot | " + " | ".join(f"{zero[task]['accuracy']:.3f}" for _ in ks) + " |")
        for method in METHODS:
            cells = []
            for k in ks:
                accs = [r["test"]["accuracy"] for r in runs if (r["task"], r["method"], r["k"]) == (task, method, k)]
                cells.append(f"{statistics.fmean(accs):.3f} ± {statistics.pstdev(accs):.3f} (n={len(accs)})" if accs else "–")
            if any(c != "–" for c in cells):
                lines.append(f"| {task} | {method} | " + " | ".join(cells) + " |")
    seeds = sorted({r["seed"] for r in runs})
    return head + "\n".join(lines) + f"\n\nSeeds {seeds}; mean ± population std of test accuracy over the seeds that ran (n).\n"


def jobs_table(folder: Path) -> str:
    out = []
    for path in sorted(folder.glob("jobs-*.json")):
        report = json.loads(path.read_text())
        out.append(f"`{path.name}`: task {report['task']}, k = {report['k']}, {report['steps']} steps, zero-shot accuracy "
                   f"{report['zero_shot_accuracy']:.3f} on the same {report['eval_rows']} test rows.\n")
        out.append("| method | job | seconds | test accuracy | beats zero-shot |\n|---|---|---:|---:|---|")
        for job in report["jobs"]:
            acc = job.get("test", {}).get("accuracy")
            beats = "yes" if acc is not None and acc > report["zero_shot_accuracy"] else "no"
            out.append(f"| {job['method']} | {job['status']} | {job['seconds']:.0f} | {acc if acc is not None else float('nan'):.3f} | {beats} |")
        out.append("")
    return "\n".join(out) or "(not run)\n"


def default_jobs(folder: Path) -> list[dict]:
    """Every record of `jobs-default*.jsonl` (bench.jobs through a server, the default request)."""
    records = []
    for path in sorted(folder.glob("jobs-default*.jsonl")):
        records += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return records


def points(accuracy: float) -> float:
    """Accuracy in points, rounded to 1e-6 so that the acceptance checks compare what the table shows:
    0.93 − 0.89 is 0.04000000000000004 in floats, and a 4.0-point spread meets "≤ 4"."""
    return round(100 * accuracy, 6)


def _published(metrics: dict) -> str:
    """What a job published: its chosen candidate, and the final fit's steps where they differ from the
    chosen fold step (the final fit makes the folds' passes over all the examples: `step 10 → 20`)."""
    chosen, trained = metrics.get("chosen", "?"), metrics.get("steps_trained")
    if chosen.startswith("step ") and trained is not None and trained != int(chosen.removeprefix("step ")):
        return f"{chosen} → {trained}"
    return chosen


def default_jobs_table(folder: Path) -> str:
    """Per held-out task: the description-only baseline, then per method and k the test accuracy
    over seeds (mean, min–max), what each job published, and the acceptance checks at k = 32:
    mean ≥ baseline + 5 points, no seed below the baseline, spread ≤ 4 points."""
    records = default_jobs(folder)
    if not records:
        return "(not run)\n"
    base = {r["task"]: r["test"]["accuracy"] for r in records if r["k"] == 0}
    jobs = sorted((r for r in records if r["k"] and r.get("test")), key=lambda r: r["seed"])  # columns list the seeds in order
    lines = ["| task | method | k | seeds | mean | min–max | published (chosen → steps trained) | mean ≥ base+5 | min ≥ base | spread ≤ 4 |",
             "|---|---|---:|---:|---:|---|---|---|---|---|"]
    for task in sorted({r["task"] for r in records}):
        b = base.get(task)
        lines.append(f"| {task} | description-only baseline | 0 | – | {b:.3f} | | | | | |" if b is not None else f"| {task} | (no baseline) | | | | | | | | |")
        for method in METHODS:
            for k in sorted({r["k"] for r in jobs if r["task"] == task}):
                accs = [r["test"]["accuracy"] for r in jobs if (r["task"], r["method"], r["k"]) == (task, method, k)]
                if not accs:
                    continue
                chosen = [_published(r["metrics"]) for r in jobs if (r["task"], r["method"], r["k"]) == (task, method, k)]
                mean, lo, hi = statistics.fmean(accs), min(accs), max(accs)
                checks = ["yes" if ok else "**no**" for ok in (points(mean) >= points(b) + 5, lo >= b, points(hi - lo) <= 4)] if b is not None else ["", "", ""]
                if len(accs) < 2:
                    checks[2] = "–"  # one seed has no spread
                lines.append(f"| {task} | {method} | {k} | {len(accs)} | {mean:.3f} | {lo:.3f}–{hi:.3f} | {', '.join(chosen)} | " + " | ".join(checks) + " |")
    guarded = [r for r in jobs if "guard" in r["metrics"].get("notes", {})]
    if guarded:  # where a method learned nothing worth publishing, and why: the job's own words
        lines += ["", "Where the guard published an untrained task (the job's note):", ""]
        lines += [f"- {r['task']} {r['method']} k={r['k']} seed {r['seed']}: {r['metrics']['notes']['guard']}." for r in guarded]
    return "\n".join(lines) + "\n"


LR_SETTINGS = {"promptlrrelative": "{} × embedding RMS", "promptlr": "{} (absolute: the seeds' T5 value)"}


def lr_calibration_table(folder: Path) -> str:
    """Prompt-tuning few-shot runs that differ only in the soft-prompt learning rate, one
    `lr-calib-<setting>.json` report per setting (the setting is the file's tag: `promptlr0.3`,
    `promptlrrelative0.03`)."""
    lines = ["| soft-prompt lr | task | k | steps | seeds | accuracy per seed | mean |", "|---|---|---:|---:|---:|---|---:|"]
    for path in sorted(folder.glob("lr-calib-*.json"), key=lambda p: ("relative" not in p.stem, p.stem)):
        tag = path.stem.removeprefix("lr-calib-")
        kind = "promptlrrelative" if tag.startswith("promptlrrelative") else "promptlr"
        runs = sorted(json.loads(path.read_text())["few_shot"], key=lambda r: r["seed"])
        accs = [r["test"]["accuracy"] for r in runs]
        lines.append(f"| {LR_SETTINGS[kind].format(tag.removeprefix(kind))} | {runs[0]['task']} | {runs[0]['k']} | {runs[0]['steps_trained']} | "
                     f"{len(runs)} | {' / '.join(f'{a:.3f}' for a in accs)} | {statistics.fmean(accs):.3f} |")
    return "\n".join(lines) + "\n" if len(lines) > 2 else "(not run)\n"


def dtype_table(folder: Path) -> str:
    """Every demo task's test accuracy served in bf16 next to fp32 (`dtype-<dtype>.json`, two
    `taskserve eval --dtype D` reports over the same store and rows); a `dtype-bfloat16-<variant>.json`
    beside them (e.g. `bf16-logits`: a run before the LM head computed in fp32) is one more column."""
    base, default = folder / "dtype-float32.json", folder / "dtype-bfloat16.json"
    if not (base.exists() and default.exists()):
        return "(not run)\n"
    runs = {"bf16": default} | {f"bf16, {p.stem.removeprefix('dtype-bfloat16-')}": p for p in sorted(folder.glob("dtype-bfloat16-*.json"))}
    fp32 = json.loads(base.read_text())["served"]
    served = {name: json.loads(p.read_text())["served"] for name, p in runs.items()}
    head = " | ".join(f"{name} | {name} − fp32" for name in runs)
    lines = [f"| task | method | rows | fp32 | {head} |", "|---|---|---:|---:|" + "---:|---:|" * len(runs)]
    diffs: dict[str, list[tuple[float, int]]] = {name: [] for name in runs}  # (points, test rows) per task
    for task in sorted(fp32):
        for method in METHODS:
            a = fp32[task].get(method)
            cells = {name: s.get(task, {}).get(method) for name, s in served.items()}
            if a is None or any(b is None for b in cells.values()):
                continue
            row = [f"{task} | {method} | {a['n']} | {a['accuracy']:.3f}"]
            for name, b in cells.items():
                diff = points(b["accuracy"]) - points(a["accuracy"])  # as the table shows them
                diffs[name].append((diff, a["n"]))
                row.append(f"{b['accuracy']:.3f} | {diff:+.1f}")
            lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    for name, d in diffs.items():
        moved = [x for x, _ in d]  # points
        rows = [abs(x) * n / 100 for x, n in d]  # the accuracy change in test rows
        lines.append(f"- {name}: {len(d)} demo tasks; within one point: {sum(abs(x) <= 1.0 + 1e-9 for x in moved)}; within one test row: "
                     f"{sum(r <= 1.0 + 1e-6 for r in rows)}; largest difference {max(moved, key=abs):+.1f} points; mean {statistics.fmean(moved):+.2f} points; "
                     f"the changes add up to {round(sum(rows))} test rows (sum of |change|).")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    folder = Path((argv or sys.argv[1:] or ["docs/results"])[0])
    print("## Multi-task\n\n" + multitask_table(folder))
    print("## Few-shot jobs, default request\n\n" + default_jobs_table(folder))
    print("## Few-shot transfer\n\n" + few_shot_table(folder))
    print("## Soft-prompt learning rate\n\n" + lr_calibration_table(folder))
    print("## bf16 vs fp32 serving\n\n" + dtype_table(folder))
    print("## Few-shot jobs through the server\n\n" + jobs_table(folder))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
