"""Prometheus metrics of the server (its own registry, exported at /metrics)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class ServerMetrics:
    """Counters, histograms and gauges; one instance per app."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "chitu_requests",
            "HTTP API requests by endpoint and status",
            ["endpoint", "status"],
            registry=r,
        )
        self.prompt_tokens = Counter("chitu_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter("chitu_generation_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram(
            "chitu_time_to_first_token_seconds",
            "Time to first token",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inter_token = Histogram(
            "chitu_inter_token_latency_seconds",
            "Time between output tokens",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.running = Gauge(
            "chitu_num_requests_running", "Sequences in the running batch", registry=r
        )
        self.waiting = Gauge(
            "chitu_num_requests_waiting", "Sequences waiting for KV blocks", registry=r
        )
        self.kv_used = Gauge("chitu_kv_blocks_used", "KV-cache blocks in use", registry=r)
        self.kv_free = Gauge(
            "chitu_kv_blocks_free",
            "KV-cache blocks allocatable (free, or cached with no owner and evictable)",
            registry=r,
        )
        self.kv_cached = Gauge(
            "chitu_kv_blocks_cached",
            "KV-cache blocks with no owner that keep a reusable prefix until evicted",
            registry=r,
        )
        self.prefix_cache_queries = Counter(
            "chitu_prefix_cache_queries",
            "Tokens of admitted sequences looked up in the prefix cache",
            registry=r,
        )
        self.prefix_cache_hits = Counter(
            "chitu_prefix_cache_hits",
            "Tokens of admitted sequences found in the prefix cache (not computed)",
            registry=r,
        )
        self.step_errors = Counter(
            "chitu_engine_step_errors", "Engine steps that raised", registry=r
        )


class RequestCounter:
    """ASGI middleware counting /v1/ requests by path and response status."""

    def __init__(self, app, counter: Counter) -> None:
        self.app, self.counter = app, counter

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, send)

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.counter.labels(scope["path"], str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)
