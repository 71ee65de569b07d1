"""Prometheus metrics of kiln-serve: requests, latency, queue, batch sizes, load time and loader, intakes.

Serve path (no HTTP): counters are updated by the dataplane and the
server; /metrics renders them. With intake processes every process writes its values to
files in MULTIPROCESS_DIR (prometheus_client's multiprocess mode, chosen by the environment
variable before prometheus_client is imported) and any intake's /metrics adds them up.
"""

from __future__ import annotations

import os
from typing import Any, Literal

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

MULTIPROCESS_DIR = "PROMETHEUS_MULTIPROC_DIR"

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# How a gauge's values from several processes combine: the largest, the sum of live ones, each live one.
Combine = Literal["max", "livesum", "liveall"]


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._batch_children: dict[str, tuple[Any, Any, Any]] = {}
        self.requests = Counter(
            "kiln_requests", "Inference requests by model and HTTP status.", ["model", "status"], registry=self.registry
        )
        self.latency = self._histogram("kiln_request_duration_seconds", "Inference request latency.")
        self.queue = self._histogram("kiln_queue_seconds", "Time a batch's first request waited in the queue.")
        self.batch_size = self._histogram(
            "kiln_batch_size", "Rows per model call after dynamic batching.", BATCH_BUCKETS
        )
        self.batch_requests = self._histogram(
            "kiln_batch_requests", "Requests merged into one model call.", BATCH_BUCKETS
        )
        self.intake_seconds = self._histogram(
            "kiln_intake_seconds",
            "Time an intake process spent encoding a request's answer from the model process's outputs.",
        )
        self.model_seconds = self._histogram(
            "kiln_model_seconds", "Time a request spent in the model process: queue, batch and model call."
        )
        # Gauges say how processes combine in multiprocess mode: max of one value, sum of the live ones, each.
        self.load_seconds = self._gauge(
            "kiln_model_load_seconds", "Seconds to load the model (before warm-up).", "max", "loader"
        )
        self.loader = self._gauge(
            "kiln_model_loader",
            "1 for the loader the model runs on (lean: no torch import) and why the lean one was not used.",
            "max",
            "loader",
            "fallback",
        )
        self.warmup_seconds = self._gauge("kiln_model_warmup_seconds", "Seconds of warm-up inference.", "max")
        self.warm_sizes_left = self._gauge(
            "kiln_model_warm_sizes_left",
            "Batch sizes the model thread has yet to call once (a first call stalls the requests in flight).",
            "max",
        )
        self.inflight = self._gauge(
            "kiln_inflight_requests", "Inference requests being handled, all processes.", "livesum"
        )
        self.intake_inflight = self._gauge(
            "kiln_intake_inflight_requests", "Inference requests being handled, per intake process (pid).", "liveall"
        )
        self.queue_depth = self._gauge("kiln_queue_depth", "Requests waiting for the model.", "livesum")

    def _histogram(self, name: str, doc: str, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> Histogram:
        return Histogram(name, doc, ["model"], buckets=buckets, registry=self.registry)

    def _gauge(self, name: str, doc: str, mode: Combine, *labels: str) -> Gauge:
        return Gauge(name, doc, ["model", *labels], registry=self.registry, multiprocess_mode=mode)

    def render(self) -> bytes:
        """The text exposition: this registry, or every process's values in multiprocess mode."""
        if not os.environ.get(MULTIPROCESS_DIR):
            return generate_latest(self.registry)
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry)

    def observe_batch(self, model: str, rows: int, requests: int, waited: float) -> None:
        children = self._batch_children.get(model)
        if children is None:  # label children resolved once per model: a lookup is a lock and a dict per call
            children = (self.batch_size.labels(model), self.batch_requests.labels(model), self.queue.labels(model))
            self._batch_children[model] = children
        for child, value in zip(children, (rows, requests, waited), strict=True):
            child.observe(value)
