"""``Metrics``: the server's Prometheus metrics (``GET /metrics``), fed by the HTTP layer and the engine's hooks.

    blackmamba_requests_total{endpoint, status}       HTTP requests answered
    blackmamba_prompt_tokens_total                    prompt tokens of requests admitted to the batch
    blackmamba_prompt_tokens_computed_total           of those, to be prefilled (not from the prefix cache)
    blackmamba_generation_tokens_total                tokens generated (counted as they are)
    blackmamba_queue_depth / blackmamba_batch_size    requests waiting, sequences running (gauges)
    blackmamba_time_to_first_token_seconds            histogram, from submission to the first token
    blackmamba_inter_token_latency_seconds            histogram, between two tokens of a sequence
    blackmamba_prefix_cache_queries_total / _hits_total / blackmamba_prefix_cache_cached_tokens_total
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("blackmamba_requests", "HTTP requests answered", ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("blackmamba_prompt_tokens", "prompt tokens of requests admitted to the batch",
                                     registry=r)
        self.computed_tokens = Counter("blackmamba_prompt_tokens_computed",
                                       "prompt tokens prefilled (not from the prefix cache)", registry=r)
        self.generation_tokens = Counter("blackmamba_generation_tokens", "tokens generated", registry=r)
        self.queue_depth = Gauge("blackmamba_queue_depth", "requests waiting to run", registry=r)
        self.batch_size = Gauge("blackmamba_batch_size", "sequences running (prefilling or decoding)", registry=r)
        self.ttft = Histogram("blackmamba_time_to_first_token_seconds", "submission to first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("blackmamba_inter_token_latency_seconds", "time between two tokens of a sequence",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.cache_queries = Counter("blackmamba_prefix_cache_queries", "prefix-cache lookups", registry=r)
        self.cache_hits = Counter("blackmamba_prefix_cache_hits", "prefix-cache lookups that found a prefix",
                                  registry=r)
        self.cached_tokens = Counter("blackmamba_prefix_cache_cached_tokens", "prompt tokens taken from the cache",
                                     registry=r)

    def text(self) -> bytes:
        return generate_latest(self.registry)

    # ------------------------------------------------------------------ the engine's hooks (its thread)
    def submitted(self, waiting: int) -> None:
        self.queue_depth.set(waiting)

    def batch(self, waiting: int, running: int) -> None:
        self.queue_depth.set(waiting)
        self.batch_size.set(running)

    def admitted(self, prompt_tokens: int, computed_tokens: int) -> None:
        """A request joins the batch; ``computed_tokens`` of its prompt are to be prefilled (not cached)."""
        self.prompt_tokens.inc(prompt_tokens)
        self.computed_tokens.inc(computed_tokens)

    def prefix_lookup(self, cached_tokens: int) -> None:
        self.cache_queries.inc()
        if cached_tokens:
            self.cache_hits.inc()
            self.cached_tokens.inc(cached_tokens)

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def token(self, seconds: float | None) -> None:
        """A token generated, ``seconds`` after the previous one of its sequence (None: its first)."""
        self.generation_tokens.inc()
        if seconds is not None:
            self.itl.observe(seconds)
