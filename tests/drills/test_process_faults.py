"""Drills 11 and 13–16: what the processes around a serving `taskserve serve` do to it — SIGTERM
with rows in flight, the registry going away (PostgreSQL unreachable or hanging; the SQLite file
turned read-only), the store's disk filling mid-publish, the training worker losing its registry or
its disk mid-job, and a soak of create/delete cycles under mixed traffic.

Faults are made for real, never mocked: PostgreSQL is reached through a TCP forwarder of this file
(`Proxy`) that the drill cuts and restores, or makes hang — the shared server keeps running; the
SQLite registry's files are made immutable with `chattr +i` (root ignores file modes, and a
read-only remount of a folder whose files are open for writing is refused with EBUSY); the store is
a small tmpfs mounted for the drill and filled to the page. The SIGTERM drill holds rows inside the engine's forward with
a method of its own (`HOLD_PLUGIN`, written next to the deployment and loaded with TASKSERVE_PLUGINS,
as any plugin method is): its rows wait in the forward while a file exists.

What tests/server/api/test_lifecycle.py::test_sigterm_completes_in_flight_requests proves already
(rows queued in the batcher at SIGTERM complete) is not repeated; what test_worker.py's
test_kill_9_mid_job_leaves_no_task_and_the_job_is_retried proves (a worker killed -9 mid-job leaves
no task and the job is retried from its checkpoint) neither.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
from harness import CLASSIFY, Deployment, deployment, record, scale
from sqlalchemy.engine import make_url

from adapters_store.store import Store
from server.errors import Unavailable
from server.settings import Settings
from serving import ROOT, postgres_database, stop_process, wait

SYNC_S = 0.5  # the sync interval of these deployments; recovery is asserted within a few of them
RECOVERY_INTERVALS = 10
DRAIN_TIMEOUT_S = Settings.model_fields["drain_timeout_s"].default  # SIGTERM to exit, at most
ROWS = [(f"{'aaaa' if i % 2 else 'zzzz'} film {i}", "positive" if i % 2 else "negative") for i in range(24)]


class Proxy:
    """A TCP forwarder from a loopback port to `target`: `cut()` drops every connection through it
    and refuses new ones (as a registry that went away does), `restore()` listens again; `hang()`
    keeps every connection open but forwards nothing (a registry that hangs), `release()` resumes."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target, self.cuts = target, 0
        self._flowing = threading.Event()
        self._flowing.set()
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        self.port = probe.getsockname()[1]
        probe.close()
        self.restore()

    def restore(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(128)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        self.cuts += 1
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() (close alone does not)
        self._listener.close()
        with self._lock:
            live = list(self._open)
        for sock in live:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def hang(self) -> None:
        self._flowing.clear()

    def release(self) -> None:
        self._flowing.set()

    def close(self) -> None:
        self.release()
        self.cut()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._open |= {client, upstream}
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                self._flowing.wait()
                b.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (a, b):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            with self._lock:
                self._open -= {a, b}


# ---- helpers --------------------------------------------------------------------------------


def error_type(response: httpx.Response) -> str | None:
    try:
        return response.json()["error"]["type"]
    except (ValueError, KeyError, TypeError):
        return None


def answers(d: Deployment, tasks: list[str], text: str = "a fine film") -> dict[str, tuple[int, object]]:
    """Each task's (status, label and scores) for one row."""
    out = {}
    with httpx.Client(base_url=d.url, timeout=60) as client:
        for name in tasks:
            r = client.post("/v1/predict", json={"task": name, "text": text})
            out[name] = (r.status_code, (r.json()["label"], r.json()["scores"]) if r.status_code == 200 else error_type(r))
    return out


def zero_shot(name: str) -> dict:
    """A task `POST /v1/tasks` makes at once (IP from its description): 201, published and served."""
    return {"name": name, "method": "ip", "description": "Tell me the sentiment of the review:", "labels": ["negative", "positive"], "scoring": "sum"}


def training(name: str, steps: int, folds: int = 0) -> dict:
    """A few-shot training job (202); the first character decides the label."""
    return {"name": name, "method": "prompt_tuning", "labels": ["negative", "positive"], "template": "Review: {text}\nSentiment: ", "scoring": "first",
            "examples": [{"text": t, "label": label} for t, label in ROWS], "train": {"steps": steps, "batch_size": 8, "folds": folds}}


def served(d: Deployment, name: str) -> bool:
    r = httpx.get(f"{d.url}/v1/tasks/{name}", timeout=10)
    return r.status_code == 200 and bool(r.json().get("served"))


def children(pid: int) -> set[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return {int(p) for p in path.read_text().split()} if path.exists() else set()


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def leftovers(store: Path) -> list[str]:
    """Temporary folders or files a writer left in the store (atomic publishes leave none)."""
    return sorted(str(p.relative_to(store)) for p in store.rglob("*") if p.name.startswith(".") and "tmp" in p.name)


@contextlib.contextmanager
def proxied_postgres() -> Iterator[tuple[Proxy, str, str]]:
    """A fresh database, a proxy in front of its server; yields (proxy, URL through it, direct URL)."""
    with postgres_database() as url:
        parsed = make_url(url)
        proxy = Proxy((parsed.host or "127.0.0.1", parsed.port or 5432))
        try:
            yield proxy, parsed.set(port=proxy.port).render_as_string(hide_password=False), url
        finally:
            proxy.close()


@contextlib.contextmanager
def tmpfs(folder: Path, size_mb: int) -> Iterator[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m,mode=0755", "tmpfs", str(folder)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or done.returncode}): the disk-full drill needs one")
    try:
        yield folder
    finally:
        if subprocess.run(["umount", str(folder)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(folder)], capture_output=True)  # a process still holds it: detach


class Filler:
    """Fills a filesystem to the page with one file, then frees exactly what a drill asks for."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / "filler.bin"
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        chunk = b"\0" * (1 << 16)
        self.size = 0
        while True:
            try:
                self.size += os.write(self.fd, chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
                break
        while True:  # the last pages, a page at a time
            try:
                self.size += os.write(self.fd, chunk[:4096])
            except OSError:
                break

    @staticmethod
    def free(folder: Path) -> int:
        st = os.statvfs(folder)
        return st.f_bavail * st.f_frsize

    def leave(self, nbytes: int) -> int:
        """Leave about `nbytes` free (in whole pages); returns what is free."""
        os.ftruncate(self.fd, max(0, self.size - nbytes))
        self.size = max(0, self.size - nbytes)
        return self.free(self.path.parent)

    def refill(self) -> None:
        os.lseek(self.fd, self.size, os.SEEK_SET)
        while True:
            try:
                self.size += os.write(self.fd, b"\0" * 4096)
            except OSError:
                return

    def close(self) -> None:
        os.close(self.fd)
        self.path.unlink(missing_ok=True)


@contextlib.contextmanager
def immutable(paths: list[Path]) -> Iterator[None]:
    """The files can be neither written nor replaced, even by root (ext4's immutable attribute)."""
    done = subprocess.run(["chattr", "+i", *map(str, paths)], capture_output=True, text=True)
    if done.returncode != 0:
        subprocess.run(["chattr", "-i", *map(str, paths)], capture_output=True)
        pytest.skip(f"chattr +i is not possible here ({done.stderr.strip()}): the read-only SQLite drill needs it")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", *map(str, paths)], check=True)


def new_task(d: Deployment, name: str, method: str = "prompt_tuning", seed: int = 7):
    task = d.engine.tasks.new(name, method, CLASSIFY, seed=seed)
    with torch.no_grad():
        for p in task.params.values():
            p.add_(torch.randn_like(p) * 0.1)
    return task


# ---- the drills' shared parts ------------------------------------------------------------


def registry_outage(d: Deployment, cut, restore, other: Store, label: str, *, writes_refused_only: bool = False) -> dict:
    """Shared by both registries: with the registry cut off, loaded tasks answer as before, changes
    are refused with 503 `unavailable`, /readyz says what is down; `other` (a process that still
    reaches the registry) publishes and deletes meanwhile, and once it is back the server catches
    up within a few sync intervals."""
    loaded = list(d.tasks)
    before = answers(d, loaded)
    assert all(status == 200 for status, _ in before.values()), before
    victim, gone, keep = loaded[0], loaded[-1], loaded[1:-1]  # delete refused here; deleted by another process; unchanged
    headers = d.headers
    cut()
    try:
        time.sleep(3 * SYNC_S)  # several syncs fail meanwhile
        during = answers(d, loaded)
        assert during == before, {n: (before[n], during[n]) for n in loaded if during[n] != before[n]}
        created = httpx.post(f"{d.url}/v1/tasks", json=zero_shot(f"{label}-new"), headers=headers, timeout=60)
        job = httpx.post(f"{d.url}/v1/tasks", json=training(f"{label}-job", steps=5), headers=headers, timeout=60)
        deleted = httpx.delete(f"{d.url}/v1/tasks/{victim}", headers=headers, timeout=60)
        changes = [created, job, deleted]
        for r in changes:
            assert r.status_code == 503 and error_type(r) == "unavailable", (r.status_code, r.text)
            assert "registry" in r.json()["error"]["message"], r.text
        ready = httpx.get(f"{d.url}/readyz", timeout=30)
        assert ready.status_code == 200 and ready.json()["status"] == "degraded", ready.text
        assert "the registry (" in ready.json()["down"]["registry"], ready.text  # which registry, and why
        listing = httpx.get(f"{d.url}/v1/tasks", timeout=30)
        if not writes_refused_only:  # a registry that cannot be reached cannot be read either
            assert listing.status_code == 503 and error_type(listing) == "unavailable", listing.text
        assert answers(d, loaded) == before  # the refused delete removed nothing
        # meanwhile another process publishes and deletes: through a registry it still reaches, or
        # (read-only) it is refused as this server is
        fresh = new_task(d, f"{label}-fresh")
        if writes_refused_only:
            with pytest.raises(Unavailable, match="registry"):
                other.publish(fresh, d.engine.backbone.fingerprint)
        else:
            other.publish(fresh, d.engine.backbone.fingerprint)
            other.registry.delete_task(gone)
        time.sleep(3 * SYNC_S)
        assert not served(d, fresh.name)  # unchanged until this server reaches the registry again
        assert answers(d, keep) == {n: before[n] for n in keep}
    finally:
        restore()
    returned = time.monotonic()
    wait(lambda: httpx.get(f"{d.url}/readyz", timeout=10).json()["status"] == "ready", "readyz ready again", 60)
    ready_s = time.monotonic() - returned
    if writes_refused_only:
        other.publish(fresh, d.engine.backbone.fingerprint)  # the refused publish, retried
        wait(lambda: served(d, fresh.name), "the retried publish is served", 60)
    else:
        wait(lambda: served(d, fresh.name) and not served(d, gone), "the changes made meanwhile are served", 60)
    caught_up_s = time.monotonic() - returned
    limit = RECOVERY_INTERVALS * SYNC_S
    assert caught_up_s < limit, f"caught up {caught_up_s:.1f} s after the registry returned (limit {limit} s)"
    again = httpx.post(f"{d.url}/v1/tasks", json=zero_shot(f"{label}-new"), headers=headers, timeout=60)  # the refused create, retried
    assert again.status_code == 201, again.text
    wait(lambda: served(d, f"{label}-new"), "the retried create is served", 30)
    assert httpx.delete(f"{d.url}/v1/tasks/{label}-new", headers=headers, timeout=60).status_code == 204
    assert answers(d, [victim, *keep]) == {n: before[n] for n in [victim, *keep]}
    if not writes_refused_only:
        d.tasks.remove(gone)
    return {"loaded_tasks": len(loaded), "answers_during_outage_changed": 0, "changes_refused_503": len(changes),
            "readyz_during": "200 degraded (down: registry)", "ready_again_s": round(ready_s, 2), "caught_up_s": round(caught_up_s, 2),
            "recovery_limit_s": limit, "outage_log_lines": d.log_text().count("store sync: the registry")}


class Traffic:
    """Mixed traffic from a thread until stopped: predictions over `tasks` by a few clients, and the
    task list, /readyz and /metrics now and then; counts every status."""

    def __init__(self, d: Deployment, tasks: list[str], clients: int = 4) -> None:
        self.d, self.tasks, self.clients = d, tasks, clients
        self.statuses: dict[int, int] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    async def _main(self) -> None:
        async with httpx.AsyncClient(base_url=self.d.url, timeout=60) as client:
            async def one(k: int) -> None:
                i = 0
                while not self.stop.is_set():
                    i += 1
                    if k == 0 and i % 10 == 0:
                        r = await client.get(("/v1/tasks", "/readyz", "/metrics")[i // 10 % 3])
                    else:
                        r = await client.post("/v1/predict", json={"task": self.tasks[(i + k) % len(self.tasks)], "text": f"row {k}-{i}: a {'fine' if i % 2 else 'dull'} film"})
                    self.statuses[r.status_code] = self.statuses.get(r.status_code, 0) + 1

            await asyncio.gather(*(one(k) for k in range(self.clients)))

    def __enter__(self) -> Traffic:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(120)


# A method of this drill's own, loaded as a plugin by the server it starts: the plain backbone,
# except that its rows wait inside the engine's forward while the file $DRILL_HOLD exists.
HOLD_PLUGIN = '''"""Drill 13's method (written by tests/drills/test_process_faults.py): rows wait in the forward while $DRILL_HOLD exists."""
import os
import time
from dataclasses import dataclass
from pathlib import Path

from server.methods import Method, register
from server.methods.recipe import Recipe


@dataclass(frozen=True)
class HoldConfig:
    """No options."""


class Hold(Method):
    method_id = "drill_hold"
    config_class = HoldConfig

    def ready_without_training(self, spec, init):
        return True

    def modulate(self, group, ctx):
        gate, deadline = Path(os.environ["DRILL_HOLD"]), time.monotonic() + 120
        while gate.exists() and time.monotonic() < deadline:
            time.sleep(0.01)

    def param_count(self):
        return {"shared": 0, "per_task": 0}


class HoldRecipe(Recipe):
    trains = False


register(Hold, HoldRecipe)
'''


# ---- drills 14 (PostgreSQL), 16 (the worker's registry drops mid-job), 11 (soak) --------------


@pytest.fixture(scope="class")
def proxied(tmp_path_factory) -> Iterator[tuple[Deployment, Proxy, str]]:
    """The deployment, the proxy, and the direct URL of its database (what other processes still reach)."""
    with proxied_postgres() as (proxy, through, direct):
        with deployment(tmp_path_factory.mktemp("proxied"), db_url=through, TASKSERVE_SYNC_INTERVAL_S=str(SYNC_S), TASKSERVE_WORKER_LEASE_S="3") as d:
            d.publish(per_method=1)
            yield d, proxy, direct


class TestPostgresRegistryBehindAProxy:
    """One server (and its embedded worker) whose registry is reached through a proxy the drills cut."""

    def test_a_worker_started_while_the_registry_is_down_waits_for_it(self, proxied) -> None:
        """Drill 16 at a worker's start: one started during an outage neither exits (a restart loop
        under a supervisor) nor needs a restart — it says once that it waits, attaches when the
        registry is back, and stops cleanly on SIGTERM. (It once exited 1 at once.)"""
        d, proxy, _ = proxied
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
               "TASKSERVE_BACKBONE": str(d.root / "model"), "TASKSERVE_FORM_MODULE": str(d.root / "form"), "TASKSERVE_STORE": str(d.root / "store"),
               "TASKSERVE_DB_URL": d.env["TASKSERVE_DB_URL"], "TASKSERVE_DEVICE": "cpu", "TASKSERVE_DTYPE": "float32",
               "TASKSERVE_WORKER_POLL_S": "0.2", "TASKSERVE_THREADS": "1"}
        log = d.root / "standalone-worker.log"
        proxy.cut()
        try:
            with log.open("w") as out:
                proc = subprocess.Popen([sys.executable, "-m", "server.cli", "worker"], env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
            wait(lambda: "waiting for it" in log.read_text(), "the worker says it waits", 120)
            time.sleep(10 * SYNC_S)
            assert proc.poll() is None, log.read_text()[-2000:]
        finally:
            proxy.restore()
        try:
            wait(lambda: " polling " in log.read_text(), "the worker attaches once the registry is back", 60)
            assert log.read_text().count("waiting for it") == 1, log.read_text()[-2000:]
        finally:
            code = stop_process(proc)
        assert code == 0, log.read_text()[-2000:]
        record("worker_started_during_outage", waited_then_attached=True, waiting_logged=1, exit_code=code)

    def test_postgres_unreachable_loaded_tasks_answer_changes_get_503_and_it_recovers(self, proxied) -> None:
        d, proxy, direct = proxied
        other = Store(d.root / "store", direct)  # another process, on the database's own address
        try:
            figures = registry_outage(d, proxy.cut, proxy.restore, other, "pg")
        finally:
            other.close()
        errors = d.log_text().count("store sync: the registry")
        assert errors <= 3 * proxy.cuts, f"the outage was logged {errors} times, not once per outage"  # start and end, not per sync
        record("registry_outage_postgres", **figures)

    def test_worker_losing_its_registry_mid_job_finishes_it_once_and_nothing_is_half_visible(self, proxied) -> None:
        """The registry (the embedded worker's, and the server's) goes away while a job trains and
        stays away until the worker has finished training and found it cannot publish: the worker
        trains on through the failed lease renewals, leaves the job to its lease instead of failing
        it or exiting, and once the registry is back the job is retried from its checkpoint and
        succeeds — its task published once, and never served, ready or half-written before."""
        d, proxy, direct = proxied
        registry = Store(d.root / "store", direct).registry  # what an operator sees, on the database's own address
        name, steps = "mid-job", scale(40, 160)
        wait(lambda: len(children(d.proc.pid)) == 1, "one embedded worker", 15)
        workers = children(d.proc.pid)
        left = "it will be retried after its lease expires"  # the worker's log line: trained, but could not publish
        try:
            created = httpx.post(f"{d.url}/v1/tasks", json=training(name, steps), headers=d.headers, timeout=60)
            assert created.status_code == 202, created.text
            job_id = created.json()["job"]
            wait(lambda: registry.get_job(job_id)["progress"].get("step", 0) >= 2, "the job trains", 120)
            step_at_cut = registry.get_job(job_id)["progress"]["step"]
            proxy.cut()
            seen, cut_at = set(), time.monotonic()
            try:
                while left not in d.log_text():
                    assert time.monotonic() - cut_at < 300, "the worker never reached the publish"
                    row = registry.get_task(name)
                    seen.add((row["status"], row["current_version"]))
                    r = httpx.post(f"{d.url}/v1/predict", json={"task": name, "text": "aaaa film"}, timeout=30)
                    assert r.status_code == 404 and error_type(r) == "not_found", r.text  # not served, not half-served
                    time.sleep(0.2)
                outage_s = time.monotonic() - cut_at
            finally:
                proxy.restore()
            assert seen == {("pending", None)}, seen
            wait(lambda: registry.get_job(job_id)["status"] in ("succeeded", "failed", "cancelled"), "the job ends", 300)
            job = registry.get_job(job_id)
            assert job["status"] == "succeeded" and job["attempts"] == 2, job  # retried once, from its checkpoint
            wait(lambda: served(d, name), "the trained task is served", 60)
            task = registry.get_task(name)
            assert task["status"] == "ready" and task["current_version"] == 1, task
            folders = sorted(p.name for p in (d.root / "store" / "tasks" / name).iterdir())
            assert folders == ["v1"] and not leftovers(d.root / "store"), (folders, leftovers(d.root / "store"))
            assert not (d.root / "store" / "jobs" / job_id).exists()  # its checkpoints went with its success
            assert children(d.proc.pid) == workers, "the embedded worker died and was restarted"
            assert "embedded worker exited" not in d.log_text()
            r = httpx.post(f"{d.url}/v1/predict", json={"task": name, "text": "aaaa film"}, timeout=30)
            assert r.status_code == 200, r.text
            record("worker_registry_drop", steps=steps, lease_s=3, step_at_cut=step_at_cut, outage_s=round(outage_s, 1),
                   trained_on_through_failed_renewals="lease not renewed, training on" in d.log_text(), attempts=job["attempts"], outcome=job["status"],
                   task_rows_seen_during_outage=sorted(seen), versions_on_disk=folders, worker_restarts=0)
        finally:
            registry.close()

    def test_postgres_that_hangs_never_stalls_predictions_and_registry_calls_fail_fast(self, proxied) -> None:
        """The registry accepts connections and never answers (a hung proxy or server: no error
        ever comes back): predictions keep answering as before, registry calls answer 503
        `unavailable` after at most REGISTRY_TIMEOUT_S instead of hanging — however many come —
        /readyz says it is down, and all of it works again once the registry answers."""
        d, proxy, _ = proxied
        loaded = list(d.tasks)
        before = answers(d, loaded)
        proxy.hang()
        try:
            time.sleep(3 * SYNC_S)  # store syncs come due meanwhile
            assert answers(d, loaded) == before
            with ThreadPoolExecutor(12) as pool:  # more registry calls than the server has threads for them
                calls = list(pool.map(lambda i: httpx.get(f"{d.url}/v1/tasks", timeout=60) if i % 2 else
                                      httpx.post(f"{d.url}/v1/tasks", json=zero_shot(f"hang-{i}"), headers=d.headers, timeout=60), range(12)))
            assert all(r.status_code == 503 and error_type(r) == "unavailable" and "has not answered" in r.text for r in calls), [(r.status_code, r.text) for r in calls]
            ready = httpx.get(f"{d.url}/readyz", timeout=60)
            assert ready.status_code == 200 and ready.json()["status"] == "degraded" and "has not answered" in ready.json()["down"]["registry"], ready.text
            started = time.monotonic()
            assert answers(d, loaded) == before  # no thread predictions need is held by the hung registry
            predict_s = (time.monotonic() - started) / len(loaded)
        finally:
            proxy.release()
        wait(lambda: httpx.get(f"{d.url}/readyz", timeout=30).json()["status"] == "ready", "readyz ready again", 60)
        created = httpx.post(f"{d.url}/v1/tasks", json=zero_shot("hang-after"), headers=d.headers, timeout=60)
        assert created.status_code == 201, created.text
        assert httpx.delete(f"{d.url}/v1/tasks/hang-after", headers=d.headers, timeout=60).status_code == 204
        assert answers(d, loaded) == before
        record("registry_hang_postgres", loaded_tasks=len(loaded), answers_changed=0, registry_calls_during_hang=len(calls), answered_503_unavailable=len(calls),
               predict_s_during_hang=round(predict_s, 3), readyz_during="200 degraded (registry has not answered)", registry_timeout_s=5.0)

    def test_soak_create_delete_cycles_under_traffic_keep_rss_flat(self, proxied) -> None:
        """Create/delete cycles through the API (IP from a description, TPV sums, plain tasks; names
        reused, so each is deleted and made again) under mixed traffic; after a warm-up the server's RSS
        grows by less than 100 MB. Full scale: 1,000 cycles, with the mixed traffic running for 10
        minutes (from the first cycle; it goes on after the cycles end)."""
        d = proxied[0]
        cycles, duration = scale(6, 1000), scale(6, 600)
        tpv = next(n for n in d.tasks if "-tpv-" in n)
        bodies = [lambda n: zero_shot(n),
                  lambda n: {"name": n, "method": "tpv", "labels": ["negative", "positive"], "scoring": "sum", "init": {"combine": {tpv: 0.5}}},
                  lambda n: {"name": n, "method": "plain", "labels": ["negative", "positive"], "scoring": "sum"}]
        samples: list[tuple[float, float]] = []
        outcomes: dict[str, int] = {}
        start = time.monotonic()
        warm_s = max(2.0, duration * 0.15)
        baseline = None
        done = 0
        with Traffic(d, list(d.tasks)) as traffic, httpx.Client(base_url=d.url, timeout=60, headers=d.headers) as client:
            while done < cycles or time.monotonic() - start < max(duration, warm_s + 2):
                if done < cycles:
                    name = f"soak-{done % 16}"
                    created = client.post("/v1/tasks", json=bodies[done % len(bodies)](name))
                    answered = client.post("/v1/predict", json={"task": name, "text": "a fine film"})
                    deleted = client.delete(f"/v1/tasks/{name}")
                    for r in (created, answered, deleted):
                        outcomes[str(r.status_code)] = outcomes.get(str(r.status_code), 0) + 1
                    assert (created.status_code, answered.status_code, deleted.status_code) == (201, 200, 204), (created.text, answered.text, deleted.text)
                    done += 1
                else:  # the cycles are done; the mixed traffic goes on until `duration`
                    time.sleep(scale(0.1, 1))
                now = time.monotonic() - start
                if not samples or now - samples[-1][0] >= scale(0.5, 5):
                    samples.append((now, d.rss_mb()))
                if baseline is None and now >= warm_s:
                    baseline = d.rss_mb()
        samples.append((time.monotonic() - start, d.rss_mb()))
        assert baseline is not None
        after = [rss for t, rss in samples if t >= warm_s]
        growth, peak = after[-1] - baseline, max(after) - baseline
        assert set(traffic.statuses) == {200}, traffic.statuses
        assert growth < 100, f"RSS grew {growth:.0f} MB after the warm-up ({baseline:.0f} -> {after[-1]:.0f} MB)"
        curve = [f"{t:.0f}s:{rss:.0f}" for t, rss in samples[:: max(1, len(samples) // 12)]]
        record("soak", cycles=done, seconds=round(samples[-1][0]), traffic_duration_s=duration, traffic_requests=sum(traffic.statuses.values()),
               traffic_statuses=traffic.statuses, cycle_statuses=outcomes, warmup_s=warm_s, rss_baseline_mb=round(baseline), rss_end_mb=round(after[-1]),
               rss_growth_mb=round(growth, 1), rss_peak_growth_mb=round(peak, 1), rss_curve_mb=curve)


# ---- drills 14 (SQLite read-only) and 13 (SIGTERM) -------------------------------------------


@pytest.fixture(scope="class")
def lite(tmp_path_factory) -> Iterator[Deployment]:
    root = tmp_path_factory.mktemp("lite")
    (root / "plugin").mkdir()
    (root / "plugin" / "drill_hold.py").write_text(HOLD_PLUGIN)
    path = os.pathsep.join([str(root / "plugin"), str(ROOT), str(ROOT / "tests")])
    with deployment(root, db_url="sqlite", TASKSERVE_SYNC_INTERVAL_S=str(SYNC_S), TASKSERVE_PLUGINS="drill_hold", DRILL_HOLD=str(root / "hold"),
                    PYTHONPATH=path, TASKSERVE_MAX_QUEUE="4096") as d:
        d.publish(per_method=1)
        yield d


class TestSqliteRegistryThenSigterm:
    """One server on a SQLite registry, with the hold plugin; the SIGTERM drill ends it, so it comes last."""

    def test_sqlite_registry_read_only_loaded_tasks_answer_changes_get_503_and_it_recovers(self, lite: Deployment) -> None:
        d = lite
        assert d.proc.poll() is None, "the SIGTERM drill ran first and stopped this server"
        files = sorted((d.root / "store").glob("registry.db*"))  # the database, its WAL and shared-memory files
        assert {p.name for p in files} >= {"registry.db", "registry.db-wal", "registry.db-shm"}, files
        guard = contextlib.ExitStack()
        figures = registry_outage(d, lambda: guard.enter_context(immutable(files)), guard.close, d.writer, "lite", writes_refused_only=True)
        record("registry_outage_sqlite_read_only", how="chattr +i on registry.db, -wal, -shm (reads go on, writes fail: 'disk I/O error')", **figures)

    def test_sigterm_with_rows_in_flight_drains_refuses_new_work_and_exits_0(self, lite: Deployment) -> None:
        """Beyond test_lifecycle.py (rows queued at SIGTERM complete): a row held inside the engine's
        forward and rows queued behind it are in flight when SIGTERM comes; /readyz turns 503 at once
        and every new request gets 503 `not_ready` (the socket stays open: no refused connections);
        the held rows complete with 200 once the forward returns; the server and its embedded worker
        exit, the server with status 0, within the drain timeout."""
        d, queued = lite, scale(8, 48)
        gate = d.root / "hold"
        held = httpx.post(f"{d.url}/v1/tasks", json={"name": "held", "method": "drill_hold", "labels": ["negative", "positive"], "scoring": "sum"}, headers=d.headers, timeout=60)
        assert held.status_code == 201, held.text
        gate.touch()  # from now on its rows wait in the forward
        wait(lambda: children(d.proc.pid), "the embedded worker runs", 60)
        workers = children(d.proc.pid)
        pool = ThreadPoolExecutor(queued + 1)
        post = lambda row: httpx.post(f"{d.url}/v1/predict", json=row, timeout=120)  # noqa: E731
        batches = d.metric("taskserve_batch_rows_count")
        first = pool.submit(post, {"task": "held", "text": "held in the forward"})
        wait(lambda: d.metric("taskserve_batch_rows_count") > batches, "the held row's batch started", 60)
        behind = [pool.submit(post, {"task": d.tasks[i % len(d.tasks)], "text": f"queued {i}"}) for i in range(queued)]
        wait(lambda: d.metric("taskserve_queue_depth") == queued, f"{queued} rows queued behind it", 60)

        d.proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        ready = httpx.get(f"{d.url}/readyz", timeout=10)
        ready_s = time.monotonic() - sent
        assert ready.status_code == 503 and error_type(ready) == "not_ready" and "stopping" in ready.text, ready.text
        refused = [httpx.post(f"{d.url}/v1/predict", json={"task": d.tasks[i % len(d.tasks)], "text": f"late {i}"}, timeout=30) for i in range(scale(5, 20))]
        refused.append(httpx.post(f"{d.url}/v1/tasks", json=zero_shot("too-late"), headers=d.headers, timeout=30))
        assert all(r.status_code == 503 and error_type(r) == "not_ready" for r in refused), [(r.status_code, r.text) for r in refused]
        assert httpx.get(f"{d.url}/healthz", timeout=10).status_code == 200  # alive, not ready
        assert not first.done() and not any(f.done() for f in behind), "the rows in flight were answered before the forward returned"
        assert d.proc.poll() is None

        gate.unlink()  # the forward returns
        statuses = [f.result().status_code for f in [first, *behind]]
        rc = d.proc.wait(DRAIN_TIMEOUT_S + 15)
        exit_s = time.monotonic() - sent
        pool.shutdown()
        assert statuses == [200] * (queued + 1), statuses
        assert rc == 0, f"exit status {rc}"
        assert exit_s < DRAIN_TIMEOUT_S, f"exited {exit_s:.1f} s after SIGTERM (drain timeout {DRAIN_TIMEOUT_S} s)"
        assert not any(alive(pid) for pid in workers), "the embedded worker outlived the server"
        log = d.log_text()
        assert "Application shutdown complete" in log and "requests in flight finish first" in log
        record("sigterm_drain", in_flight=queued + 1, in_flight_200=statuses.count(200), readyz_after_sigterm=f"{ready.status_code} in {ready_s * 1000:.0f} ms",
               new_requests_503=len(refused), exit_status=rc, exit_after_sigterm_s=round(exit_s, 2), drain_timeout_s=DRAIN_TIMEOUT_S, worker_exited=True)


# ---- drills 15 (disk full mid-publish) and 16 (a job that raises) ---------------------------


@pytest.fixture(scope="class")
def on_tmpfs(tmp_path_factory) -> Iterator[Deployment]:
    root = tmp_path_factory.mktemp("tmpfs")
    with tmpfs(root / "store", 16), deployment(root, TASKSERVE_SYNC_INTERVAL_S=str(SYNC_S), TASKSERVE_WORKER_LEASE_S="3") as d:
        d.publish(per_method=1)
        yield d


class TestStoreOnAFullDisk:
    """One server (and its embedded worker) whose store is a 16 MB tmpfs; the registry is PostgreSQL."""

    def test_disk_full_mid_publish_fails_cleanly_and_the_next_publish_works(self, on_tmpfs: Deployment) -> None:
        """Another process publishes into a store with 0, 1, 2, … pages free: every publish that does
        not fit fails with ENOSPC and leaves no version folder, no temp file and no registry row, and
        the server never loads it; the first level it fits at publishes it whole, and it is served.
        Then the same through the API: 503 `unavailable` on a full disk, 201 once space is freed."""
        d = on_tmpfs
        store = d.root / "store"
        name = "full-disk"
        task = new_task(d, name)
        need = 5 * 4096  # its weights (12.9 kB: 4 pages) and manifest (1 page), measured
        levels = list(range(0, need + 4096 + 1, 4096 if scale(0, 1) else 2 * 4096))
        before = answers(d, d.tasks)
        filler = Filler(store)
        outcomes = []
        try:
            for level in levels:
                filler.refill()
                free = filler.leave(level)
                try:
                    d.writer.publish(task, d.engine.backbone.fingerprint)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC, exc
                    assert not (store / "tasks" / name / "v1").exists() and not leftovers(store), leftovers(store)
                    assert not d.writer.registry.exists(name)
                    outcomes.append((free, "ENOSPC"))
                    continue
                outcomes.append((free, "published"))
                break
            failed = [free for free, outcome in outcomes if outcome == "ENOSPC"]
            assert failed and outcomes[-1][1] == "published", outcomes
            wait(lambda: served(d, name), "the published task is served", 60)
            assert "failed to load" not in d.log_text()
            r = httpx.post(f"{d.url}/v1/predict", json={"task": name, "text": "a fine film"}, timeout=30)
            assert r.status_code == 200, r.text

            # through the API: POST /v1/tasks publishes into the store itself
            filler.refill()
            full = httpx.post(f"{d.url}/v1/tasks", json=zero_shot("full-api"), headers=d.headers, timeout=60)
            assert full.status_code == 503 and error_type(full) == "unavailable", full.text
            assert "No space left" in full.json()["error"]["message"], full.text
            time.sleep(3 * SYNC_S)
            assert httpx.get(f"{d.url}/v1/tasks/full-api", timeout=10).status_code == 404
            assert not (store / "tasks" / "full-api" / "v1").exists() and not leftovers(store)
            assert answers(d, d.tasks) == before  # serving never noticed
        finally:
            filler.close()
        fits = httpx.post(f"{d.url}/v1/tasks", json=zero_shot("full-api"), headers=d.headers, timeout=60)
        assert fits.status_code == 201, fits.text
        record("disk_full_mid_publish", store="16 MB tmpfs", artifact_bytes=13632, free_levels_tried=[free for free, _ in outcomes],
               failed_clean_enospc=len(failed), published_at_free_bytes=outcomes[-1][0], partial_artifacts_seen=0, registry_rows_of_failed=0,
               api_on_full_disk="503 unavailable (No space left on device)", api_after_freeing=fits.status_code)


    def test_a_job_that_raises_fails_with_its_error_and_leaves_nothing(self, on_tmpfs: Deployment) -> None:
        """A training job whose worker hits a full disk (its checkpoint write raises ENOSPC) ends failed
        with that error; its task is `failed` with no version, never served, and leaves no folder, temp
        file or checkpoint behind; the same name trains fine once space is freed."""
        d = on_tmpfs
        store, name, steps = d.root / "store", "no-space-job", scale(20, 60)
        filler = Filler(store)
        try:
            created = httpx.post(f"{d.url}/v1/tasks", json=training(name, steps), headers=d.headers, timeout=60)
            assert created.status_code == 202, created.text
            job_id = created.json()["job"]
            wait(lambda: httpx.get(f"{d.url}/v1/jobs/{job_id}", timeout=10).json()["status"] in ("succeeded", "failed", "cancelled"), "the job ends", 300)
            job = httpx.get(f"{d.url}/v1/jobs/{job_id}", timeout=10).json()
            assert job["status"] == "failed" and "No space left on device" in (job["error"] or ""), job
            shown = httpx.get(f"{d.url}/v1/tasks/{name}", timeout=10).json()
            assert shown["status"] == "failed" and shown["version"] is None and not shown["served"] and "No space left" in shown["error"], shown
            r = httpx.post(f"{d.url}/v1/predict", json={"task": name, "text": "aaaa film"}, timeout=30)
            assert r.status_code == 404, r.text
            assert not (store / "tasks" / name).exists() or not any((store / "tasks" / name).iterdir())
            assert not leftovers(store) and not (store / "jobs" / job_id).exists(), (leftovers(store), list((store / "jobs").glob("*")))
            jobs_gauge_follows(d)
        finally:
            filler.close()
        again = httpx.post(f"{d.url}/v1/tasks", json=training(name, steps), headers=d.headers, timeout=60)
        assert again.status_code == 202, again.text
        retry = again.json()["job"]
        wait(lambda: httpx.get(f"{d.url}/v1/jobs/{retry}", timeout=10).json()["status"] in ("succeeded", "failed", "cancelled"), "the retried job ends", 300)
        assert httpx.get(f"{d.url}/v1/jobs/{retry}", timeout=10).json()["status"] == "succeeded"
        wait(lambda: served(d, name), "the retrained task is served", 60)
        jobs_gauge_follows(d)
        record("job_that_raises", fault="ENOSPC in the worker (store on a full tmpfs)", outcome=job["status"], error=job["error"][:80],
               task_status=shown["status"], task_version=shown["version"], served=shown["served"], leftovers=0,
               resubmitted_after_freeing="succeeded, served")


def jobs_gauge_follows(d: Deployment) -> None:
    """Drill 19's job states: within a few sync intervals `taskserve_jobs{state}` equals the jobs the
    registry lists in each state."""
    def agrees() -> bool:
        listed = Counter(job["status"] for job in d.writer.registry.list_jobs(limit=10_000))
        return all(d.metric("taskserve_jobs", state=state) == listed.get(state, 0) for state in ("queued", "running", "succeeded", "failed", "cancelled")) and sum(listed.values()) > 0
    wait(agrees, "the job-state gauge agrees with the registry", 20)
