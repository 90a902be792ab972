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

METHODS = ("prompt_tuning", "tpv", "attempt", "ip", "pha")


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
        n = next(iter(runs.values()))["tasks"][tasks[0]]["test"]["n"]
        lines.append("")
        lines.append(f"Test rows per task: {n} (the first {n} of the seeded test split). Training: " + "; ".join(
            f"{m} {r['config']['steps']} steps × {r['config']['batch_size']} rows, {r['train_seconds']:.0f} s" for m, r in runs.items()) + ".")
    return head + "\n".join(lines) + "\n"


def few_shot_table(folder: Path) -> str:
    path = folder / "few-shot.json"
    if not path.exists():
        return "(not run)\n"
    report = json.loads(path.read_text())
    summary = report["few_shot_summary"]
    zero = report.get("zero_shot", {})
    ks = sorted({int(k) for per_task in summary.values() for per_method in per_task.values() for k in per_method})
    head = "| task | method | " + " | ".join(f"k={k}" for k in ks) + " |\n|---|---|" + "---:|" * len(ks) + "\n"
    lines = []
    for task, per_method in summary.items():
        if task in zero:
            lines.append(f"| {task} | zero-shot | " + " | ".join(f"{zero[task]['accuracy']:.3f}" for _ in ks) + " |")
        for method in METHODS:
            if method in per_method:
                cells = [f"{m:.3f} ± {s:.3f}" if (v := per_method[method].get(str(k))) and (m := v[0]) is not None and (s := v[1]) is not None else "–" for k in ks]
                lines.append(f"| {task} | {method} | " + " | ".join(cells) + " |")
    seeds = sorted({r["seed"] for r in report["few_shot"]})
    return head + "\n".join(lines) + f"\n\nSeeds: {seeds}; mean ± population std of test accuracy.\n"


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


def main(argv: list[str] | None = None) -> int:
    folder = Path((argv or sys.argv[1:] or ["docs/results"])[0])
    print("## Multi-task\n\n" + multitask_table(folder))
    print("## Few-shot transfer\n\n" + few_shot_table(folder))
    print("## Few-shot jobs through the server\n\n" + jobs_table(folder))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
