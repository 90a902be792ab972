"""`taskserve worker`: runs the training jobs that `POST /v1/tasks` queues.

A worker claims the oldest queued job with a lease, trains the new task with its method's few-shot
recipe on its own engine (the server's engine never trains), publishes the task into the store —
from where every server hot-loads it — and records the job's end. While training it renews the
lease with its progress; a cancelled job stops at the next renewal. A worker that dies stops
renewing: once the lease expires the job is re-queued (resuming from its last checkpoint) or,
after `worker_max_attempts`, failed. Nothing is visible to clients until the atomic publish, so a
killed worker leaves no half-made task.

A registry that becomes unavailable stops nothing for good: training goes on while renewals fail
(the next one that gets through extends the lease, or says the job was lost to another worker);
a job that cannot be published or recorded is left to its lease — retried once it lapses, from its
checkpoint — and the worker waits for the registry instead of exiting.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

from adapters_store.store import Store
from server import creation
from server.creation import TaskCreate
from server.engine import Engine
from server.errors import Cancelled, TaskservError, Unavailable
from server.factory import build_engine
from server.settings import Settings
from server.store_sync import attach
from server.training.trainer import Progress

log = logging.getLogger("taskserve.worker")


class Worker:
    def __init__(self, settings: Settings, engine: Engine, store: Store, name: str | None = None, stop: threading.Event | None = None) -> None:
        self.settings, self.engine, self.store = settings, engine, store
        self.name = name or f"{socket.gethostname()}:{os.getpid()}"
        self._stop = stop or threading.Event()

    def stop(self) -> None:
        """Finish the current step's bookkeeping and exit the loop (SIGTERM)."""
        self._stop.set()

    def run_forever(self) -> None:
        attached = False  # a worker started while the registry is down waits for it, as one running does
        down = False  # logged when the registry stops answering and when it answers again
        while not self._stop.is_set():
            try:
                if not attached:
                    attach(self.store, self.engine)
                    attached = True
                    log.info("worker %s polling %s", self.name, self.store.root)
                ran = self.run_once()
            except Unavailable as exc:
                if not down:
                    log.error("worker %s: %s; waiting for it", self.name, exc.message)
                down, ran = True, False
            else:
                if down:
                    log.info("worker %s: the registry answers again", self.name)
                down = False
            if not ran:
                self._stop.wait(self.settings.worker_poll_s)

    def run_once(self) -> bool:
        """Claim and run one job; False if none was queued."""
        job = self.store.registry.claim_job(self.name, self.settings.worker_lease_s, self.settings.worker_max_attempts)
        if job is None:
            return False
        log.info("job %s (%s, attempt %d) started", job["id"], job["task"], job["attempts"])
        try:
            metrics = self._train_and_publish(job)
        except Cancelled:
            if self._stop.is_set():  # shutting down: the lease lapses and another run resumes from the checkpoint
                log.warning("worker stopping; job %s will be retried after its lease expires", job["id"])
            else:
                log.info("job %s cancelled", job["id"])
        except Unavailable as exc:  # nothing published, and its end cannot be recorded: the lease decides
            log.error("job %s: %s; it will be retried after its lease expires", job["id"], exc.message)
        except TaskservError as exc:
            log.error("job %s failed: %s", job["id"], exc.message)
            self._failed(job, exc.message)
        except Exception as exc:  # noqa: BLE001 - a job's bug must not kill the worker; the job records it
            log.exception("job %s failed", job["id"])
            self._failed(job, f"{type(exc).__name__}: {exc}")
        else:
            self.store.registry.finish_job(job["id"], self.name, "succeeded", metrics=metrics)
            shutil.rmtree(self._job_dir(job["id"]), ignore_errors=True)
            log.info("job %s succeeded: %s", job["id"], metrics.get("validation"))
        return True

    def _failed(self, job: dict[str, Any], error: str) -> None:
        """Record a job's failure; a failed job never resumes, so its checkpoints go (they can fill a disk)."""
        if self.store.registry.finish_job(job["id"], self.name, "failed", error=error):
            shutil.rmtree(self._job_dir(job["id"]), ignore_errors=True)

    def _train_and_publish(self, job: dict[str, Any]) -> dict[str, Any]:
        attach(self.store, self.engine)  # current shared modules and peers (TPV's and PHA's inits use them)
        accepted = creation.prepare(TaskCreate.model_validate(job["request"]), self.engine, self.settings)
        lease = _Lease(self, job["id"])
        task, metrics = creation.train_job(accepted, self.engine, on_progress=lease.progress, checkpoints=self._job_dir(job["id"]), should_stop=lease.cancelled,
                                             autocast=self.settings.resolved_train_autocast())
        if lease.cancelled():
            raise Cancelled("training was cancelled")
        task.version = self.store.next_version(task.name)
        self.store.publish(task, self.engine.backbone.fingerprint, metrics)
        return metrics

    def _job_dir(self, job_id: str) -> Path:
        return self.store.root / "jobs" / job_id


class _Lease:
    """Renews the job's lease with progress, at most every couple of seconds; remembers a cancel."""

    def __init__(self, worker: Worker, job_id: str) -> None:
        self.worker, self.job_id = worker, job_id
        self._last, self._status, self._failing = 0.0, "running", False
        self._interval = min(2.0, worker.settings.worker_lease_s / 4)

    def progress(self, phase: str, p: Progress) -> None:
        now = time.monotonic()
        if now - self._last < self._interval and p.step != p.total and p.metrics is None:
            return
        self._last = now
        payload = {"phase": phase, "step": p.step, "total": p.total, "loss": None if math.isnan(p.loss) else round(p.loss, 5), **(p.metrics or {})}
        try:
            self._status = self.worker.store.registry.renew_job(self.job_id, self.worker.name, self.worker.settings.worker_lease_s, payload)
        except Unavailable as exc:  # train on: the next renewal that gets through extends the lease or reports it lost
            if not self._failing:
                log.warning("job %s: lease not renewed, training on: %s", self.job_id, exc.message)
            self._failing = True
            return
        if self._failing:
            log.info("job %s: lease renewed again (%s)", self.job_id, self._status)
            self._failing = False

    def cancelled(self) -> bool:
        if self.worker._stop.is_set():
            return True
        return self._status in ("cancelled", "lost")


def main(settings: Settings | None = None) -> int:
    """Run a worker until SIGTERM / SIGINT."""
    settings = settings or Settings()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    lower_priority(settings.worker_nice)
    engine = build_engine(settings, training=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    store = _open_store(settings, stop)
    if store is None:
        return 0
    worker = Worker(settings, engine, store, stop=stop)  # the signals above stop it
    try:
        worker.run_forever()
    finally:
        store.close()
    return 0


def lower_priority(nice: int) -> None:
    """Run at niceness `nice` (never raised back: an unprivileged process cannot). On a CPU a worker
    beside the server otherwise competes with serving as an equal: two processes of busy-waiting torch
    threads on the same cores slow each other far more than sharing them evenly would."""
    now = os.nice(0)
    if nice > now:
        os.nice(nice - now)
    log.info("worker niceness %d", max(nice, now))


def _open_store(settings: Settings, stop: threading.Event) -> Store | None:
    """The store, once its registry answers (opening it creates the tables): a worker started during
    a registry outage waits instead of exiting into a restart loop. None if stopped meanwhile."""
    waiting = False
    while not stop.is_set():
        try:
            return Store(settings.store, settings.db_url)
        except Unavailable as exc:
            if not waiting:
                log.error("worker: %s; waiting for it", exc.message)
                waiting = True
            stop.wait(settings.worker_poll_s)
    return None
