"""The server's Prometheus metrics, in a registry of its own (several apps in one process do not collide)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120)


class ServeMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("ivtlr_requests", "Chat completion requests, by outcome", ["status"],
                                registry=self.registry)
        self.queue_depth = Gauge("ivtlr_queue_depth", "Requests waiting for a place in the batch",
                                 registry=self.registry)
        self.active = Gauge("ivtlr_active_requests", "Requests in the running batch", registry=self.registry)
        self.occupancy = Histogram("ivtlr_batch_occupancy", "Requests advanced per engine pass",
                                   buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=self.registry)
        self.latency = Histogram("ivtlr_request_seconds", "Time from arrival to the last token",
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.first_token = Histogram("ivtlr_time_to_first_token_seconds", "Time from arrival to the first token",
                                     buckets=LATENCY_BUCKETS, registry=self.registry)
        self.tokens = Counter("ivtlr_generated_tokens", "Answer tokens generated", registry=self.registry)
        self.latent_steps = Counter("ivtlr_latent_steps", "Latent steps computed", registry=self.registry)
        self.passes = Counter("ivtlr_engine_passes", "Engine passes (ticks) run", registry=self.registry)
