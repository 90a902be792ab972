"""TPV arithmetic (seed 001 eqs 5-7) and origin safety."""

from __future__ import annotations

import pytest
import torch

from helpers import CLASSIFY, make_engine
from server.engine import Request
from server.errors import Incompatible
from server.methods.tpv import TaskVector, combine


def test_arithmetic_and_origin_checks() -> None:
    a, b = TaskVector("o", torch.ones(2, 3)), TaskVector("o", torch.full((2, 3), 2.0))
    assert torch.equal((a + b).tau, torch.full((2, 3), 3.0))
    assert torch.equal((a - b).tau, -torch.ones(2, 3))
    assert torch.equal((0.5 * b).tau, torch.ones(2, 3))
    assert torch.equal(combine([(a, 1.0), (b, -0.25)]).tau, torch.full((2, 3), 0.5))
    with pytest.raises(Incompatible):
        a + TaskVector("other", torch.ones(2, 3))
    with pytest.raises(Incompatible):
        a + TaskVector("o", torch.ones(3, 3))


def test_composed_task_serves_theta_init_plus_weighted_sum() -> None:
    engine = make_engine("llama")
    tpv = engine.methods["tpv"]
    tasks = []
    for i in range(2):
        task = engine.tasks.new(f"src-{i}", "tpv", CLASSIFY)
        with torch.no_grad():
            task.params["tau"].normal_(generator=torch.Generator().manual_seed(i))
        engine.tasks.add(task)
        tasks.append(task)
    weights = [(tpv.vector(tasks[0]), 1.0), (tpv.vector(tasks[1]), 0.5)]
    composed = engine.tasks.new("mix", "tpv", CLASSIFY, init={"vectors": weights})
    engine.tasks.add(composed)
    theta = tpv.theta_init(composed.meta["origin"])
    want = theta + tasks[0].params["tau"] + 0.5 * tasks[1].params["tau"]
    assert torch.allclose(engine.tasks.loaded("mix").static["prompt"], want)
    # the served prompt is exactly that prompt: the same output as a prompt_tuning task holding it
    engine.tasks.add(engine.tasks.new("pt", "prompt_tuning", CLASSIFY, init={"prompt": want.detach()}))
    a, b = engine.run([Request("mix", "nice"), Request("pt", "nice")])
    assert a.scores == pytest.approx(b.scores, abs=1e-6)


def test_refuses_vectors_from_another_origin() -> None:
    engine = make_engine("t5")
    tpv = engine.methods["tpv"]
    tpv.add_origin("family-b", torch.randn(tpv.config.n_virtual, engine.backbone.d_model))
    foreign = engine.tasks.new("b", "tpv", CLASSIFY, init={"origin": "family-b"})
    with pytest.raises(Incompatible):
        engine.tasks.new("mix", "tpv", CLASSIFY, init={"vectors": [(tpv.vector(foreign), 1.0)]})
    with pytest.raises(Incompatible):
        tpv.add_origin("family-b", torch.zeros(tpv.config.n_virtual, engine.backbone.d_model))
