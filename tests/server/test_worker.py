"""Few-shot training jobs end to end on a tiny model: the recipes learn, the worker claims, trains
and publishes, cancellation and dead workers are handled, and other tasks never change."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from adapters_store.store import Store
from helpers import METHODS, make_engine
from server.factory import build_engine
from server.api.schemas import TaskCreate
from server.data.spec import TaskSpec
from server.engine import Example, Request
from server.settings import Settings
from server.store_sync import attach, sync
from server.training.evaluate import evaluate
from server.training.few_shot import few_shot
from server.training.trainer import TrainConfig
from server.worker import Worker
from serving import save_tiny_models

# read here independently of the code under test: train_autocast=auto is bf16 on such a CPU
NATIVE_BF16 = any(f in Path("/proc/cpuinfo").read_text().split() for f in ("avx512_bf16", "amx_bf16")) if Path("/proc/cpuinfo").exists() else False

# the template ends in a space, so the byte-level labels are told apart by their first byte ("n" / "p"):
# a tiny random model learns any label prior with any method this way
SPEC = TaskSpec(template="Review: {text}\nSentiment: ", labels=("negative", "positive"), description="Tell me the sentiment of the review:", scoring="first")
# a task a tiny random model can learn: the first character decides the label
ROWS = [Example("new", f"{'aaaa' if i % 2 else 'zzzz'} film {i}", " positive" if i % 2 else " negative") for i in range(24)]


def body(name: str, method: str, steps: int = 30, **extra) -> dict:
    examples = [{"text": e.text, "label": e.target.strip()} for e in ROWS]
    return {"name": name, "method": method, "labels": ["negative", "positive"], "template": SPEC.template, "description": SPEC.description, "scoring": SPEC.scoring,
            "examples": examples, "train": {"steps": steps, "batch_size": 8}, **extra}


@pytest.mark.parametrize("method", METHODS)
def test_few_shot_recipe_lowers_the_loss_and_leaves_the_engine_as_it_was(method: str) -> None:
    engine = make_engine("llama")
    other = engine.tasks.new("other", method, SPEC, seed=5)
    engine.tasks.add(other)
    before = engine.run([Request("other", "zzzz film")])[0].scores
    probe = engine.tasks.new("probe", method, SPEC, init={"copy_nets": True} if method == "ip" else None)
    engine.tasks.add(probe)
    # the label the untrained task prefers less often: learning it means the outputs really moved
    predicted = [r.label for r in engine.run([Request("probe", e.text) for e in ROWS])]
    target = min(SPEC.labels, key=predicted.count)
    rows = [Example("new", e.text, target) for e in ROWS]
    start = evaluate(engine, [Example("probe", e.text, target) for e in ROWS])["accuracy"]
    engine.tasks.remove("probe")
    task, result, _ = few_shot(engine, "new", method, SPEC, rows[:16], rows[16:], {}, TrainConfig(steps=40, batch_size=8, eval_every=10, lr=3e-3, prototype_lr=5e-2, prompt_lr_relative=0.3))
    engine.tasks.add(task)
    end = evaluate(engine, rows)["accuracy"]
    assert start <= 0.5 and end == 1.0, (start, end, result.history)
    assert result.validation["new"]["n"] == 8 and result.best_step > 0
    assert not any(p.requires_grad for p in task.params.values())
    assert engine.run([Request("other", "zzzz film")])[0].scores == before  # nothing shared was written
    assert set(engine.tasks) == {"other", "new"}  # the scratch copy is gone


@pytest.fixture()
def deployment(tmp_path: Path) -> tuple[Settings, Store]:
    settings = Settings(**save_tiny_models(tmp_path), store=tmp_path / "store", device="cpu", dtype="float32", seed_store=None, worker_lease_s=3, worker_poll_s=0.2, embedded_worker=False)
    return settings, Store(settings.store)


def submit(store: Store, request: dict) -> str:
    store.registry.reserve(request["name"], request["method"])
    return store.registry.create_job(request["name"], TaskCreate.model_validate(request).model_dump(mode="json"))["id"]


def test_worker_runs_jobs_for_every_method_and_other_tasks_stay_bit_identical(deployment) -> None:
    settings, store = deployment
    serving = build_engine(settings)
    attach(store, serving)
    existing = serving.tasks.new("existing", "attempt", SPEC, seed=3)
    store.publish(existing, serving.backbone.fingerprint)
    sync(store, serving)
    probe = [Request("existing", f"text {i}") for i in range(4)]
    before = [r.scores for r in serving.run(probe)]
    worker = Worker(settings, build_engine(settings, training=True), Store(settings.store), name="w1")
    jobs = {method: submit(store, body(f"new-{method}", method, steps=12)) for method in METHODS}
    done = threading.Event()

    def run_jobs() -> None:
        try:
            for _ in METHODS:
                worker.run_once()
        finally:
            done.set()

    trainer = threading.Thread(target=run_jobs)
    trainer.start()
    checks = 0
    while not done.is_set() or checks == 0:  # while jobs train and publish, the served task never changes
        sync(store, serving)  # hot-load whatever was published meanwhile
        assert [r.scores for r in serving.run(probe)] == before
        checks += 1
    trainer.join()
    sync(store, serving)
    assert [r.scores for r in serving.run(probe)] == before and checks > 1
    assert not worker.run_once()  # the queue is empty
    for method, job_id in jobs.items():
        job = store.registry.get_job(job_id)
        assert job["status"] == "succeeded", job["error"]
        assert job["progress"]["step"] == job["progress"]["total"] == 2 * 12 + job["metrics"]["steps_trained"]  # two folds, then the final fit
        assert job["metrics"]["examples"] == len(ROWS) and job["metrics"]["validation"]["rows"] == len(ROWS)
        assert job["metrics"]["training_dtype"] == ("bfloat16 autocast" if NATIVE_BF16 else "float32")  # train_autocast auto
        assert store.registry.get_task(f"new-{method}")["status"] == "ready"
        assert serving.run([Request(f"new-{method}", "aaaa film")])[0].task_version == 1


@pytest.mark.parametrize(("train_autocast", "trained_in"), [("bfloat16", "bfloat16 autocast"), ("off", "float32")])
def test_a_worker_trains_its_jobs_in_the_precision_its_settings_name(deployment, train_autocast: str, trained_in: str) -> None:
    settings, store = deployment
    worker = Worker(settings.model_copy(update={"train_autocast": train_autocast}), build_engine(settings, training=True), Store(settings.store), name="w1")
    job_id = submit(store, body(f"{train_autocast}-job", "prompt_tuning", steps=6))
    assert worker.run_once()
    job = store.registry.get_job(job_id)
    assert job["status"] == "succeeded", job["error"]
    assert job["metrics"]["training_dtype"] == trained_in


def test_cancelled_and_invalid_jobs(deployment) -> None:
    settings, store = deployment
    worker = Worker(settings, build_engine(settings, training=True), Store(settings.store), name="w1")
    queued = submit(store, body("cancel-me", "prompt_tuning"))
    store.registry.cancel_job(queued)
    assert not worker.run_once() and not store.registry.exists("cancel-me")  # the name is free again
    bad = submit(store, body("bad-tpv", "tpv", init={"combine": {"missing-task": 1.0}}))
    assert worker.run_once()
    job = store.registry.get_job(bad)
    assert job["status"] == "failed" and "missing-task" in job["error"]
    assert store.registry.get_task("bad-tpv")["status"] == "failed"
    submit(store, body("bad-tpv", "tpv"))  # a failed name can be submitted again
    assert worker.run_once() and store.registry.get_task("bad-tpv")["status"] == "ready"


def test_kill_9_mid_job_leaves_no_task_and_the_job_is_retried(deployment) -> None:
    settings, store = deployment
    job_id = submit(store, body("survivor", "prompt_tuning", steps=150))  # 2 folds + the final fit: 450 steps
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TASKSERVE_BACKBONE": settings.backbone, "TASKSERVE_FORM_MODULE": settings.form_module,
           "TASKSERVE_STORE": str(settings.store), "TASKSERVE_DEVICE": "cpu", "TASKSERVE_WORKER_LEASE_S": "3", "TASKSERVE_WORKER_POLL_S": "0.2"}
    first = subprocess.Popen([sys.executable, "-m", "server.cli", "worker"], env=env, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while store.registry.get_job(job_id)["progress"].get("step", 0) < 60:  # in fold 1, past its first checkpoints (every 15 steps)
            assert time.monotonic() < deadline and first.poll() is None
            time.sleep(0.1)
        first.send_signal(signal.SIGKILL)
        first.wait(10)
    finally:
        first.kill()
    job = store.registry.get_job(job_id)
    assert job["status"] == "running" and job["attempts"] == 1
    task = store.registry.get_task("survivor")
    assert task["status"] == "pending" and task["current_version"] is None  # nothing visible
    second = subprocess.Popen([sys.executable, "-m", "server.cli", "worker"], env=env, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while (job := store.registry.get_job(job_id))["status"] not in ("succeeded", "failed"):
            assert time.monotonic() < deadline and second.poll() is None
            time.sleep(0.2)
    finally:
        second.send_signal(signal.SIGTERM)
        second.wait(20)
    assert job["status"] == "succeeded" and job["attempts"] == 2, job["error"]
    assert store.registry.get_task("survivor")["current_version"] == 1
    assert second.returncode == 0  # SIGTERM stops an idle worker cleanly


def test_lease_expiry_fails_a_job_after_its_attempts(deployment) -> None:
    _, store = deployment
    job_id = submit(store, body("doomed", "prompt_tuning"))
    assert store.registry.claim_job("dead-1", lease_s=0.01, max_attempts=2)["id"] == job_id
    time.sleep(0.05)
    assert store.registry.claim_job("dead-2", lease_s=0.01, max_attempts=2)["attempts"] == 2  # re-queued, claimed again
    time.sleep(0.05)
    assert store.registry.claim_job("w", lease_s=10, max_attempts=2) is None
    job = store.registry.get_job(job_id)
    assert job["status"] == "failed" and "lease" in job["error"]
    assert store.registry.get_task("doomed")["status"] == "failed"
    assert store.registry.renew_job(job_id, "dead-2", 10) == "lost"


def test_the_embedded_worker_yields_the_cpu_to_serving(deployment) -> None:
    """`taskserve serve`'s worker (started as the server starts it, settings through its environment)
    runs at `worker_nice`, and the server itself keeps its own priority."""
    import asyncio

    from server.api.supervisor import WorkerProcess

    settings, _ = deployment
    own = os.getpriority(os.PRIO_PROCESS, 0)
    if own >= 19:
        pytest.skip("this test process already runs at the lowest priority: nothing to lower")
    settings = settings.model_copy(update={"worker_nice": min(19, own + 7)})

    async def niceness_of_the_worker() -> int:
        worker = WorkerProcess(settings)
        worker.start()
        try:
            deadline = time.monotonic() + 120
            while (nice := os.getpriority(os.PRIO_PROCESS, worker.process.pid)) == own:  # set first thing at start
                assert time.monotonic() < deadline and worker.process.poll() is None
                await asyncio.sleep(0.05)
            return nice
        finally:
            await worker.stop()

    assert asyncio.run(niceness_of_the_worker()) == min(19, own + 7)
    assert os.getpriority(os.PRIO_PROCESS, 0) == own
