"""The drills' harness: a real `taskserve serve` process (its own PostgreSQL database, a loopback
port, tiny random models saved as HF folders) with tasks of all five methods published into its
store by a second process's engine, as a deployment would see them.

Every drill runs at two scales: the fast one in `make test`, the full one in `make drills`
(TASKSERVE_DRILLS=full), whose figures each drill writes with `record` to build/drills/<drill>.json
(build/drills-fast/ at the fast scale); `tests/drills/report.py` (run by `make drills`) turns them into
the table of docs/reliability.md.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import httpx
import torch
from prometheus_client.parser import text_string_to_metric_families

from adapters_store.store import Store
from helpers import CLASSIFY, METHODS, perturb
from server.backbone import load_backbone, load_form_module
from server.engine import Engine
from server.store_sync import attach
from serving import ROOT, postgres_database, save_tiny_models, serve_process, stop_process, wait

FULL = os.environ.get("TASKSERVE_DRILLS") == "full"
FIGURES = ROOT / "build" / ("drills" if FULL else "drills-fast")  # `make test` never overwrites `make drills`' figures
KEY = "drill-key"


def scale(fast: int, full: int) -> int:
    """The fast count in `make test`, the full one in `make drills`."""
    return full if FULL else fast


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    return f"{model}, {os.cpu_count()} CPUs"


def record(drill: str, **figures) -> dict:
    """Write a drill's figures (what was tried, how many, what held) for docs/reliability.md."""
    entry = {"drill": drill, "scale": "full" if FULL else "fast", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine(), "figures": figures}
    FIGURES.mkdir(parents=True, exist_ok=True)
    (FIGURES / f"{drill}.json").write_text(json.dumps(entry, indent=2) + "\n")
    print(f"drill {drill}: {figures}")
    return entry


@dataclass
class Deployment:
    """A running server and a second process's handles on its store."""

    url: str
    root: Path
    proc: subprocess.Popen
    log: Path
    engine: Engine  # the publishing process's engine (tiny models, shared modules perturbed)
    writer: Store  # that process's handle on the server's store and registry
    env: dict[str, str]
    tasks: list[str] = field(default_factory=list)
    headers: dict[str, str] = field(default_factory=lambda: {"Authorization": f"Bearer {KEY}"})

    def metrics(self) -> dict[str, float]:
        """Every sample of /metrics by `name{label=value,...}` (labels sorted), e.g. `taskserve_queue_depth`."""
        samples = {}
        for family in text_string_to_metric_families(httpx.get(f"{self.url}/metrics", timeout=10).text):
            for s in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
                samples[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
        return samples

    def metric(self, name: str, **labels) -> float:
        """The sum of a metric's samples whose labels include `labels`."""
        total = 0.0
        for key, value in self.metrics().items():
            base, _, rest = key.partition("{")
            have = dict(item.split("=", 1) for item in rest.rstrip("}").split(",") if item)
            if base == name and all(have.get(k) == str(v) for k, v in labels.items()):
                total += value
        return total

    def rss_mb(self) -> float:
        """The server process's resident memory (MB)."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmRSS")

    def publish(self, per_method: int, prefix: str = "drill") -> list[str]:
        """per_method tasks of each of the five methods (distinct random per-task params), published
        by the second process; returns once the server serves all of them."""
        names = []
        for method in METHODS:
            for i in range(per_method):
                task = self.engine.tasks.new(f"{prefix}-{method}-{i}", method, CLASSIFY, seed=1000 + i)
                with torch.no_grad():
                    for p in task.params.values():
                        p.add_(torch.randn_like(p) * 0.1)
                self.writer.publish(task, self.engine.backbone.fingerprint)
                names.append(task.name)
        wait(lambda: all(httpx.get(f"{self.url}/v1/tasks/{n}", timeout=10).json().get("served") for n in names), f"{len(names)} tasks served", 120)
        self.tasks += names
        return names

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@contextlib.contextmanager
def deployment(root: Path, db_url: str | None = None, **env: str) -> Iterator[Deployment]:
    """A server with its own fresh PostgreSQL database (or db_url; the SQLite file in the store with
    db_url="sqlite"), TASKSERVE_* overrides in env, and the publishing process's handles."""
    models = save_tiny_models(root)
    with contextlib.ExitStack() as stack:
        url_db = None if db_url == "sqlite" else (db_url or stack.enter_context(postgres_database()))
        env = {**env, **({"TASKSERVE_DB_URL": url_db} if url_db else {})}
        proc, log, url = serve_process(root, models, {"TASKSERVE_API_KEY": KEY, "TASKSERVE_THREADS": "1", **env})
        try:
            other = perturb(Engine(load_backbone(models["backbone"]), load_form_module(models["form_module"])))
            writer = Store(root / "store", url_db)
            attach(writer, other)
            yield Deployment(url, root, proc, log, other, writer, env)
            writer.close()
        finally:
            stop_process(proc)
