"""Prometheus metrics of kiln-serve: requests, latency, queue time, batch sizes, load time.

Runtime dataplane layer (no HTTP): counters are updated by the dataplane and the
server; /metrics renders this registry.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

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
        )
        self.loader = Gauge(
            "kiln_model_loader",
            "1 for the loader the model runs on (lean: no torch import) and why the lean one was not used.",
            ["model", "loader", "fallback"],
            registry=self.registry,
        )
        self.warmup_seconds = Gauge(
            "kiln_model_warmup_seconds", "Seconds of warm-up inference.", ["model"], registry=self.registry
        )
        self.inflight = Gauge(
            "kiln_inflight_requests", "Inference requests being handled.", ["model"], registry=self.registry
        )
        self.queue_depth = Gauge(
            "kiln_queue_depth", "Requests waiting for the model.", ["model"], registry=self.registry
        )

    def observe_batch(self, model: str, rows: int, requests: int, waited: float) -> None:
        self.batch_size.labels(model).observe(rows)
        self.batch_requests.labels(model).observe(requests)
        self.queue.labels(model).observe(waited)
