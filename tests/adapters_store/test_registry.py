"""The registry on SQLite and on a real PostgreSQL server (a fresh database per run)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from adapters_store.registry import Registry
from serving import postgres_database
from server.errors import Conflict, InvalidRequest, NotFound

@pytest.fixture(params=["sqlite", "postgres"])
def registry(request, tmp_path: Path) -> Iterator[Registry]:
    if request.param == "sqlite":
        reg = Registry(f"sqlite:///{tmp_path / 'registry.db'}")
        yield reg
        reg.close()
        return
    with postgres_database() as url:
        reg = Registry(url)
        yield reg
        reg.close()


def test_versions_flip_in_one_step(registry: Registry) -> None:
    assert registry.next_version("sent") == 1
    registry.publish_version("sent", "ip", 1, "tasks/sent/v1", "a" * 64)
    registry.publish_version("sent", "ip", 2, "tasks/sent/v2", "b" * 64)
    task = registry.get_task("sent")
    assert (task["current_version"], task["status"], task["current"]["path"]) == (2, "ready", "tasks/sent/v2")
    assert registry.next_version("sent") == 3
    registry.publish_version("sent", "ip", 2, "tasks/sent/v2", "b" * 64)  # idempotent
    with pytest.raises(Conflict):
        registry.publish_version("sent", "pha", 3, "x", "c" * 64)
    assert [t["name"] for t in registry.list_tasks()] == ["sent"]


def test_reserve_conflict_fail_and_delete(registry: Registry) -> None:
    registry.reserve("new", "pha")
    with pytest.raises(Conflict):
        registry.reserve("new", "pha")
    registry.mark_failed("new", "corrupt weights")
    assert registry.get_task("new")["status"] == "failed"
    registry.delete_task("new")
    with pytest.raises(NotFound):
        registry.get_task("new")
    with pytest.raises(NotFound):
        registry.delete_task("new")
    with pytest.raises(InvalidRequest):
        registry.reserve("../etc", "pha")


def test_job_lifecycle(registry: Registry) -> None:
    job = registry.create_job("t", {"examples": 32})
    assert job["status"] == "queued" and job["request"] == {"examples": 32}
    registry.update_job(job["id"], status="running", progress={"step": 3, "total": 10})
    got = registry.update_job(job["id"], status="succeeded", metrics={"accuracy": 0.9})
    assert got["progress"] == {"step": 3, "total": 10} and got["metrics"] == {"accuracy": 0.9}
    assert registry.get_job(job["id"])["status"] == "succeeded"
    with pytest.raises(ValueError):
        registry.update_job(job["id"], status="exploded")
    with pytest.raises(NotFound):
        registry.get_job("missing")
