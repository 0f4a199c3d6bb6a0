"""Every Prometheus metric ecserve exports, defined once. The only module that talks to
prometheus_client.

Serving metrics are ordinary histograms, counters and gauges. Routing metrics (per expert and
per MoE layer) arrive as whole tensors each step, so they are accumulated in numpy arrays and
turned into metric families only when Prometheus scrapes: per-step cost is a few vector adds,
whatever the number of layers and experts.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from ecserve.config import EXPERT_METRICS, ExpertMetrics, ModelConfig
from ecserve.config.fields import check_choice
from ecserve.types import FinishReason, MoEStats, RequestStats, StepStats

PROTOCOLS = ("grpc", "http")  # the front ends a request can come through
# Buckets suited to LLM serving: vLLM's, extended down to the millisecond steps of small
# models (and up, for long generations).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
               0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
REQUEST_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0,
                   30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
STEP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
EXPERT_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2,
                  5e-2, 0.1, 0.25)
POW2_BUCKETS = tuple(float(2**i) for i in range(14))  # 1 .. 8192 tokens


class Metrics:
    """The exporter: an EngineObserver (engine.observer = metrics) with its own registry."""

    def __init__(self, model_cfg: ModelConfig, device: str, expert_mode: ExpertMetrics = "full",
                 experts_on_device: int | None = None,
                 exchange: Callable[[], dict[int, tuple[Any, int]]] | None = None,
                 core_pid: int | None = None, kv_blocks: int = 0) -> None:
        """experts_on_device: expert weights this process holds, all MoE layers together
        (fewer than layers x experts under expert parallelism); None: all of them.
        exchange: under expert parallelism, MoE layer -> ([W, W] token rows sent src -> dst
        so far, calls), read at scrape time (ecserve.parallel.moe_ep.traffic).
        core_pid: the engine-core process, when the engine runs in one: its process_* series
        appear beside this process's, as ecserve_engine_core_process_*."""
        check_choice("expert_metrics", expert_mode, EXPERT_METRICS)
        self.registry = r = CollectorRegistry()
        self.device = device

        def hist(name: str, doc: str, buckets: Sequence[float], labels: Sequence[str] = ()
                 ) -> Histogram:
            return Histogram(name, doc, labels, buckets=buckets, registry=r)

        # Serving, as vLLM names them. Series per request carry the protocol it came through;
        # per-token and per-step series (inter-token latency, generated tokens) do not.
        per_request = ["protocol"]
        self.ttft = hist("ecserve_time_to_first_token_seconds",
                         "Arrival to first generated token.", TTFT_BUCKETS, per_request)
        self.itl = hist("ecserve_inter_token_latency_seconds",
                        "Time between a request's consecutive tokens.", ITL_BUCKETS)
        self.e2e = hist("ecserve_e2e_request_latency_seconds",
                        "Arrival to finish, per finished request.", REQUEST_BUCKETS, per_request)
        self.queue = hist("ecserve_request_queue_time_seconds",
                          "Arrival to admission (KV blocks reserved).", REQUEST_BUCKETS,
                          per_request)
        self.prefill = hist("ecserve_request_prefill_time_seconds",
                            "Admission to first token.", REQUEST_BUCKETS, per_request)
        self.decode = hist("ecserve_request_decode_time_seconds",
                           "First token to last token.", REQUEST_BUCKETS, per_request)
        self.running = Gauge("ecserve_requests_running", "Requests holding KV blocks.",
                             registry=r)
        self.waiting = Gauge("ecserve_requests_waiting", "Requests queued for admission.",
                             registry=r)
        self.kv_used = Gauge("ecserve_kv_cache_blocks_used", "KV cache blocks in use.",
                             registry=r)
        self.kv_total = Gauge("ecserve_kv_cache_capacity_blocks", "KV cache blocks in all.",
                              registry=r)
        self.kv_total.set(kv_blocks)  # known from the start, before any step
        self.kv_cached = Gauge("ecserve_kv_cache_blocks_cached", "KV cache blocks holding a "
                               "prefix-cached full block, in use or not.", registry=r)
        self.kv_evictable = Gauge("ecserve_kv_cache_blocks_evictable", "Prefix-cached KV "
                                  "blocks no request holds: reused by a matching prompt, or "
                                  "evicted (least recently used first) when blocks are needed.",
                                  registry=r)
        self.preemptions = Counter("ecserve_preemptions", "Running requests preempted, their "
                                   "KV blocks freed, to be replayed later, by reason "
                                   "(kv_cache_full: a decoding request needed a block).",
                                   ["reason"], registry=r)
        self.preemptions.labels("kv_cache_full")
        self.prefix_queries = Counter("ecserve_prefix_cache_queries", "Prompt tokens looked up "
                                      "in the prefix cache (requests whose routing can share "
                                      "KV).", registry=r)
        self.prefix_hits = Counter("ecserve_prefix_cache_hits", "Prompt tokens found in the "
                                   "prefix cache: their KV was not computed again.",
                                   registry=r)
        self.prompt_tokens = Counter("ecserve_prompt_tokens", "Prompt tokens of finished "
                                     "requests.", per_request, registry=r)
        self.generation_tokens = Counter("ecserve_generation_tokens", "Tokens generated.",
                                         registry=r)
        self.finished = Counter("ecserve_requests_finished", "Finished requests by protocol "
                                "and stop reason.", ["protocol", "reason"], registry=r)
        self.rejected = Counter("ecserve_requests_rejected", "Requests refused before they "
                                "started, by protocol and status code (gRPC's name, HTTP's "
                                "number).", ["protocol", "code"], registry=r)
        self.received = Counter("ecserve_requests_received", "Generation requests accepted, by "
                                "protocol (an OpenAI call with n choices counts n).",
                                ["protocol"], registry=r)
        for protocol in PROTOCOLS:  # every series there from the start, at 0
            self.received.labels(protocol)
            for series in (self.ttft, self.e2e, self.queue, self.prefill, self.decode,
                           self.prompt_tokens):
                series.labels(protocol)
            for reason in FinishReason:
                self.finished.labels(protocol, reason.value)
        # Steps and devices.
        self.step_time = hist("ecserve_step_duration_seconds", "Engine step wall time.",
                              STEP_BUCKETS, ["device"]).labels(device)
        self.step_tokens = hist("ecserve_step_tokens", "Tokens (decode + prefill) per step.",
                                POW2_BUCKETS)
        self.graph_steps = Counter("ecserve_decode_graph_steps", "Decode steps run by replaying "
                                   "a captured CUDA graph.", registry=r)
        self.graphs_held = Gauge("ecserve_decode_graphs", "Decode-step CUDA graphs captured "
                                 "(one per routing-group layout).", registry=r)
        # Memory, for load tests: the standard process_* series, and the peak, which they lack.
        ProcessCollector(registry=r)
        Gauge("ecserve_process_peak_rss_bytes", "Peak resident memory of the server process.",
              registry=r).set_function(_peak_rss_bytes)
        if core_pid is not None:
            ProcessCollector(namespace="ecserve_engine_core", pid=lambda: core_pid, registry=r)
            Gauge("ecserve_engine_core_peak_rss_bytes", "Peak resident memory of the engine-core "
                  "process.", registry=r).set_function(lambda: _proc_peak_rss_bytes(core_pid))
        if device.startswith("cuda"):
            import torch

            Gauge("ecserve_device_memory_peak_bytes", "Peak memory torch allocated on the "
                  "device.", ["device"], registry=r).labels(device).set_function(
                lambda: torch.cuda.max_memory_allocated(device))
        moe_layers = list(model_cfg.moe_layers or ())
        Gauge("ecserve_device_experts", "Experts placed on the device (all MoE layers).",
              ["device"], registry=r).labels(device).set(
            len(moe_layers) * model_cfg.num_experts if experts_on_device is None
            else experts_on_device)
        self.routing = RoutingCollector(moe_layers, model_cfg.num_experts,
                                        model_cfg.routing.policy, expert_mode)
        r.register(self.routing)
        if exchange is not None:
            r.register(ExchangeCollector(exchange))

    # ---------------------------------------------------------------- EngineObserver

    def step_done(self, stats: StepStats) -> None:
        self.step_time.observe(stats.seconds)
        self.step_tokens.observe(stats.num_tokens)
        for source, v in stats.time_to_first_token:
            self.ttft.labels(source).observe(v)
        for v in stats.inter_token_latency:
            self.itl.observe(v)
        self.generation_tokens.inc(len(stats.time_to_first_token) +
                                   len(stats.inter_token_latency))
        self.running.set(stats.num_running)
        self.waiting.set(stats.num_waiting)
        self.kv_used.set(stats.kv_blocks_used)
        self.kv_total.set(stats.kv_blocks_total)
        self.kv_cached.set(stats.kv_blocks_cached)
        self.kv_evictable.set(stats.kv_blocks_evictable)
        self.prefix_queries.inc(stats.prefix_queried_tokens)
        self.preemptions.labels("kv_cache_full").inc(stats.preemptions)
        self.prefix_hits.inc(stats.prefix_hit_tokens)
        self.graph_steps.inc(stats.graphed)
        self.graphs_held.set(stats.decode_graphs)
        self.routing.add(stats.moe, stats.plan.group_sizes)

    def request_done(self, stats: RequestStats) -> None:
        protocol = stats.source
        self.finished.labels(protocol, stats.finish_reason.value).inc()
        self.running.set(stats.num_running)
        self.waiting.set(stats.num_waiting)
        self.kv_used.set(stats.kv_blocks_used)
        self.kv_cached.set(stats.kv_blocks_cached)
        self.kv_evictable.set(stats.kv_blocks_evictable)
        self.prompt_tokens.labels(protocol).inc(stats.prompt_tokens)
        self.e2e.labels(protocol).observe(stats.e2e_time)
        self.queue.labels(protocol).observe(stats.queue_time)
        if stats.prefill_time is not None:
            self.prefill.labels(protocol).observe(stats.prefill_time)
        if stats.decode_time is not None:
            self.decode.labels(protocol).observe(stats.decode_time)

    # ---------------------------------------------------------------- the rest

    def reject(self, code: str, protocol: str) -> None:
        self.rejected.labels(protocol, code).inc()

    def receive(self, protocol: str, requests: int = 1) -> None:
        self.received.labels(protocol).inc(requests)

    def exposition(self) -> bytes:
        """The text format Prometheus scrapes."""
        return generate_latest(self.registry)

    def render(self, accept: str) -> tuple[bytes, str]:
        """(the scrape's body, its content type) in the format the Accept header asks:
        Prometheus' text format, or OpenMetrics."""
        encode, content_type = choose_encoder(accept)
        return encode(self.registry), content_type


