"""What `GET /metrics` reports, in Prometheus's text format: requests, latencies, tokens, the engine's queue.

Counted by hand rather than with prometheus_client: a dozen series do not need
a dependency, and the engine's own counters (`Engine.stats`) are read as they
are at scrape time. Requests are labelled by route only for the routes named
in ROUTE_LABELS; any other path counts as "other", so a client probing random
paths cannot grow the number of series without bound.

The process's resident memory, now and at its peak (`process_resident_memory_bytes`,
as Prometheus's own clients name it, and `glassforge_resident_memory_peak_bytes`,
Linux only) and the cache slots free show whether large or aborted requests leave
anything behind: the soak test and docs/PERFORMANCE.md read them here.

The same figures are also given under vLLM's names (prefix `vllm:`, label
`model_name`), so that dashboards written for vLLM (Grafana's, most
autoscalers') read this server unchanged: histograms of time to first token,
inter-token latency, end-to-end latency, queue time, prefill and decode time
per request; counters of prompt and generation tokens and of finished requests
by `finished_reason`; gauges of running and waiting requests and of the KV
cache in use (the share of cache slots held). Each finished sequence is
observed once, when its request ends.
"""

from __future__ import annotations

import threading

from glassforge.serve.engine import Engine

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
TOKEN_GAP_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5)
FINISH_REASONS = ("stop", "length", "abort", "error")
ROUTE_LABELS = {"/v1/models", "/v1/completions", "/v1/chat/completions", "/v1/responses", "/v1/embeddings",
                "/v1/trace", "/tokenize", "/detokenize", "/tokenizer_info", "/health", "/metrics", "/openapi.json"}


def route_label(path: str) -> str:
    return path if path in ROUTE_LABELS else "other"


