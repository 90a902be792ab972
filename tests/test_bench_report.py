"""bench.report's few-shot acceptance checks compare what the table prints (points), not float noise."""

import json

from bench.report import METHODS, default_jobs_table, dtype_table


def write_jobs(folder, baseline, accuracies):
    method = METHODS[0]  # any trainable method: the checks do not depend on which
    records = [{"task": "held-out", "method": "ip zero-shot", "k": 0, "seed": None, "test": {"accuracy": baseline}, "metrics": {}}]
    records += [{"task": "held-out", "method": method, "k": 32, "seed": seed, "test": {"accuracy": acc}, "metrics": {"chosen": "step 10"}}
                for seed, acc in enumerate(accuracies)]
    (folder / "jobs-default.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return method


def checks_row(table, method):
    row = next(line for line in table.splitlines() if f"| {method} | 32 |" in line)
    return [cell.strip() for cell in row.strip("|").split("|")][-3:]  # mean ≥ base+5, min ≥ base, spread ≤ 4


def test_a_spread_of_exactly_four_points_meets_the_criterion(tmp_path):
    method = write_jobs(tmp_path, 0.47, [0.90, 0.93, 0.89])  # spread 4.0 points, 0.04000000000000004 in floats
    assert checks_row(default_jobs_table(tmp_path), method) == ["yes", "yes", "yes"]


def test_a_spread_over_four_points_and_a_seed_below_the_baseline_fail(tmp_path):
    method = write_jobs(tmp_path, 0.60, [0.59, 0.90, 0.90])  # mean 0.797 ≥ 0.65; min 0.59 < 0.60; spread 31 points
    assert checks_row(default_jobs_table(tmp_path), method) == ["yes", "**no**", "**no**"]


def test_a_mean_exactly_five_points_above_the_baseline_meets_the_criterion(tmp_path):
    method = write_jobs(tmp_path, 0.55, [0.60, 0.60, 0.60])  # 0.55 + 0.05 is 0.6000000000000001 in floats
    assert checks_row(default_jobs_table(tmp_path), method) == ["yes", "yes", "yes"]


def test_the_table_says_how_many_steps_a_final_fit_trained_where_it_differs_from_the_chosen_step(tmp_path):
    method = write_jobs(tmp_path, 0.47, [0.90, 0.93, 0.89])
    records = [json.loads(line) for line in (tmp_path / "jobs-default.jsonl").read_text().splitlines()]
    records[1]["metrics"]["steps_trained"] = 20  # step 10 on 16 rows per fold → 20 steps on all 32
    records[2]["metrics"]["steps_trained"] = 10  # a final fit of exactly the chosen steps (the earlier rule's records)
    (tmp_path / "jobs-default.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    row = next(line for line in default_jobs_table(tmp_path).splitlines() if f"| {method} | 32 |" in line)
    assert "| step 10 → 20, step 10, step 10 |" in row


def test_the_dtype_table_counts_points_and_test_rows_for_every_bf16_run(tmp_path):
    """Two tasks of 98 and 200 rows: one row of 98 is 1.02 points (outside one point, inside one
    row); two rows of 200 are 1.0 point (inside one point, outside one row)."""
    def write(name, small, large):
        served = {"small": {METHODS[0]: {"accuracy": small, "n": 98}}, "large": {METHODS[0]: {"accuracy": large, "n": 200}}}
        (tmp_path / f"dtype-{name}.json").write_text(json.dumps({"served": served}))

    write("float32", 50 / 98, 0.500)
    write("bfloat16", 49 / 98, 0.510)
    write("bfloat16-before", 50 / 98, 0.500)
    summary = [line for line in dtype_table(tmp_path).splitlines() if line.startswith("- ")]
    assert summary[0].startswith("- bf16: 2 demo tasks; within one point: 1; within one test row: 1; largest difference -1.0 points")
    assert "the changes add up to 3 test rows (sum of |change|)" in summary[0]
    assert summary[1].startswith("- bf16, before: 2 demo tasks; within one point: 2; within one test row: 2;")
