"""PHA: generated adapters are per task and cached; eq 10 retrieval; losses (eqs 3-6, 9)."""

from __future__ import annotations

import torch

from helpers import CLASSIFY, make_engine
from server.engine import Example


def test_retrieval_picks_the_prototype_of_the_examples_task() -> None:
    engine = make_engine("t5")
    pha = engine.methods["pha"]
    features = torch.randn(6, engine.backbone.d_model)
    with torch.no_grad():
        z = pha.retrieval_vectors(features).mean(0)
    prototypes = torch.stack([-z, torch.randn_like(z), z * 3.0, torch.randn_like(z)])
    assert pha.retrieve(features, prototypes) == 2


def test_static_adapters_are_a_function_of_the_prototype_only() -> None:
    engine = make_engine("llama")
    a = engine.tasks.new("a", "pha", CLASSIFY, seed=1)
    b = engine.tasks.new("b", "pha", CLASSIFY, seed=2)
    same = engine.tasks.new("c", "pha", CLASSIFY, init={"prototype": a.params["prototype"].detach()})
    pha = engine.methods["pha"]
    with torch.no_grad():
        sa, sb, sc = pha.static(a), pha.static(b), pha.static(same)
    n = engine.dims.n_decoder_ffns
    assert sa["down"].shape == (n, engine.backbone.d_model, pha.config.bottleneck)
    assert torch.equal(sa["up"], sc["up"]) and not torch.equal(sa["up"], sb["up"])


def test_contrastive_losses_pull_rows_to_their_prototype() -> None:
    """A few steps on λ(L_IR + L_Pro) raise each row's similarity to its own task's prototype."""
    engine = make_engine("llama")
    tasks = [engine.tasks.new(f"t{i}", "pha", CLASSIFY, seed=i) for i in range(2)]
    for t in tasks:
        engine.tasks.add(t)
    texts = {"t0": ["good film", "great film", "nice film"], "t1": ["2+2=4?", "3+3=7?", "1+1=2?"]}
    examples = [Example(name, text, " positive") for name, batch in texts.items() for text in batch]
    pha = engine.methods["pha"]
    params = list(pha.retriever.parameters()) + [t.params["prototype"] for t in tasks]
    optimizer = torch.optim.Adam(params, lr=0.01)
    auxes = []
    for _ in range(40):
        optimizer.zero_grad()
        out = engine.loss(examples)
        out["aux"].backward()
        optimizer.step()
        auxes.append(float(out["aux"].detach()))
    assert auxes[-1] < 0.5 * auxes[0]
