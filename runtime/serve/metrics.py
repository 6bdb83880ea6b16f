"""The server's Prometheus metrics (`GET /metrics`, text format), through prometheus_client, one registry per app.

    nanogpt_requests_total{route, status}          requests answered (every route, every status)
    nanogpt_prompt_tokens_total                    prompt tokens of the completions requests
    nanogpt_generation_tokens_total                tokens generated
    nanogpt_time_to_first_token_seconds            arrival -> first generated token (queueing included)
    nanogpt_time_per_output_token_seconds          between two tokens of one request, as its client sees them
    nanogpt_request_duration_seconds{route}        arrival -> last byte of the response
    nanogpt_queue_depth, nanogpt_running_rows      requests waiting, rows generating (read when scraped)
    nanogpt_batch_size                             rows in each step the scheduler runs

Names follow vLLM's where they have one (`vllm:time_to_first_token_seconds` ...), under this project's prefix.
"""
from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0,
                   20.0, 40.0, 80.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


class Metrics:
    """The instruments of one server (a registry of its own: several apps in one process do not collide)."""

    def __init__(self, scheduler):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("nanogpt_requests", "HTTP requests answered, by route and status",
                                ["route", "status"], registry=r)
        self.prompt_tokens = Counter("nanogpt_prompt_tokens", "prompt tokens of completion requests", registry=r)
        self.generation_tokens = Counter("nanogpt_generation_tokens", "tokens generated", registry=r)
        self.ttft = Histogram("nanogpt_time_to_first_token_seconds", "arrival to first generated token, queueing "
                              "included", buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("nanogpt_time_per_output_token_seconds", "time between two generated tokens of a request",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.duration = Histogram("nanogpt_request_duration_seconds", "arrival to the response's last byte",
                                  ["route"], buckets=LATENCY_BUCKETS, registry=r)
        Gauge("nanogpt_queue_depth", "requests waiting for a batch", registry=r).set_function(lambda: scheduler.queued)
        Gauge("nanogpt_running_rows", "rows generating now", registry=r).set_function(lambda: scheduler.running_rows)
        self.batch = Histogram("nanogpt_batch_size", "rows in each step the scheduler runs", buckets=BATCH_BUCKETS,
                               registry=r)

    def observe_request(self, record) -> None:
        """Count one finished request (a logs.RequestRecord)."""
        self.requests.labels(record.route, str(record.status)).inc()
        self.duration.labels(record.route).observe(record.total_s)
        self.prompt_tokens.inc(record.prompt_tokens)
        self.generation_tokens.inc(record.completion_tokens)

    def render(self) -> tuple[bytes, str]:
        """The text exposition and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
