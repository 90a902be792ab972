"""Two Store handles on one root behave like two processes: publish here, hot-load there."""

from __future__ import annotations

from pathlib import Path

from adapters_store import artifacts
from adapters_store.store import Store
from helpers import CLASSIFY, make_engine
from server.engine import Request


def test_publish_sync_update_delete_and_corrupt(tmp_path: Path) -> None:
    trainer, server = make_engine("llama"), make_engine("llama")  # same seeds: same backbone fingerprint
    assert trainer.backbone.fingerprint == server.backbone.fingerprint
    writer, reader = Store(tmp_path), Store(tmp_path)
    a = trainer.new_task("a", "prompt_tuning", CLASSIFY, seed=1)
    b = trainer.new_task("b", "pha", CLASSIFY, seed=2)
    for task in (a, b):
        writer.publish(task, trainer.backbone.fingerprint, {"accuracy": 0.5})
        trainer.add_task(task)
    report = reader.sync(server)
    assert sorted(report.loaded) == ["a", "b"]
    for name in ("a", "b"):
        assert server.run([Request(name, "hi")])[0].scores == trainer.run([Request(name, "hi")])[0].scores
    assert reader.sync(server).loaded == []  # idempotent

    a2 = trainer.new_task("a", "prompt_tuning", CLASSIFY, seed=9, version=2)
    writer.publish(a2, trainer.backbone.fingerprint)
    assert reader.sync(server).loaded == ["a"] and server.loaded("a").task.version == 2

    # corrupt b's weights: b is marked failed and unloaded, a keeps serving unchanged
    before = server.run([Request("a", "hi")])[0].scores
    weights = artifacts.task_dir(tmp_path, "b", 1) / artifacts.WEIGHTS
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x00")
    server.remove_task("b")  # as after a restart: the server must load b again from disk
    report = reader.sync(server)
    assert "b" in report.failed and "b" not in server.tasks
    assert reader.registry.get_task("b")["status"] == "failed"
    assert server.run([Request("a", "hi")])[0].scores == before

    writer.registry.delete_task("a")
    assert reader.sync(server).removed == ["a"] and "a" not in server.tasks


def test_other_backbone_is_refused_without_harm(tmp_path: Path) -> None:
    engine = make_engine("llama")
    store = Store(tmp_path)
    task = engine.new_task("x", "tpv", CLASSIFY)
    store.publish(task, "some-other-backbone")
    report = store.sync(engine)
    assert "x" in report.failed and "backbone" in report.failed["x"] and not engine.tasks
    assert store.registry.get_task("x")["status"] == "failed"
