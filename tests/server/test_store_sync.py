"""Binding engines to a store: two Store handles on one root behave like two processes — publish
here, hot-load there; shared-module versions; refused artifacts never disturb other tasks."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from adapters_store import artifacts
from adapters_store.store import Store
from helpers import CLASSIFY, METHODS, make_engine
from server.engine import Request
from server.errors import Incompatible
from server.store_sync import attach, build_module, sync


def test_publish_sync_update_delete_and_corrupt(tmp_path: Path) -> None:
    trainer, server = make_engine("llama"), make_engine("llama")  # same seeds: same backbone fingerprint
    assert trainer.backbone.fingerprint == server.backbone.fingerprint
    writer, reader = Store(tmp_path), Store(tmp_path)
    attach(writer, trainer)  # publishes the built-in shared modules as v1
    a = trainer.tasks.new("a", "prompt_tuning", CLASSIFY, seed=1)
    b = trainer.tasks.new("b", "pha", CLASSIFY, seed=2)
    for task in (a, b):
        writer.publish(task, trainer.backbone.fingerprint, {"accuracy": 0.5})
        trainer.tasks.add(task)
    report = sync(reader, server)
    assert sorted(report.loaded) == ["a", "b"]
    for name in ("a", "b"):
        assert server.run([Request(name, "hi")])[0].scores == trainer.run([Request(name, "hi")])[0].scores
    assert sync(reader, server).loaded == []  # idempotent

    a2 = trainer.tasks.new("a", "prompt_tuning", CLASSIFY, seed=9, version=2)
    writer.publish(a2, trainer.backbone.fingerprint)
    assert sync(reader, server).loaded == ["a"] and server.tasks.loaded("a").task.version == 2

    # corrupt b's weights: b is marked failed and unloaded, a keeps serving unchanged
    before = server.run([Request("a", "hi")])[0].scores
    weights = artifacts.task_dir(tmp_path, "b", 1) / artifacts.WEIGHTS
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x00")
    server.tasks.remove("b")  # as after a restart: the server must load b again from disk
    report = sync(reader, server)
    assert "b" in report.failed and "b" not in server.tasks
    assert reader.registry.get_task("b")["status"] == "failed"
    assert server.run([Request("a", "hi")])[0].scores == before

    writer.registry.delete_task("a")
    assert sync(reader, server).removed == ["a"] and "a" not in server.tasks


def test_other_backbone_is_refused_without_harm(tmp_path: Path) -> None:
    engine = make_engine("llama")
    store = Store(tmp_path)
    attach(store, engine)
    task = engine.tasks.new("x", "tpv", CLASSIFY)
    store.publish(task, "some-other-backbone")
    report = sync(store, engine)
    assert "x" in report.failed and "backbone" in report.failed["x"] and not engine.tasks
    assert store.registry.get_task("x")["status"] == "failed"


def test_shared_modules_are_versioned_in_the_store_and_tasks_keep_theirs(tmp_path: Path) -> None:
    trainer = make_engine("llama")
    writer = Store(tmp_path)
    attach(writer, trainer)
    assert writer.registry.current_modules() == {m: 1 for m in (*METHODS, "plain")}
    old = trainer.tasks.new("old-ip", "ip", CLASSIFY, seed=3)
    writer.publish(old, trainer.backbone.fingerprint)
    trainer.tasks.add(old)
    want_old = trainer.run([Request("old-ip", "a fine film")])[0].scores

    retrained = copy.deepcopy(trainer.methods["ip"])  # what multi-task training would produce
    with torch.no_grad():
        for p in retrained.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    assert writer.publish_module(retrained, trainer.backbone.fingerprint, trainer.form_fingerprint) == 2
    sync(writer, trainer)
    assert trainer.tasks.versions["ip"] == 2
    new = trainer.tasks.new("new-ip", "ip", CLASSIFY, seed=3)
    assert new.module_version == 2
    writer.publish(new, trainer.backbone.fingerprint)

    fresh = make_engine("llama")  # another process starting on this store
    reader = Store(tmp_path)
    report = attach(reader, fresh)
    assert sorted(report.loaded) == ["new-ip", "old-ip"] and not report.failed
    assert fresh.tasks.versions["ip"] == 2 and fresh.tasks.has_module("ip", 1)
    got = fresh.run([Request("old-ip", "a fine film"), Request("new-ip", "a fine film")])
    assert got[0].scores == pytest.approx(want_old, abs=1e-6)
    assert got[1].scores != got[0].scores  # same per-task init, different shared nets

    stale = trainer.tasks.new("needs-v9", "ip", CLASSIFY)
    stale.module_version = 9
    with pytest.raises(Incompatible, match="module v9"):
        writer.publish(stale, trainer.backbone.fingerprint)


def test_shared_module_for_another_backbone_is_refused(tmp_path: Path) -> None:
    t5, llama = make_engine("t5"), make_engine("llama")
    store = Store(tmp_path)
    attach(store, t5)
    folder = artifacts.shared_dir(tmp_path, "attempt", 1)
    with pytest.raises(Incompatible, match="backbone"):
        build_module(folder, llama.dims, llama.backbone.fingerprint, llama.form_fingerprint)
    module = build_module(folder, t5.dims, t5.backbone.fingerprint, t5.form_fingerprint)
    assert all(torch.equal(a, b) for a, b in zip(module.state_dict().values(), t5.methods["attempt"].state_dict().values()))


def test_after_a_restart_a_task_whose_newest_version_failed_serves_its_last_good_one(tmp_path: Path) -> None:
    trainer = make_engine("llama")
    writer = Store(tmp_path)
    attach(writer, trainer)
    good = trainer.tasks.new("t", "prompt_tuning", CLASSIFY, seed=1)
    writer.publish(good, trainer.backbone.fingerprint)
    writer.publish(trainer.tasks.new("t", "prompt_tuning", CLASSIFY, seed=2, version=2), trainer.backbone.fingerprint)
    writer.publish(trainer.tasks.new("t", "prompt_tuning", CLASSIFY, seed=3, version=3), trainer.backbone.fingerprint)
    for version in (2, 3):  # both newer versions are corrupt on disk
        weights = artifacts.task_dir(tmp_path, "t", version) / artifacts.WEIGHTS
        weights.write_bytes(weights.read_bytes()[:-1] + b"\x00")
    trainer.tasks.add(good)
    want = trainer.run([Request("t", "hi")])[0].scores

    restarted = make_engine("llama")  # a fresh process: it never served any version of t
    report = attach(Store(tmp_path), restarted)
    assert "t" in report.failed and report.loaded == ["t"]
    assert restarted.tasks["t"].version == 1
    assert restarted.run([Request("t", "hi")])[0].scores == want
    row = writer.registry.get_task("t")
    assert row["status"] == "failed" and "v3" in row["error"] and row["current_version"] == 3  # the owner still sees what to fix
    second = make_engine("llama")  # restarted again, now that the registry already says failed
    assert attach(Store(tmp_path), second).loaded == ["t"] and second.tasks["t"].version == 1
    again = sync(Store(tmp_path), restarted)
    assert again.loaded == [] and again.failed == {} and restarted.tasks["t"].version == 1  # tried once, kept serving

    writer.publish(trainer.tasks.new("t", "prompt_tuning", CLASSIFY, seed=4, version=4), trainer.backbone.fingerprint)
    assert sync(Store(tmp_path), restarted).loaded == ["t"] and restarted.tasks["t"].version == 4
