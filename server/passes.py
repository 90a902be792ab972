"""Splitting a batch into first passes by the length its rows really run at.

One pass pads every row to its longest: a batch mixing 30-token rows whose soft prompt is cached
(prompt tuning, TPV) with rows that carry a 100-position instance prompt (ATTEMPT) computes ~130
positions for every row. Running the short rows and the long rows as two passes computes what each
needs, at the price of one more pass. `split_by_length` picks the cheapest split under a simple cost
model — a pass costs `overhead` (what one more pass costs, in token positions), plus that again for
each decode step it runs, plus its rows' real positions, plus its padding (rows × longest row − real
positions) at `padding` of a real position's cost — by dynamic programming over the rows sorted by
length (the best split of sorted rows is contiguous). No torch here: the engine hands it lengths.

`PADDED_POSITION_COST`: the engine computes a layer's products (attention projections, FFN) on the
real positions only (`ContextHooks`), so a position of padding still costs its attention scores and
elementwise work, not its matmuls — about a quarter of a real position (the products are ~3/4 of a
SmolLM2 layer's work on 2 CPU cores at these lengths). Measured on the demo mix (a 32-row batch over the 35 tasks,
fp32, 2 cores, medians of 6 interleaved): 4.01 s at 0.25 (passes of 16, 9 and 7 rows) against 4.14 s
charging padding in full (11, 9, 5, 5 and 2 rows) — 3%, inside this machine's noise, in the
direction the model gives (a second run: 4.04 against 4.20 s).

A cached past widens a pass too: a pass holding rows behind a cached soft prompt (P positions of
keys/values) runs its other rows' attention over those P columns as well, masked — scores computed
and thrown away, the past's copies made for them. `split_passes` therefore also weighs running each
width of past as passes of its own (`MASKED_PAST_KEY_COST`: what one masked past key costs one
query position, as a share of a real position). `python -m bench.pass_cost` measures it from 16 plain
rows beside 16 rows behind a cached 100-position prompt, one pass against two: 0.0059 (fp32, 2
AVX2 cores; one pass 6.67 s, two 5.20 s — the plain rows' own pass also needs no mask at all). On
the demo mix it parts [19, 9, 7] rows into [14, 14, 7] (past or not, ATTEMPT): 233 against 235 ms a
row over 24 interleaved rounds, no measurable change there (docs/performance.md).
"""

from __future__ import annotations

import math
from collections.abc import Sequence


PADDED_POSITION_COST = 0.25
MASKED_PAST_KEY_COST = 0.006  # per masked past key, per query position


def split_passes(lengths: Sequence[int], steps: Sequence[int], past: Sequence[int], overhead: float,
                 padding: float = 1.0, masked_key: float = 0.0) -> list[list[int]]:
    """`split_by_length` over all rows, or over the rows of each cached-past width apart, whichever
    `plan_cost` finds cheaper (ties: by length alone). `past[r]`: the cached
    positions row r attends to before its own (0: none); `masked_key`: what a row pays for each
    position of its pass's widest past that is not its own, per position of its own."""
    whole = split_by_length(lengths, steps, overhead, padding)
    widths = sorted(set(past))
    if len(widths) < 2 or masked_key <= 0:
        return whole
    apart = []
    for width in widths:
        rows = [r for r in range(len(lengths)) if past[r] == width]
        apart += [[rows[i] for i in p] for p in split_by_length([lengths[r] for r in rows], [steps[r] for r in rows], overhead, padding)]
    apart.sort(key=lambda p: max(lengths[r] for r in p))  # shortest first, as split_by_length's

    def cost(passes: list[list[int]]) -> float:
        return plan_cost(passes, lengths, steps, past, overhead, padding, masked_key)

    return apart if cost(apart) < cost(whole) else whole


def plan_cost(passes: list[list[int]], lengths: Sequence[int], steps: Sequence[int], past: Sequence[int], overhead: float,
              padding: float, masked_key: float) -> float:
    """The model, in positions: per pass (1 + its decode steps) × overhead + its real positions +
    `padding` × its padding + `masked_key` × each row's positions × the past columns it masks."""
    total = 0.0
    for p in passes:
        real = sum(lengths[r] for r in p)
        wide = max(past[r] for r in p)
        total += ((1 + max(steps[r] for r in p)) * overhead + real + padding * (len(p) * max(lengths[r] for r in p) - real)
                  + masked_key * sum(lengths[r] * (wide - past[r]) for r in p))
    return total


def split_by_length(lengths: Sequence[int], steps: Sequence[int], overhead: float, padding: float = 1.0) -> list[list[int]]:
    """Rows (indices into `lengths`) grouped into passes, each in index order, passes shortest first.
    `lengths[r]`: positions row r runs at in the first pass; `steps[r]`: decode steps it generates
    (0 for a classification row); `overhead`: one more pass (or decode step of it), in positions;
    `padding`: what a position of padding costs, as a share of a real one (in (0, 1])."""
    n = len(lengths)
    if n < 2 or padding * n * (max(lengths) - min(lengths)) <= overhead:  # no split can save what a pass costs
        return [list(range(n))]
    order = sorted(range(n), key=lengths.__getitem__)
    best = [0.0] + [math.inf] * n  # best[j]: cheapest passes for the j shortest rows
    cut = [0] * (n + 1)  # cut[j]: where the last of those passes starts
    real = [0] * (n + 1)  # real[j]: positions of the j shortest rows
    for j in range(1, n + 1):
        real[j] = real[j - 1] + lengths[order[j - 1]]
    for j in range(1, n + 1):
        longest, most_steps = lengths[order[j - 1]], 0
        for i in range(j - 1, -1, -1):  # the last pass holds sorted rows i..j-1
            most_steps = max(most_steps, steps[order[i]])
            positions = real[j] - real[i]
            cost = best[i] + (1 + most_steps) * overhead + positions + padding * ((j - i) * longest - positions)
            if cost <= best[j]:  # ties go to the larger pass: fewer passes
                best[j], cut[j] = cost, i
    passes, j = [], n
    while j > 0:
        passes.append(sorted(order[cut[j] : j]))
        j = cut[j]
    return passes[::-1]
