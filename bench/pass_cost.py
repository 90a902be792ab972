"""What one more forward pass costs, in token positions: the constant behind `pass_overhead_tokens`.

Times the engine's first pass (plain rows, 2-label rank classification, first-token scoring) at
several batch sizes B and lengths L on a backbone with random weights at the real shape, fits
time ≈ a + b · B · L by least squares over the medians, and reports a / b: the positions whose
compute equals a pass's fixed cost — what splitting a batch by length must save to pay for a pass.
Then the decision it drives, side by side: a batch of short rows with a few long ones (ATTEMPT's
100-position instance prompt) in one pass vs split by length. And what a cached past costs the rows
beside it that do not attend to it: 16 plain rows with 16 rows behind a cached 100-position prompt
(prompt tuning) in one pass vs as two, whose difference (plus one pass's overhead) divided by the
plain rows' positions × the past's width is `MASKED_PAST_KEY_COST`.

    python -m bench.pass_cost [--device cpu|cuda] [--dtype float32|bfloat16] [--shape smollm2|t5-base]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from bench.run import LABELS, PLAIN, PROMPT, RESULTS, TEMPLATE, ByteTokenizer, build, device_name, make_texts, timeit
from server.backbone import Backbone
from server.data.spec import TaskSpec
from server.engine import Engine, EngineConfig, Request, default_methods

GRID = [(1, 8), (1, 64), (4, 16), (4, 64), (8, 32), (16, 16), (16, 64), (32, 32)]  # (B, L)
SPEC = TaskSpec(template=TEMPLATE, labels=LABELS, scoring="first")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16")
    parser.add_argument("--shape", choices=("smollm2", "t5-base"), default="smollm2")
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args(argv)
    cuda, dtype = args.device == "cuda", getattr(torch, args.dtype)
    model, form = build(args.shape, args.device, dtype)
    backbone = Backbone.from_model(model, ByteTokenizer())
    engine = Engine(backbone, form, default_methods(backbone, form), EngineConfig(pass_overhead_tokens=0))  # run_each splits wherever padding is saved
    engine.tasks.add(engine.tasks.new("bare", PLAIN, SPEC))
    engine.tasks.add(engine.tasks.new("cached", PROMPT, SPEC))

    def rows(b: int, length: int, task: str = "bare") -> list[Request]:
        return [Request(task, t) for t in make_texts(b, length, seed=length)]  # byte tokenizer: `length` tokens

    with torch.inference_mode():
        times = timeit([lambda b=b, n=n: engine.run(rows(b, n)) for b, n in GRID], 2, args.reps, cuda)
        medians = [statistics.median(t) for t in times]
        positions = [b * max(map(len, engine.schedule(rows(b, n)).prompt_ids)) for b, n in GRID]  # the template's tokens included
        x = torch.tensor([[1.0, p] for p in positions], dtype=torch.float64)
        a, slope = torch.linalg.lstsq(x, torch.tensor(medians, dtype=torch.float64).unsqueeze(1)).solution.squeeze(1).tolist()
        # the decision: 28 short rows + 4 rows 100 positions longer, one pass vs split
        mixed = rows(28, 32) + rows(4, 132)
        one, two = (statistics.median(t) for t in timeit([lambda: engine.run(mixed), lambda: engine.run_each(mixed)], 2, args.reps, cuda))
        # a cached past beside rows without one: one pass vs a pass each
        plain, behind = rows(16, 32), rows(16, 32, "cached")
        together, apart = (statistics.median(t) for t in timeit([lambda: engine.run(plain + behind), lambda: (engine.run(plain), engine.run(behind))], 2, args.reps, cuda))
        width = engine.tasks.method(PROMPT).prefix_positions(engine.tasks["cached"])
        masked = ((together - apart) / slope + a / slope) / (sum(map(len, engine.schedule(plain).prompt_ids)) * width)
    res = {
        "shape": args.shape, "device": args.device, "device_name": device_name(args.device), "dtype": args.dtype,
        "grid": [{"batch": b, "text_tokens": n, "positions": p, "median_s": m, "times_s": t} for (b, n), p, m, t in zip(GRID, positions, medians, times)],
        "fit": {"pass_s": a, "per_position_s": slope, "pass_overhead_positions": a / slope},
        "mixed_28_short_4_long": {"one_pass_s": one, "split_s": two, "one_pass_over_split": one / two, "passes": len(engine.passes(engine.schedule(mixed)))},
        "cached_past_beside_16_plain_rows": {"one_pass_s": together, "two_passes_s": apart, "past_positions": width, "masked_past_key_cost": masked},
        "torch": torch.__version__, "reps": args.reps,
    }
    print(f"{args.shape} on {res['device_name']} ({args.dtype})")
    for (b, n), m, p in zip(GRID, medians, positions):
        print(f"  B={b:3d} L={n:3d}  {m * 1e3:8.1f} ms  (fit {(a + slope * p) * 1e3:8.1f})")
    print(f"  fit: a pass {a * 1e3:.1f} ms + {slope * 1e6:.1f} µs per position -> one pass costs {a / slope:.0f} positions")
    print(f"  28 rows of 32 + 4 rows of 132 text tokens: one pass {one * 1e3:.1f} ms, split by length {two * 1e3:.1f} ms -> {one / two:.2f}x")
    print(f"  16 plain rows + 16 behind a cached {width}-position past: one pass {together * 1e3:.1f} ms, two {apart * 1e3:.1f} ms"
          f" -> a masked past key costs a query position {masked:.4f} of a real position")
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"pass-cost-{args.shape}-{args.device}-{args.dtype}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(res, indent=2) + "\n")
    print(f"written: {path}")


if __name__ == "__main__":
    main()
