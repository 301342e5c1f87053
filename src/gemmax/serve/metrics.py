"""Prometheus metrics of a language-model server (``GET /metrics``), with prometheus-client.

Every app gets its own registry, so several servers in one process (tests, a notebook) keep separate counts.
Counters and histograms are updated where things happen: the HTTP middleware counts requests by endpoint and
status, the scheduler thread reports first tokens and decoded tokens. Gauges that describe the scheduler's
state (queue depth, running slots, KV-cache use, tokens per second) are read when scraped, so they cost
nothing between scrapes.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["CONTENT_TYPE_LATEST", "ServerMetrics"]

# seconds; time to first token spans a queue wait, inter-token latency one decode step of a batch
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
RATE_WINDOW_S = 10.0  # tokens per second is the average over this trailing window


class ServerMetrics:
    """The server's metrics and the hooks that feed them. ``bind`` attaches a scheduler for the gauges."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("gemmax_requests", "HTTP requests answered, by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.request_latency = Histogram("gemmax_request_duration_seconds",
                                         "Time from a request's arrival to the end of its answer, by endpoint",
                                         ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.generated = Counter("gemmax_generated_tokens", "Tokens generated (all models and choices)",
                                 registry=r)
        self.ttft = Histogram("gemmax_time_to_first_token_seconds",
                              "Time from queueing a choice to its first generated token", buckets=TTFT_BUCKETS,
                              registry=r)
        self.itl = Histogram("gemmax_inter_token_latency_seconds",
                             "Time between a choice's consecutive tokens (a chunk's time spread over its tokens)",
                             buckets=ITL_BUCKETS, registry=r)
        self.queue = Gauge("gemmax_queue_depth", "Choices waiting for a slot", registry=r)
        self.running = Gauge("gemmax_running_slots", "Choices decoding now", registry=r)
        self.width = Gauge("gemmax_batch_width", "Rows of the decode batches (all models; follows the load)",
                           registry=r)
        self.max_slots = Gauge("gemmax_max_slots", "Most slots per model (--max-batch)", registry=r)
        self.kv_used = Gauge("gemmax_kv_cache_used_tokens", "Context positions held by running choices",
                             registry=r)
        self.kv_capacity = Gauge("gemmax_kv_cache_capacity_tokens",
                                 "Context positions the allocated KV caches hold", registry=r)
        self.kv_usage = Gauge("gemmax_kv_cache_usage_ratio", "Used over allocated KV-cache positions", registry=r)
        self.rate = Gauge("gemmax_tokens_per_second",
                          f"Generated tokens per second over the last {RATE_WINDOW_S:g} s", registry=r)
        self._recent: deque[tuple[float, int]] = deque()
        self._lock = threading.Lock()
        self.rate.set_function(self.tokens_per_second)

    def bind(self, scheduler: Any) -> None:
        """Read the gauges off ``scheduler`` at each scrape."""
        self.queue.set_function(lambda: scheduler.stats()["queued"])
        self.running.set_function(scheduler.live)
        self.max_slots.set_function(lambda: scheduler.max_batch)
        self.width.set_function(lambda: sum(scheduler.stats()["width"].values()))
        self.kv_used.set_function(lambda: scheduler.kv_tokens()[0])
        self.kv_capacity.set_function(lambda: scheduler.kv_tokens()[1])
        self.kv_usage.set_function(lambda: _ratio(*scheduler.kv_tokens()))

    # -- hooks (the scheduler thread) --
    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def tokens(self, n: int, seconds_each: float | None) -> None:
        """``n`` new tokens of one choice; ``seconds_each`` the time since its previous token over ``n``
        (None for a choice's first tokens, whose wait is the TTFT)."""
        self.generated.inc(n)
        if seconds_each is not None:
            for _ in range(n):
                self.itl.observe(seconds_each)
        now = time.monotonic()
        with self._lock:
            self._recent.append((now, n))

    def tokens_per_second(self) -> float:
        now = time.monotonic()
        with self._lock:
            while self._recent and self._recent[0][0] < now - RATE_WINDOW_S:
                self._recent.popleft()
            return sum(n for _, n in self._recent) / RATE_WINDOW_S

    # -- hooks (the HTTP middleware) --
    def request(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        self.request_latency.labels(endpoint).observe(seconds)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def _ratio(used: int, cap: int) -> float:
    return used / cap if cap else 0.0
