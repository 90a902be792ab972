"""Prometheus metrics, one registry per app (tests start several apps in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from server.batcher import BatchStats


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.latency = Histogram("taskserve_request_seconds", "Prediction request latency", ["route"], registry=self.registry)
        self.queue_time = Histogram("taskserve_queue_seconds", "Time a row waited before its batch ran", registry=self.registry)
        self.batch_rows = Histogram("taskserve_batch_rows", "Rows per executed batch", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=self.registry)
        self.dropped = Counter("taskserve_rows_dropped_total", "Rows dropped before they ran (deadline passed, caller gone, a sibling row failed)", registry=self.registry)
        self.predictions = Counter("taskserve_predictions_total", "Predicted rows", ["task", "outcome"], registry=self.registry)
        self.tasks_loaded = Gauge("taskserve_tasks_loaded", "Tasks the engine serves", registry=self.registry)
        self.task_memory = Gauge("taskserve_task_memory_bytes", "Device memory held by resident per-task tensors", registry=self.registry)
        self.queue_depth = Gauge("taskserve_queue_depth", "Rows waiting for a batch", registry=self.registry)
        self.backend_rows = Gauge("taskserve_backend_rows", "Rows the engine has run since start, by backend (native; vllm)", ["backend"], registry=self.registry)

    def observe_batch(self, stats: BatchStats) -> None:
        """The batcher's per-batch callback (runs on the event loop)."""
        self.batch_rows.observe(stats.rows)
        for wait in stats.waits:
            self.queue_time.observe(wait)
        if stats.dropped:
            self.dropped.inc(stats.dropped)
