"""The engine on CUDA (marker `gpu`; skipped without a GPU): batch invariance in fp32 and bf16."""

from __future__ import annotations

import pytest
import torch

from helpers import add_tasks, make_engine
from server.engine import Request

pytestmark = pytest.mark.gpu
TEXTS = ["a great movie", "awful", "meh, it was long and boring but fine in the end", "x", "not bad at all, really"]


@pytest.mark.parametrize("kind", ["t5", "llama"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)], ids=["fp32", "bf16"])
def test_cuda_batch_invariance_all_methods(kind: str, dtype: torch.dtype, tol: float) -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    engine = make_engine(kind, device="cuda", dtype=dtype)
    names = add_tasks(engine)
    requests = [Request(n, TEXTS[i % len(TEXTS)]) for i, n in enumerate(names * 3)]
    batch = engine.run(requests)
    for request, got in zip(requests, batch):
        solo = engine.run([request])[0]
        for label, p in solo.scores.items():
            assert got.scores[label] == pytest.approx(p, abs=tol)
