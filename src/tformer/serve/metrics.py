"""Prometheus metrics of one server (its own registry, so several apps can live in one process).

    tformer_http_requests_total{route, status}          every HTTP request, by route and status code
    tformer_prompt_tokens_total{model}                  prompt tokens of accepted requests (each choice's)
    tformer_generation_tokens_total{model}              tokens generated
    tformer_request_finished_total{model, reason}       sequences ended: stop, length, abort
    tformer_time_to_first_token_seconds{model}          request arrival to its first token (histogram)
    tformer_inter_token_latency_seconds{model}          between consecutive tokens of a sequence (histogram)
    tformer_e2e_request_latency_seconds{model}          request arrival to its last token (histogram)
    tformer_engine_<stat>{model}                        ServeEngine.stats() at scrape time: running, waiting,
                                                        blocks_used, blocks_total, prefix_hit_tokens, ...
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

# latency buckets in seconds: a CPU test model's tokens take ms, a long prefill on a big model seconds
TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 20, 40)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.04, 0.05, 0.075, 0.1, 0.25, 0.5, 1, 2.5)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)

ENGINE_HELP = {
    "running": "requests in the running batch",
    "waiting": "requests queued for admission",
    "blocks_used": "KV cache blocks held by requests",
    "blocks_total": "KV cache blocks in the pool",
    "prefix_hit_tokens": "prompt tokens whose KV came from the prefix cache (since start)",
    "prompt_tokens": "prompt tokens looked up in the prefix cache (since start)",
}


class Metrics:
    """The server's metrics; `engines` maps a model name to its ServeEngine (read at scrape time)."""

    def __init__(self, engines: dict):
        self.registry = registry = CollectorRegistry()
        self.http = Counter("tformer_http_requests", "HTTP requests by route and status code",
                            ["route", "status"], registry=registry)
        self.prompt_tokens = Counter("tformer_prompt_tokens", "prompt tokens of accepted requests",
                                     ["model"], registry=registry)
        self.generation_tokens = Counter("tformer_generation_tokens", "tokens generated", ["model"],
                                         registry=registry)
        self.finished = Counter("tformer_request_finished", "sequences ended, by finish reason",
                                ["model", "reason"], registry=registry)
        self.ttft = Histogram("tformer_time_to_first_token_seconds", "request arrival to its first token",
                              ["model"], buckets=TTFT_BUCKETS, registry=registry)
        self.itl = Histogram("tformer_inter_token_latency_seconds", "time between consecutive tokens",
                             ["model"], buckets=ITL_BUCKETS, registry=registry)
        self.e2e = Histogram("tformer_e2e_request_latency_seconds", "request arrival to its last token",
                             ["model"], buckets=E2E_BUCKETS, registry=registry)
        registry.register(_EngineStats(engines))

    def exposition(self) -> bytes:
        """The text format /metrics answers with."""
        return generate_latest(self.registry)


class _EngineStats:
    """A collector: each engine's numeric stats() as gauges, labelled by model."""

    def __init__(self, engines: dict):
        self.engines = engines

    def collect(self):
        families: dict[str, GaugeMetricFamily] = {}
        for model, engine in self.engines.items():
            for key, value in engine.stats().items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    if key not in families:
                        families[key] = GaugeMetricFamily(f"tformer_engine_{key}",
                                                          ENGINE_HELP.get(key, f"engine stat {key}"),
                                                          labels=["model"])
                    families[key].add_metric([model], float(value))
        yield from families.values()

    def describe(self):
        return []  # the stats' names are known only at scrape time