def resident_memory() -> tuple[int, int] | None:
    """This process's resident memory and its peak, in bytes (from /proc; None where there is none)."""
    try:
        with open("/proc/self/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


class Histogram:
    def __init__(self, buckets: tuple = LATENCY_BUCKETS):
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.total = 0
        self.sum = 0.0

    def observe(self, v: float) -> None:
        for i, b in enumerate(self.buckets):
            if v <= b:
                self.counts[i] += 1
        self.total += 1
        self.sum += v

    def lines(self, name: str, labels: str = "") -> list[str]:
        sep = "," if labels else ""
        out = [f'{name}_bucket{{{labels}{sep}le="{b}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        out.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.total}')
        lab = f"{{{labels}}}" if labels else ""
        out += [f"{name}_sum{lab} {self.sum:.6f}", f"{name}_count{lab} {self.total}"]
        return out


VLLM_HISTOGRAMS = (
    ("time_to_first_token_seconds", "Time from submission to the first generated token."),
    ("inter_token_latency_seconds", "Time between successive generated tokens of a sequence."),
    ("e2e_request_latency_seconds", "Time from submission to the last token."),
    ("request_queue_time_seconds", "Time a sequence waited for a cache slot."),
    ("request_prefill_time_seconds", "Time from getting a cache slot to the first token."),
    ("request_decode_time_seconds", "Time from the first token to the last."),
)


def _counter(name: str, kind: str, help_: str, value) -> list[str]:
    return [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name} {value}"]


class Metrics:
    """The server's own counters; the HTTP middleware records every request here."""

    def __init__(self, model_name: str = ""):
        self.lock = threading.Lock()
        self.model_name = model_name.replace("\\", "").replace('"', "")
        self.requests: dict[tuple[str, int], int] = {}
        self.latency: dict[str, Histogram] = {}
        self.ttft = Histogram()
        self.in_flight = 0
        # vLLM's per-request histograms and finished-request counts
        self.vllm = {name: Histogram(TOKEN_GAP_BUCKETS if name == "inter_token_latency_seconds" else LATENCY_BUCKETS)
                     for name, _ in VLLM_HISTOGRAMS}
        self.finished = {reason: 0 for reason in FINISH_REASONS}

    def record(self, route: str, status: int, seconds: float) -> None:
        with self.lock:
            self.requests[(route, status)] = self.requests.get((route, status), 0) + 1
            self.latency.setdefault(route, Histogram()).observe(seconds)

    def observe_finished(self, seqs) -> None:
        """Each sequence of a request that has ended: its times and its finish reason."""
        with self.lock:
            h = self.vllm
            for t in (s.timing for s in seqs):
                if t.first_token is not None:
                    self.ttft.observe(t.first_token - t.submitted)
                    h["time_to_first_token_seconds"].observe(t.first_token - t.submitted)
                for gap in t.token_gaps:
                    h["inter_token_latency_seconds"].observe(gap)
                end = t.finished if t.finished is not None else t.last_token
                if end is not None:
                    h["e2e_request_latency_seconds"].observe(end - t.submitted)
                if t.admitted is not None:
                    h["request_queue_time_seconds"].observe(t.admitted - t.submitted)
                    if t.first_token is not None:
                        h["request_prefill_time_seconds"].observe(t.first_token - t.admitted)
                        if end is not None:
                            h["request_decode_time_seconds"].observe(end - t.first_token)
                reason = t.finish_reason if t.finish_reason in self.finished else "abort"
                self.finished[reason] += 1

    def _vllm_lines(self, engine: Engine) -> list[str]:
        s, label = engine.stats, f'model_name="{self.model_name}"'
        lines = []
        for name, help_ in VLLM_HISTOGRAMS:
            lines += [f"# HELP vllm:{name} {help_}", f"# TYPE vllm:{name} histogram"]
            lines += self.vllm[name].lines(f"vllm:{name}", label)
        for name, help_, value in (("prompt_tokens_total", "Prompt tokens prefilled.", s["prompt_tokens"]),
                                   ("generation_tokens_total", "Tokens generated.", s["completion_tokens"]),
                                   ("prefix_cache_queries_total", "Prompt tokens looked up in the prefix cache.",
                                    s["prefix_cache_queries"]),
                                   ("prefix_cache_hits_total", "Prompt tokens the prefix cache served.",
                                    s["prefix_cache_hits"])):
            lines += [f"# HELP vllm:{name} {help_}", f"# TYPE vllm:{name} counter", f"vllm:{name}{{{label}}} {value}"]
        lines += ["# HELP vllm:request_success_total Finished requests (choices) by finish reason.",
                  "# TYPE vllm:request_success_total counter"]
        lines += [f'vllm:request_success_total{{{label},finished_reason="{r}"}} {n}' for r, n in self.finished.items()]
        slots = engine.max_batch
        for name, help_, value in (
                ("num_requests_running", "Sequences in the running batch.", engine.batch_size),
                ("num_requests_waiting", "Sequences waiting for a cache slot.", engine.queue_depth),
                ("kv_cache_usage_perc", "Share of KV-cache slots in use (0 to 1).",
                 round((slots - len(engine.free_slots)) / slots, 6) if slots else 0)):
            lines += [f"# HELP vllm:{name} {help_}", f"# TYPE vllm:{name} gauge", f"vllm:{name}{{{label}}} {value}"]
        return lines

    def render(self, engine: Engine) -> str:
        s = engine.stats
        lines = [
            "# HELP glassforge_requests_total HTTP requests by route and status.",
            "# TYPE glassforge_requests_total counter",
        ]
        with self.lock:
            for (path, status), n in sorted(self.requests.items()):
                lines.append(f'glassforge_requests_total{{route="{path}",status="{status}"}} {n}')
            lines += ["# HELP glassforge_request_duration_seconds Time from request to the last byte of the answer.",
                      "# TYPE glassforge_request_duration_seconds histogram"]
            for path, h in sorted(self.latency.items()):
                lines += h.lines("glassforge_request_duration_seconds", f'route="{path}"')
            lines += ["# HELP glassforge_time_to_first_token_seconds Time from submission to the first token.",
                      "# TYPE glassforge_time_to_first_token_seconds histogram"]
            lines += self.ttft.lines("glassforge_time_to_first_token_seconds")
        for name, kind, help_, value in (
                ("glassforge_prompt_tokens_total", "counter", "Prompt tokens prefilled.", s["prompt_tokens"]),
                ("glassforge_generation_tokens_total", "counter", "Tokens generated.", s["completion_tokens"]),
                ("glassforge_queue_depth", "gauge", "Sequences waiting for a cache slot.", engine.queue_depth),
                ("glassforge_running_sequences", "gauge", "Sequences in the running batch.", engine.batch_size),
                ("glassforge_requests_in_flight", "gauge", "HTTP requests being answered.", self.in_flight),
                ("glassforge_decode_steps_total", "counter", "Batched decode steps run.", s["decode_steps"]),
                ("glassforge_prefix_cache_hit_tokens_total", "counter",
                 "Prompt tokens whose keys and values came from the prefix cache.", s["prefix_cache_hits"]),
                ("glassforge_rejected_total", "counter", "Sequences refused because the queue was full.",
                 s["rejected"]),
                ("glassforge_cancelled_total", "counter", "Sequences cancelled by a client disconnect.",
                 s["cancelled"]),
                ("glassforge_cache_slots_free", "gauge", "Cache slots no sequence holds.", len(engine.free_slots))):
            lines += _counter(name, kind, help_, value)
        with self.lock:
            lines += self._vllm_lines(engine)
        memory = resident_memory()
        if memory is not None:
            lines += _counter("process_resident_memory_bytes", "gauge", "Resident memory size in bytes.", memory[0])
            lines += _counter("glassforge_resident_memory_peak_bytes", "gauge", "Peak resident memory in bytes.",
                              memory[1])
        return "\n".join(lines) + "\n"
