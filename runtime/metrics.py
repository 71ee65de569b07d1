"""Prometheus metrics of kiln-serve: requests, latency, queue, batch sizes, load time and loader, intakes.

Serve path (no HTTP): counters are updated by the dataplane and the
server; /metrics renders them. With intake processes every process writes its values to
files in MULTIPROCESS_DIR (prometheus_client's multiprocess mode, chosen by the environment
variable before prometheus_client is imported) and any intake's /metrics adds them up.
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

MULTIPROCESS_DIR = "PROMETHEUS_MULTIPROC_DIR"

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "kiln_requests", "Inference requests by model and HTTP status.", ["model", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "kiln_request_duration_seconds",
            "Inference request latency.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.queue = Histogram(
            "kiln_queue_seconds",
            "Time a batch's first request waited in the queue.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "kiln_batch_size",
            "Rows per model call after dynamic batching.",
            ["model"],
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.batch_requests = Histogram(
            "kiln_batch_requests",
            "Requests merged into one model call.",
            ["model"],
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.load_seconds = Gauge(
            "kiln_model_load_seconds",
            "Seconds to load the model (before warm-up).",
            ["model", "loader"],
            registry=self.registry,
            multiprocess_mode="max",
        )
        self.loader = Gauge(
            "kiln_model_loader",
            "1 for the loader the model runs on (lean: no torch import) and why the lean one was not used.",
            ["model", "loader", "fallback"],
            registry=self.registry,
            multiprocess_mode="max",
        )
        self.warmup_seconds = Gauge(
            "kiln_model_warmup_seconds",
            "Seconds of warm-up inference.",
            ["model"],
            registry=self.registry,
            multiprocess_mode="max",
        )
        self.inflight = Gauge(
            "kiln_inflight_requests",
            "Inference requests being handled, all processes.",
            ["model"],
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self.intake_inflight = Gauge(
            "kiln_intake_inflight_requests",
            "Inference requests being handled, per intake process (pid).",
            ["model"],
            registry=self.registry,
            multiprocess_mode="liveall",
        )
        self.queue_depth = Gauge(
            "kiln_queue_depth",
            "Requests waiting for the model.",
            ["model"],
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self.intake_seconds = Histogram(
            "kiln_intake_seconds",
            "Time an intake process spent on a request: reading, checking, answering (not the model's part).",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.model_seconds = Histogram(
            "kiln_model_seconds",
            "Time a request spent in the model process: queue, batch and model call.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )

    def render(self) -> bytes:
        """The text exposition: this registry, or every process's values in multiprocess mode."""
        if not os.environ.get(MULTIPROCESS_DIR):
            return generate_latest(self.registry)
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry)

    def observe_batch(self, model: str, rows: int, requests: int, waited: float) -> None:
        self.batch_size.labels(model).observe(rows)
        self.batch_requests.labels(model).observe(requests)
        self.queue.labels(model).observe(waited)
