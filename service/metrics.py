"""Prometheus metrics on a registry owned by the app (names: docs/metrics.md)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.metrics import MetricWrapperBase

# Milliseconds matter here: buckets from 0.5 ms to 10 s.
LATENCY_BUCKETS_S = (
    0.0005,
    0.001,
    0.002,
    0.003,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.02,
    0.03,
    0.05,
    0.075,
    0.1,
    0.15,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
# A thread hand-off takes tens of microseconds to milliseconds.
HANDOFF_BUCKETS_S = (0.00005, 0.0001, 0.00025, *LATENCY_BUCKETS_S[:10])
RATIO_BUCKETS = (0.1, 0.25, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0, 1.1, 1.25, 1.5, 2.0, 5.0)
ACCURACY_BUCKETS = tuple(round(0.05 * i, 2) for i in range(1, 21))
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
VARIANT_LABELS = ["column", "precision", "views"]
"""What names a variant in metrics (`VariantRuntime.labels`)."""


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "fractal_requests",
            "HTTP requests by endpoint and status",
            ["endpoint", "status"],
            registry=r,
        )
        self.request_duration = Histogram(
            "fractal_request_duration_seconds",
            "Request latency, arrival to response",
            ["endpoint", "column"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.request_transit = Histogram(
            "fractal_request_transit_seconds",
            "Time on the way before arrival: from a request's X-Request-Start stamp",
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.inference_duration = Histogram(
            "fractal_inference_duration_seconds",
            "One onnxruntime run",
            [*VARIANT_LABELS, "batch_size"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.inference_handoff = Histogram(
            "fractal_inference_handoff_seconds",
            "Time a run on the inference thread spent being handed over",
            ["direction"],
            buckets=HANDOFF_BUCKETS_S,
            registry=r,
        )
        self.batch_size = Histogram(
            "fractal_batch_size",
            "Images per onnxruntime run",
            VARIANT_LABELS,
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "fractal_queue_depth", "Images waiting per variant", VARIANT_LABELS, registry=r
        )
        self.deadline_outcomes = Counter(
            "fractal_deadline_outcomes",
            "Requests with a deadline by outcome",
            ["outcome"],
            registry=r,
        )
        self.deadline_ratio = Histogram(
            "fractal_deadline_ratio",
            "Latency divided by the request's deadline",
            buckets=RATIO_BUCKETS,
            registry=r,
        )
        self.column_served = Counter(
            "fractal_column_served",
            "Answers served by each variant",
            VARIANT_LABELS,
            registry=r,
        )
        self.served_accuracy = Histogram(
            "fractal_served_accuracy",
            "Manifest accuracy of the variant behind each answer",
            buckets=ACCURACY_BUCKETS,
            registry=r,
        )
        self.cascade_exits = Counter(
            "fractal_cascade_exits",
            "Cascades that stopped early, by column",
            ["column"],
            registry=r,
        )
        self.loop_lag = Histogram(
            "fractal_event_loop_lag_seconds",
            "How late the event loop ran a 5 ms timer",
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.admission_limit = Gauge(
            "fractal_admission_limit",
            "Requests with a deadline admitted at once: the learnt concurrency limit",
            registry=r,
        )
        self.admission_in_flight = Gauge(
            "fractal_admission_in_flight",
            "Requests with a deadline admitted and not yet answered",
            registry=r,
        )
        self.deadline_close_share = Gauge(
            "fractal_deadline_close_share",
            "Share of recent requests refused or answered close to their deadlines (running "
            "mean): at or above FRACTAL_TIGHT_SHARE the server gives up accuracy for time",
            registry=r,
        )
        self.model_info = Info("fractal_model", "The model being served", registry=r)
        self.ready = Gauge("fractal_ready", "1 when the server reports ready", registry=r)
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        for outcome in ("met", "missed", "shed"):
            self.deadline_outcomes.labels(outcome)

    def child(self, metric: MetricWrapperBase, *values: str) -> Any:
        """`metric.labels(*values)`, remembered: prometheus_client takes a lock and checks
        the names on every call, which adds up on the per-request path. Label values here
        come from small sets (endpoints, statuses, columns, batch sizes)."""
        key = (id(metric), values)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*values)
        return found
