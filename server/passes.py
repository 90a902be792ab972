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
"""

from __future__ import annotations

import math
from collections.abc import Sequence


PADDED_POSITION_COST = 0.25


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