def _peak_rss_bytes() -> float:
    try:
        import resource
    except ImportError:  # Windows
        return float("nan")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return float(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB else


def _proc_peak_rss_bytes(pid: int) -> float:
    """Another process's peak resident memory (Linux /proc; NaN elsewhere or once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return float(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return float("nan")


class ExchangeCollector(Collector):
    """Expert parallelism: token rows each MoE layer dispatched between ranks."""

    def __init__(self, source: Callable[[], dict[int, tuple[Any, int]]]) -> None:
        self.source = source

    def collect(self) -> Iterator[Any]:
        rows = CounterMetricFamily("ecserve_expert_parallel_rows", "Token rows the MoE layer "
                                   "sent from rank src to the owner rank dst of their experts "
                                   "(src != dst: rows that crossed devices).",
                                   labels=["layer", "src", "dst"])
        for layer, (matrix, _calls) in sorted(self.source().items()):
            for src, row in enumerate(matrix.tolist()):
                for dst, value in enumerate(row):
                    rows.add_metric([str(layer), str(src), str(dst)], float(value))
        yield rows


class RoutingCollector(Collector):
    """Per-expert and per-MoE-layer routing figures, accumulated as arrays, exported on scrape.

    Rows are MoE layers in block order; `layer` labels carry the block index.
    """

    def __init__(self, moe_layers: Sequence[int], num_experts: int, policy: str,
                 expert_mode: str) -> None:
        self.layers = list(moe_layers)
        self.row = {layer: i for i, layer in enumerate(self.layers)}
        self.policy = policy
        self.mode = expert_mode
        n, e = len(self.layers), num_experts
        self._lock = threading.Lock()
        self.tokens = np.zeros((n, e), np.int64)  # slots filled by real tokens
        self.slots = np.zeros(n, np.int64)  # slots each expert offered (equal for all experts)
        self.gate = np.zeros((n, e), np.float64)  # sum of the gates of those tokens
        self.routed = np.zeros(n, np.int64)  # tokens through the layer
        self.per_token = np.zeros((n, e + 1), np.int64)  # experts-per-token histogram
        nb = len(EXPERT_BUCKETS) + 1  # the last bucket is +Inf
        self.time_buckets = np.zeros((n, e, nb), np.int64)  # sampled expert compute times
        self.time_sum = np.zeros((n, e), np.float64)
        self.group_buckets = np.zeros(len(POW2_BUCKETS) + 1, np.int64)
        self.group_sum = 0

    def add(self, stats: Sequence[MoEStats], group_sizes: Sequence[int]) -> None:
        sizes = np.asarray(group_sizes, np.int64)
        with self._lock:
            for s in stats:
                i = self.row[s.layer]
                self.tokens[i] += s.tokens_per_expert.cpu().numpy()
                self.slots[i] += s.capacity_slots
                self.gate[i] += s.gate_sum.double().cpu().numpy()
                hist = s.experts_per_token.cpu().numpy()
                self.per_token[i] += hist
                self.routed[i] += int(hist.sum())
                if s.expert_seconds is not None:
                    secs = s.expert_seconds.numpy()
                    b = np.searchsorted(EXPERT_BUCKETS, secs, side="left")  # secs <= le
                    np.add.at(self.time_buckets[i], (np.arange(len(secs)), b), 1)
                    self.time_sum[i] += secs
            b = np.searchsorted(POW2_BUCKETS, sizes, side="left")
            np.add.at(self.group_buckets, b, 1)
            self.group_sum += int(sizes.sum())

    def collect(self) -> Iterator[Any]:
        # Build every family under the lock, yield after: the engine thread's add() must never
        # wait for an HTTP client reading the scrape.
        with self._lock:
            families = [*self._expert_families(), *self._layer_families()]
        yield from families

    def _expert_families(self) -> Iterator[Any]:
        if self.mode == "off":
            return
        full = self.mode == "full"
        labels = ["layer", "expert"] if full else ["layer"]
        tokens = CounterMetricFamily("ecserve_expert_tokens", "Tokens the expert took (capacity "
                                     "slots filled by real tokens).", labels=labels)
        slots = CounterMetricFamily("ecserve_expert_capacity_slots", "Capacity slots the expert "
                                    "offered; utilisation = tokens / slots.", labels=labels)
        gate = CounterMetricFamily("ecserve_expert_gate_weight", "Sum of the gates of the tokens "
                                   "the expert took; mean gate = gate_weight / tokens.",
                                   labels=labels)
        secs = HistogramMetricFamily("ecserve_expert_compute_seconds", "The expert's GLU on its "
                                     "tokens of a step, timed alone every Nth step.",
                                     labels=labels)
        les = [*(repr(b) for b in EXPERT_BUCKETS), "+Inf"]
        for i, layer in enumerate(self.layers):
            if full:
                for e in range(self.tokens.shape[1]):
                    key = [str(layer), str(e)]
                    tokens.add_metric(key, float(self.tokens[i, e]))
                    slots.add_metric(key, float(self.slots[i]))
                    gate.add_metric(key, float(self.gate[i, e]))
                    cum = np.cumsum(self.time_buckets[i, e])
                    secs.add_metric(key, list(zip(les, cum.astype(float), strict=True)),
                                    float(self.time_sum[i, e]))
            else:
                key = [str(layer)]
                tokens.add_metric(key, float(self.tokens[i].sum()))
                slots.add_metric(key, float(self.slots[i] * self.tokens.shape[1]))
                gate.add_metric(key, float(self.gate[i].sum()))
                cum = np.cumsum(self.time_buckets[i].sum(axis=0))
                secs.add_metric(key, list(zip(les, cum.astype(float), strict=True)),
                                float(self.time_sum[i].sum()))
        yield from (tokens, slots, gate, secs)

    def _layer_families(self) -> Iterator[Any]:
        dropped = CounterMetricFamily("ecserve_moe_dropped_tokens", "Tokens no expert chose "
                                      "(they skip the layer on the residual).", labels=["layer"])
        routed = CounterMetricFamily("ecserve_moe_routed_tokens", "Tokens routed through the "
                                     "layer.", labels=["layer"])
        per_token = HistogramMetricFamily("ecserve_moe_experts_per_token", "Experts each token "
                                          "got (0: dropped).", labels=["layer"])
        info = GaugeMetricFamily("ecserve_moe_layer_info", "MoE layers and their routing "
                                 "policy (value 1).", labels=["layer", "policy"])
        e = self.tokens.shape[1]
        les = [*(str(k) for k in range(e + 1)), "+Inf"]
        for i, layer in enumerate(self.layers):
            key = [str(layer)]
            dropped.add_metric(key, float(self.per_token[i, 0]))
            routed.add_metric(key, float(self.routed[i]))
            cum = np.cumsum(self.per_token[i]).astype(float)
            per_token.add_metric(key, list(zip(les, [*cum, cum[-1]], strict=True)),
                                 float(self.tokens[i].sum()))
            info.add_metric([str(layer), self.policy], 1.0)
        groups = HistogramMetricFamily("ecserve_routing_group_size_tokens", "Tokens per routing "
                                       "group (every MoE layer uses the step's same groups).")
        les = [*(repr(b) for b in POW2_BUCKETS), "+Inf"]
        groups.add_metric([], list(zip(les, np.cumsum(self.group_buckets).astype(float),
                                       strict=True)), float(self.group_sum))
        yield from (dropped, routed, per_token, info, groups)
