"""Prometheus metrics, one registry per app (no process-wide state), served at ``/metrics``.

Counters and histograms are updated where things happen; the kernel pool and the
session gauges are read from the pool and the runtime at scrape time.

=========================================  =========  ==========================================
name                                       type       labels
=========================================  =========  ==========================================
cablectl_requests_total                    counter    model, status
cablectl_request_duration_seconds          histogram  model (whole response, stream included)
cablectl_upstream_duration_seconds         histogram  model (time waiting on the model)
cablectl_overhead_duration_seconds         histogram  model (the proxy's own time)
cablectl_kernels                           gauge      state: idle, busy, starting
cablectl_kernel_acquire_wait_seconds       histogram  (time a session waited for a kernel)
cablectl_kernels_started_total             counter
cablectl_kernels_replaced_dead_total       counter
cablectl_sessions_active                   gauge      (sessions holding a kernel on this replica)
cablectl_generations_total                 counter    model, grammar (inner model calls)
cablectl_grammar_repairs_total             counter    model, outcome: repaired, failed
cablectl_grammar_ignored_total             counter    model (replies not in the grammar sent)
cablectl_session_replays_total             counter    reason, cause (see proxy.actions.runtime)
cablectl_session_forwards_total            counter    outcome: sent, unreachable, received
cablectl_tool_calls_total                  counter    kind: client, server
cablectl_actions_total                     counter    path: static, kernel
=========================================  =========  ==========================================
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from proxy.kernels import PoolStats

__all__ = ["CONTENT_TYPE", "Metrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# latency buckets from 0.5 ms (proxy overhead) to 2 minutes (a long local generation)
_LATENCY = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_WAIT = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30)


class _LiveCollector(Collector):
    """Pool and session gauges, read when scraped."""

    def __init__(self, pool_stats: Callable[[], PoolStats], active_sessions: Callable[[], int]) -> None:
        self.pool_stats = pool_stats
        self.active_sessions = active_sessions

    def collect(self) -> Iterable[Metric]:
        stats = self.pool_stats()
        kernels = GaugeMetricFamily("cablectl_kernels", "Kernels in the pool, by state", labels=["state"])
        for state in ("idle", "busy", "starting"):
            kernels.add_metric([state], getattr(stats, state))
        yield kernels
        yield CounterMetricFamily(
            "cablectl_kernels_started", "Kernels started since the proxy started", value=stats.started_total
        )
        yield CounterMetricFamily(
            "cablectl_kernels_replaced_dead", "Kernels found dead and replaced", value=stats.replaced_dead
        )
        yield GaugeMetricFamily(
            "cablectl_sessions_active",
            "Sessions holding a kernel on this replica",
            value=self.active_sessions(),
        )


class Metrics:
    """``known_models``: the route names; any other ``model`` a client sends is counted as
    ``unknown``, so clients cannot grow the label set."""

    def __init__(self, known_models: Iterable[str] = ()) -> None:
        self.known_models = frozenset(known_models)
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "cablectl_requests",
            "Requests answered, by model, HTTP status and API surface",
            ["model", "status", "surface"],
            registry=r,
        )
        self.total = Histogram(
            "cablectl_request_duration_seconds",
            "Whole request latency",
            ["model"],
            buckets=_LATENCY,
            registry=r,
        )
        self.upstream = Histogram(
            "cablectl_upstream_duration_seconds",
            "Time spent waiting on the model",
            ["model"],
            buckets=_LATENCY,
            registry=r,
        )
        self.overhead = Histogram(
            "cablectl_overhead_duration_seconds",
            "The proxy's own time: total less upstream",
            ["model"],
            buckets=_LATENCY,
            registry=r,
        )
        self.acquire_wait = Histogram(
            "cablectl_kernel_acquire_wait_seconds",
            "Time a session waited for a kernel from the pool",
            buckets=_WAIT,
            registry=r,
        )
        self.generations = Counter(
            "cablectl_generations", "Inner model calls of the action loop", ["model", "grammar"], registry=r
        )
        self.repairs = Counter(
            "cablectl_grammar_repairs",
            "Replies sent back to the model to fix, by outcome",
            ["model", "outcome"],
            registry=r,
        )
        self.grammar_ignored = Counter(
            "cablectl_grammar_ignored",
            "Replies of a server that was sent a grammar but did not keep to it (it failed open)",
            ["model"],
            registry=r,
        )
        self.replays = Counter(
            "cablectl_session_replays",
            "Sessions whose log was replayed onto a fresh kernel, by reason and cause",
            ["reason", "cause"],
            registry=r,
        )
        self.forwards = Counter(
            "cablectl_session_forwards",
            "Requests for a session held by another replica, by outcome: sent there, its "
            "replica unreachable (replayed here), received from another replica",
            ["outcome"],
            registry=r,
        )
        self.tool_calls = Counter(
            "cablectl_tool_calls", "Tool calls made by programs, by kind", ["kind"], registry=r
        )
        self.actions = Counter(
            "cablectl_actions", "Code actions, by path (static tool_calls or kernel)", ["path"], registry=r
        )

    def watch(self, pool_stats: Callable[[], PoolStats], active_sessions: Callable[[], int]) -> None:
        self.registry.register(_LiveCollector(pool_stats, active_sessions))

    def observe_request(
        self, model: str | None, status: int, total_s: float, upstream_s: float, surface: str | None = None
    ) -> None:
        label = model if model in self.known_models else ("-" if model is None else "unknown")
        self.requests.labels(label, str(status), surface or "-").inc()
        self.total.labels(label).observe(total_s)
        self.upstream.labels(label).observe(upstream_s)
        self.overhead.labels(label).observe(max(0.0, total_s - upstream_s))

    def render(self) -> bytes:
        return generate_latest(self.registry)
