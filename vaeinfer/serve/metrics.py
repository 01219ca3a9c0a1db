"""Prometheus metrics of one server (its own registry, so that several apps in one process,
as in the tests, do not share counters). With `--workers N` each worker process counts its own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class Metrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("vaeinfer_requests", "HTTP requests answered", ["model", "op", "status"], registry=r)
        self.errors = Counter("vaeinfer_errors", "requests answered with an error, by status and cause",
                              ["model", "op", "status", "error"], registry=r)
        self.latency = Histogram("vaeinfer_request_seconds", "time from request to response", ["model", "op"],
                                 buckets=(.001, .002, .005, .01, .02, .05, .1, .2, .5, 1, 2, 5, 10, 30), registry=r)
        self.batch_rows = Histogram("vaeinfer_batch_rows", "rows per onnxruntime call formed by the batcher",
                                    ["model", "op"], buckets=_ROWS, registry=r)
        self.batch_requests = Histogram("vaeinfer_batch_requests", "requests merged into one call",
                                        ["model", "op"], buckets=_ROWS, registry=r)
        self.in_flight = Gauge("vaeinfer_in_flight", "requests admitted and not yet answered", registry=r)
        self.rejected = Counter("vaeinfer_rejected", "requests refused with 503 because the queue was full",
                                registry=r)

    def on_batch(self, model: str, op: str):
        rows, requests = self.batch_rows.labels(model, op), self.batch_requests.labels(model, op)

        def observe(n_rows: int, n_requests: int) -> None:
            rows.observe(n_rows)
            requests.observe(n_requests)
        return observe

    def render(self) -> bytes:
        return generate_latest(self.registry)
