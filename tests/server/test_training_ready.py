"""Training-readiness: gradients reach method and task parameters only; the backbone is untouched."""

from __future__ import annotations

import hashlib

import pytest
import torch

from helpers import CLASSIFY, METHODS, make_engine
from server.data.spec import TaskSpec
from server.engine import Example


def checksum(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


@pytest.mark.parametrize("kind", ["t5", "llama"])
def test_only_method_parameters_get_gradients(kind: str) -> None:
    engine = make_engine(kind)
    gen_spec = TaskSpec(template="Q: {text}\nA:", description="Answer:")
    tasks = []
    for method in METHODS:
        for i, spec in enumerate((CLASSIFY, gen_spec)):
            task = engine.tasks.new(f"{method}-{i}", method, spec, seed=i, init={"copy_nets": True} if method == "ip" and i else None)
            engine.tasks.add(task)
            tasks.append(task)
    if "sources" in dict(engine.methods["attempt"].named_parameters()):
        engine.methods["attempt"].sources.requires_grad_(True)  # the source stage trains them
    before = checksum(engine.backbone.model)
    trainable = list(engine.methods.parameters()) + [p for t in tasks for p in t.params.values()]
    trainable = [p for p in trainable if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    examples = [Example(t.name, "a fine film", " positive" if t.spec.labels else " the answer") for t in tasks]
    out = engine.loss(examples)
    assert out["aux"] > 0  # PHA's retriever + prototype losses are part of the total
    out["loss"].backward()
    assert all(p.grad is None for p in engine.backbone.model.parameters())
    for task in tasks:
        for name, p in task.params.items():
            assert p.grad is not None and p.grad.abs().sum() > 0, (task.name, name)
    for method in METHODS:
        got = [n for n, p in engine.methods[method].named_parameters() if p.requires_grad and (p.grad is None or p.grad.abs().sum() == 0)]
        assert not got, (method, got)
    optimizer.step()
    assert checksum(engine.backbone.model) == before


@pytest.mark.parametrize("kind", ["t5", "llama"])
def test_training_steps_move_the_served_label(kind: str) -> None:
    """The training path learns and serving sees it: after a few steps on one label, the soft
    prompt's task gives that label a clearly higher probability than before."""
    from server.engine import Request

    engine = make_engine(kind)
    spec = TaskSpec(template="{text} ->", labels=("yes", "no"), scoring="mean")  # scored as training optimises it: the whole label
    task = engine.tasks.new("pt", "prompt_tuning", spec)
    engine.tasks.add(task)
    texts = ("good", "fine", "great")
    target = "no"
    before = [engine.run([Request("pt", t)])[0].scores[target] for t in texts]
    optimizer = torch.optim.Adam(task.params.values(), lr=0.1)
    losses = []
    for _ in range(20):
        optimizer.zero_grad()
        loss = engine.loss([Example("pt", t, target) for t in texts])["loss"]
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    engine.tasks.add(task)  # re-adding refreshes the cached static tensors (a new version in the store)
    assert losses[-1] < losses[0]
    after = engine.run([Request("pt", t) for t in texts])
    for b, a in zip(before, after):
        assert a.label == target and a.scores[target] > b + 0.1
