"""Prometheus metrics of an AsyncLLM, in a registry of its own (several engines in one process
never share counters). The engine thread records them; GET /metrics renders them."""
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3,
               0.4, 0.5, 0.75, 1.0, 2.5)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0)


class EngineMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.running = Gauge("pagedlm_num_requests_running", "Requests with a sample in the running batch",
                             registry=r)
        self.waiting = Gauge("pagedlm_num_requests_waiting", "Requests queued, not yet admitted", registry=r)
        self.kv_usage = Gauge("pagedlm_kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0 to 1)",
                              registry=r)
        self.preemptions = Gauge("pagedlm_num_preemptions", "Sequences preempted so far (recomputed later)",
                                 registry=r)
        self.prompt_tokens = Counter("pagedlm_prompt_tokens", "Prompt tokens of admitted requests", registry=r)
        self.generation_tokens = Counter("pagedlm_generation_tokens", "Tokens generated", registry=r)
        self.finished = Counter("pagedlm_request_success", "Requests finished, by finish reason",
                                ["finished_reason"], registry=r)
        self.ttft = Histogram("pagedlm_time_to_first_token_seconds", "From arrival to the first token",
                              buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("pagedlm_inter_token_latency_seconds", "Between successive tokens of a sample",
                             buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("pagedlm_e2e_request_latency_seconds", "From arrival to the last token",
                             buckets=E2E_BUCKETS, registry=r)

    def render(self):
        return generate_latest(self.registry)
