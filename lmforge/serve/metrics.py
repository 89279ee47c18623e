"""The server's Prometheus metrics (``GET /metrics``), in a registry of its own per app."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# latency buckets (seconds) from 5 ms to 60 s
LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    """Requests, tokens, queue depth, batch size, time to first token, inter-token latency."""

    def __init__(self, max_batch: int) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("lmforge_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("lmforge_prompt_tokens", "prompt tokens received",
                                     registry=r)
        self.generated_tokens = Counter("lmforge_generated_tokens", "tokens generated",
                                        registry=r)
        self.queue_depth = Gauge("lmforge_queue_depth", "requests waiting for a slot",
                                 registry=r)
        self.active = Gauge("lmforge_active_slots", "requests being decoded (batch size now)",
                            registry=r)
        self.batch_size = Histogram("lmforge_batch_size", "rows per decode step",
                                    buckets=tuple(range(1, max_batch + 1)), registry=r)
        self.ttft = Histogram("lmforge_time_to_first_token_seconds",
                              "from request arrival to its first token", buckets=LATENCY,
                              registry=r)
        self.itl = Histogram("lmforge_inter_token_latency_seconds",
                             "between consecutive tokens of a request", buckets=LATENCY,
                             registry=r)

    def step(self, queue_depth: int, active: int) -> None:
        """The scheduler's report after each step."""
        self.queue_depth.set(queue_depth)
        self.active.set(active)
        if active:
            self.batch_size.observe(active)
