"""Store seeds: export ready tasks and the shared modules they use, import them into a fresh store."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from adapters_store import artifacts
from adapters_store.store import Store
from helpers import CLASSIFY, make_engine
from server.engine import Request
from server.store_sync import attach, sync


def test_export_then_seed_a_fresh_store(tmp_path: Path) -> None:
    trainer = make_engine("llama")
    source = Store(tmp_path / "source")
    attach(source, trainer)
    retrained = copy.deepcopy(trainer.methods["pha"])
    with torch.no_grad():
        retrained.head_up.weight.normal_()
    source.publish_module(retrained, trainer.backbone.fingerprint, trainer.form_fingerprint)
    sync(source, trainer)
    for name, method in (("demo-pha", "pha"), ("demo-pt", "prompt_tuning")):
        task = trainer.tasks.new(name, method, CLASSIFY, seed=4)
        source.publish(task, trainer.backbone.fingerprint, {"test": {"accuracy": 0.9}})
        trainer.tasks.add(task)
    copied = source.export(tmp_path / "seed")
    assert len(copied) == 4  # two tasks, pha v2 and prompt_tuning v1 (unused module versions stay behind)
    assert not (tmp_path / "seed" / "shared" / "pha" / "v1").exists()

    fresh = Store(tmp_path / "fresh")
    assert sorted(fresh.seed(tmp_path / "seed")) == ["demo-pha", "demo-pt", "pha@2", "prompt_tuning@1"]
    assert fresh.seed(tmp_path / "seed") == []  # only into a store without tasks
    server = make_engine("llama")
    report = attach(fresh, server)
    assert sorted(report.loaded) == ["demo-pha", "demo-pt"] and not report.failed
    for name in ("demo-pha", "demo-pt"):
        assert server.run([Request(name, "a fine film")])[0].scores == pytest.approx(trainer.run([Request(name, "a fine film")])[0].scores, abs=1e-6)

    weights = tmp_path / "seed" / "tasks" / "demo-pt" / "v1" / artifacts.WEIGHTS
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x01")
    with pytest.raises(artifacts.CorruptArtifact):
        Store(tmp_path / "other").import_from(tmp_path / "seed")
