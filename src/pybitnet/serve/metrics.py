"""Prometheus metrics of one server, in a registry of its own (several servers may share a process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Latency buckets in seconds: from a fast decode step on a small model to a long prefill on a large one.
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)


class ServerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.running = Gauge("pybitnet_requests_running", "choices holding a cache row", registry=r)
        self.waiting = Gauge("pybitnet_requests_waiting", "requests queued for a cache row", registry=r)
        self.finished = Counter("pybitnet_requests_finished", "requests that left the engine",
                                ["outcome"], registry=r)  # done | cancelled | error
        self.prompt_tokens = Counter("pybitnet_prompt_tokens", "prompt tokens prefilled", registry=r)
        self.generation_tokens = Counter("pybitnet_generation_tokens", "tokens generated", registry=r)
        self.time_to_first_token = Histogram("pybitnet_time_to_first_token_seconds",
                                             "from arrival to the first sampled token",
                                             buckets=_LATENCY_BUCKETS, registry=r)
        self.inter_token_latency = Histogram("pybitnet_inter_token_latency_seconds",
                                             "between consecutive tokens of one choice",
                                             buckets=_LATENCY_BUCKETS, registry=r)
        self.batch_invariant = Gauge("pybitnet_batch_invariant",
                                     "1 when outputs are checked to be independent of the batch", registry=r)
        self.batch_size = Histogram("pybitnet_batch_size", "busy rows per decode step",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        self.prompt_tokens_cached = Counter("pybitnet_prompt_tokens_cached",
                                            "prompt tokens whose K/V came from the prefix cache", registry=r)
        self.prompt_tokens_computed = Counter("pybitnet_prompt_tokens_computed",
                                              "prompt tokens run through the model", registry=r)
        self.prefix_cache_bytes = Gauge("pybitnet_prefix_cache_bytes", "K/V bytes held by the prefix cache",
                                        registry=r)
        self.prefix_cache_evictions = Counter("pybitnet_prefix_cache_evictions",
                                              "prefix-cache blocks dropped to make room", registry=r)
