"""Prometheus metrics, one registry per app (tests start several apps in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from server.batcher import BatchStats
from server.task_table import TaskTable


OTHER_TASKS = "_other"
"""The `task` label of predictions of the tasks past `task_series` (see `Metrics.predicted`)."""


class Metrics:
    def __init__(self, task_series: int = 100) -> None:
        """`task_series`: most tasks with their own `taskserve_predictions_total` series."""
        self.registry = CollectorRegistry()
        self.task_series = task_series
        self._task_labels: set[str] = set()
        self.latency = Histogram("taskserve_request_seconds", "Prediction request latency", ["route"], registry=self.registry)
        self.queue_time = Histogram("taskserve_queue_seconds", "Time a row waited before its batch ran", registry=self.registry)
        self.batch_rows = Histogram("taskserve_batch_rows", "Rows per executed batch", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=self.registry)
        self.batch_seconds = Histogram("taskserve_batch_seconds", "Engine time per executed batch (its first pass, for rows that go on generating)",
                                       buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30), registry=self.registry)
        self.dropped = Counter("taskserve_rows_dropped_total", "Rows dropped before they ran (deadline passed, caller gone, a sibling row failed)", registry=self.registry)
        self.predictions = Counter("taskserve_predictions_total", f"Predicted rows by task (past task_series tasks: task {OTHER_TASKS}) and outcome", ["task", "outcome"], registry=self.registry)
        self.tasks_loaded = Gauge("taskserve_tasks_loaded", "Tasks the engine serves", registry=self.registry)
        self.task_memory = Gauge("taskserve_task_memory_bytes", "Device memory held by resident per-task tensors", registry=self.registry)
        self.queue_depth = Gauge("taskserve_queue_depth", "Rows waiting for a batch", registry=self.registry)
        self.jobs = Gauge("taskserve_jobs", "Training jobs in the registry by state (as of the last store sync)", ["state"], registry=self.registry)
        self.backend_rows = Gauge("taskserve_backend_rows", "Rows the engine has run since start, by backend (native; vllm)", ["backend"], registry=self.registry)
        self.split_batches = Gauge("taskserve_split_batches", "Batches the engine has run since start as more than one pass (rows split by the length they run at)", registry=self.registry)

    def watch(self, table: TaskTable) -> None:
        """Export the task table's residency counters (read at each scrape)."""
        self.registry.register(_Residency(table))

    def count_jobs(self, counts: dict[str, int]) -> None:
        for state, n in counts.items():
            self.jobs.labels(state).set(n)

    def predicted(self, task: str, outcome: str) -> None:
        """Count a row by task and outcome ("ok" or the error type). The label set stays bounded
        however many tasks there are: the first `task_series` task names counted keep a series of
        their own (until restart), every other task's rows are counted under `_other`."""
        if task not in self._task_labels and len(self._task_labels) < self.task_series:
            self._task_labels.add(task)
        self.predictions.labels(task if task in self._task_labels else OTHER_TASKS, outcome).inc()

    def observe_batch(self, stats: BatchStats) -> None:
        """The batcher's per-batch callback (runs on the event loop)."""
        self.batch_rows.observe(stats.rows)
        for wait in stats.waits:
            self.queue_time.observe(wait)
        if stats.dropped:
            self.dropped.inc(stats.dropped)


class _Residency(Collector):
    """`taskserve_task_rebuilds_total` / `taskserve_task_evictions_total`: counted by the task table
    (under its lock, on the engine thread), read when Prometheus scrapes."""

    def __init__(self, table: TaskTable) -> None:
        self.table = table

    def collect(self):
        yield CounterMetricFamily("taskserve_task_rebuilds", "Evicted tasks' device copies rebuilt for a batch", value=self.table.rebuilds)
        yield CounterMetricFamily("taskserve_task_evictions", "Tasks' device copies evicted to keep under task_memory_mb", value=self.table.evictions)
