"""Artifacts: atomic publish, checksum on load, crash safety, task round trip."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from adapters_store import artifacts, codec
from helpers import CLASSIFY, make_engine
from server.engine import Request
from server.errors import Conflict, Incompatible


def test_publish_load_round_trip_and_idempotence(tmp_path: Path) -> None:
    tensors = {"prompt": torch.randn(3, 4)}
    target = artifacts.task_dir(tmp_path, "t", 1)
    manifest = artifacts.publish(target, tensors, {"name": "t"})
    loaded, read = artifacts.load(target)
    assert torch.equal(loaded["prompt"], tensors["prompt"]) and read == manifest
    assert manifest["sha256"] == artifacts.sha256_file(target / artifacts.WEIGHTS)
    assert artifacts.publish(target, tensors, {"name": "t"})["sha256"] == manifest["sha256"]  # idempotent
    with pytest.raises(Conflict):
        artifacts.publish(target, {"prompt": torch.zeros(3, 4)}, {"name": "t"})
    assert [p.name for p in target.parent.iterdir()] == ["v1"]  # no temp folders left behind


def test_corrupt_weights_are_refused(tmp_path: Path) -> None:
    target = artifacts.task_dir(tmp_path, "t", 1)
    artifacts.publish(target, {"x": torch.ones(8)}, {})
    data = bytearray((target / artifacts.WEIGHTS).read_bytes())
    data[-1] ^= 0xFF
    (target / artifacts.WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(artifacts.CorruptArtifact):
        artifacts.load(target)


def test_crash_between_write_and_rename_leaves_no_version(tmp_path: Path) -> None:
    """A publisher process that dies right before the rename leaves only a temp folder."""
    script = textwrap.dedent(f"""
        import os, torch
        from adapters_store import artifacts
        os.rename = lambda *args: os._exit(9)  # the process dies exactly between write and rename
        artifacts.publish(artifacts.task_dir({str(tmp_path)!r}, "t", 1), {{"x": torch.ones(1000)}}, {{}})
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).parents[2])
    assert proc.returncode == 9
    target = artifacts.task_dir(tmp_path, "t", 1)
    assert not target.exists()
    assert len(list(target.parent.glob(".tmp-*"))) == 1
    assert artifacts.sweep_temp(tmp_path) == 1 and not list(target.parent.iterdir())


def test_task_round_trip_serves_identically(tmp_path: Path) -> None:
    engine = make_engine("llama")
    for method in ("prompt_tuning", "tpv", "attempt", "ip", "pha"):
        task = engine.tasks.new(f"{method}-a", method, CLASSIFY, seed=3, init={"copy_nets": True} if method == "ip" else None)
        engine.tasks.add(task)
        want = engine.run([Request(task.name, "so good")])[0]
        codec.publish_task(tmp_path, task, engine.backbone.fingerprint, {"accuracy": 0.5})
        restored = codec.load_task(artifacts.task_dir(tmp_path, task.name, 1), engine.backbone.fingerprint)
        assert restored.spec == task.spec and restored.meta == task.meta
        engine.tasks.remove(task.name)
        engine.tasks.add(restored)
        assert engine.run([Request(task.name, "so good")])[0].scores == want.scores
        with pytest.raises(Incompatible):
            codec.load_task(artifacts.task_dir(tmp_path, task.name, 1), "another-backbone")
