"""Two Store handles on one root behave like two processes: publish here, hot-load there."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from adapters_store import artifacts, codec
from adapters_store.store import Store
from helpers import CLASSIFY, METHODS, make_engine
from server.engine import Request
from server.errors import Incompatible


def test_publish_sync_update_delete_and_corrupt(tmp_path: Path) -> None:
    trainer, server = make_engine("llama"), make_engine("llama")  # same seeds: same backbone fingerprint
    assert trainer.backbone.fingerprint == server.backbone.fingerprint
    writer, reader = Store(tmp_path), Store(tmp_path)
    writer.attach(trainer)  # publishes the built-in shared modules as v1
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
    store.attach(engine)
    task = engine.new_task("x", "tpv", CLASSIFY)
    store.publish(task, "some-other-backbone")
    report = store.sync(engine)
    assert "x" in report.failed and "backbone" in report.failed["x"] and not engine.tasks
    assert store.registry.get_task("x")["status"] == "failed"


def test_shared_modules_are_versioned_in_the_store_and_tasks_keep_theirs(tmp_path: Path) -> None:
    trainer = make_engine("llama")
    writer = Store(tmp_path)
    writer.attach(trainer)
    assert writer.registry.current_modules() == {m: 1 for m in METHODS}
    old = trainer.new_task("old-ip", "ip", CLASSIFY, seed=3)
    writer.publish(old, trainer.backbone.fingerprint)
    trainer.add_task(old)
    want_old = trainer.run([Request("old-ip", "a fine film")])[0].scores

    retrained = copy.deepcopy(trainer.methods["ip"])  # what multi-task training would produce
    with torch.no_grad():
        for p in retrained.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    assert writer.publish_module(trainer, "ip", retrained) == 2
    writer.sync(trainer)
    assert trainer.module_versions["ip"] == 2
    new = trainer.new_task("new-ip", "ip", CLASSIFY, seed=3)
    assert new.module_version == 2
    writer.publish(new, trainer.backbone.fingerprint)

    fresh = make_engine("llama")  # another process starting on this store
    reader = Store(tmp_path)
    report = reader.attach(fresh)
    assert sorted(report.loaded) == ["new-ip", "old-ip"] and not report.failed
    assert fresh.module_versions["ip"] == 2 and fresh.has_module("ip", 1)
    got = fresh.run([Request("old-ip", "a fine film"), Request("new-ip", "a fine film")])
    assert got[0].scores == pytest.approx(want_old, abs=1e-6)
    assert got[1].scores != got[0].scores  # same per-task init, different shared nets

    stale = trainer.new_task("needs-v9", "ip", CLASSIFY)
    stale.module_version = 9
    with pytest.raises(Incompatible, match="module v9"):
        writer.publish(stale, trainer.backbone.fingerprint)


def test_shared_module_for_another_backbone_is_refused(tmp_path: Path) -> None:
    t5, llama = make_engine("t5"), make_engine("llama")
    store = Store(tmp_path)
    store.attach(t5)
    folder = artifacts.shared_dir(tmp_path, "attempt", 1)
    with pytest.raises(Incompatible, match="backbone"):
        codec.load_module(folder, llama.dims, llama.backbone.fingerprint, llama.form_fingerprint)
    module = codec.load_module(folder, t5.dims, t5.backbone.fingerprint, t5.form_fingerprint)
    assert all(torch.equal(a, b) for a, b in zip(module.state_dict().values(), t5.methods["attempt"].state_dict().values()))


def test_export_then_seed_a_fresh_store(tmp_path: Path) -> None:
    trainer = make_engine("llama")
    source = Store(tmp_path / "source")
    source.attach(trainer)
    retrained = copy.deepcopy(trainer.methods["pha"])
    with torch.no_grad():
        retrained.head_up.weight.normal_()
    source.publish_module(trainer, "pha", retrained)
    source.sync(trainer)
    for name, method in (("demo-pha", "pha"), ("demo-pt", "prompt_tuning")):
        task = trainer.new_task(name, method, CLASSIFY, seed=4)
        source.publish(task, trainer.backbone.fingerprint, {"test": {"accuracy": 0.9}})
        trainer.add_task(task)
    copied = source.export(tmp_path / "seed")
    assert len(copied) == 4  # two tasks, pha v2 and prompt_tuning v1 (unused module versions stay behind)
    assert not (tmp_path / "seed" / "shared" / "pha" / "v1").exists()

    fresh = Store(tmp_path / "fresh")
    assert sorted(fresh.seed(tmp_path / "seed")) == ["demo-pha", "demo-pt", "pha@2", "prompt_tuning@1"]
    assert fresh.seed(tmp_path / "seed") == []  # only into a store without tasks
    server = make_engine("llama")
    report = fresh.attach(server)
    assert sorted(report.loaded) == ["demo-pha", "demo-pt"] and not report.failed
    for name in ("demo-pha", "demo-pt"):
        assert server.run([Request(name, "a fine film")])[0].scores == pytest.approx(trainer.run([Request(name, "a fine film")])[0].scores, abs=1e-6)

    weights = tmp_path / "seed" / "tasks" / "demo-pt" / "v1" / artifacts.WEIGHTS
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x01")
    with pytest.raises(artifacts.CorruptArtifact):
        Store(tmp_path / "other").import_from(tmp_path / "seed")
