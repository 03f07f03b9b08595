"""Prometheus metrics (prometheus_client in multiprocess mode).

Every process that counts (workers, the supervisor, the master and the config watcher) writes
its own memory-mapped files in the instance's private directory (`PROMETHEUS_MULTIPROC_DIR`,
set by `rundir.prepare()` before prometheus_client is first imported); the admin listener
merges them on each scrape. Counters of a worker that died stay in its files, so totals never
go backwards. State that is already shared (liveness, in-flight, weights) is not counted
again per request: the admin listener reads it at scrape time through `BackendStateCollector`.

Why prometheus_client rather than our own exposition: the text format, the multiprocess merge
and the histogram maths are subtle, and it is what every Prometheus user already runs.
"""

from __future__ import annotations

import logging
import math
import threading
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from gol7lb.flushing import PeriodicFlush
from gol7lb.hosts import HostTable
from gol7lb.outcomes import Episode

log = logging.getLogger("gol7lb.metrics")

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0, 30.0, 60.0)
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS",
                           "TRACE", "CONNECT"})

REQUESTS = Counter("gol7lb_requests", "Requests answered, by pool, backend, status and method.",
                   ["pool", "backend", "code", "method"])
# gol7lb_request_duration_seconds is counted as two plain counters (the hits of each bucket,
# not cumulative, and the sum) that the admin listener turns into the histogram when scraped
# (`MergedCollector`): a worker then adds a batch of observations with `inc(n)`,
# which prometheus_client's Histogram has no call for.
DURATION_NAME = "gol7lb_request_duration_seconds"
DURATION_HELP = "Time from the request head to the last byte sent to the client."
_DURATION_HITS = Counter("gol7lb_request_duration_bucket_hits", "Internal: see metrics.py.",
                         ["pool", "backend", "le"])
_DURATION_SUM = Counter("gol7lb_request_duration_sum_seconds", "Internal: see metrics.py.",
                        ["pool", "backend"])
_BUCKET_LABELS = tuple(floatToGoString(b) for b in LATENCY_BUCKETS) + ("+Inf",)
HEALTH_CHECKS = Counter("gol7lb_health_checks", "Active health checks, by result.",
                        ["backend", "result"])
HEALTH_CHECK_DURATION = Histogram("gol7lb_health_check_duration_seconds",
                                  "Duration of one active health check.", ["backend"],
                                  buckets=LATENCY_BUCKETS[:12])
HELP = {
    "gol7lb_retries": "Attempts that failed and were retried on another backend, by the "
                      "backend that failed.",
    "gol7lb_backend_ejections": "Passive-health ejections.",
    "gol7lb_config_reloads": "Configuration reloads, by result.",
    "gol7lb_websocket_connections": "Open upgraded tunnels.",
    "gol7lb_tls_handshakes": "Client TLS handshakes, by result: ok, failed (a bad hello, a "
                             "refused client certificate, a client that closed), timeout "
                             "(not done within tls.handshake_timeout).",
    "gol7lb_local_errors": "Requests the LB answered 503 for lack of its own resources (no "
                           "descriptor, buffer or memory for a backend socket), by errno.",
    "gol7lb_mirror_requests": "Mirrored copies of requests (routes with mirror), by result: "
                              "ok, error, dropped (queue full), too_large (body over "
                              "proxy.retry_buffer), skipped (Expect: 100-continue body).",
    "gol7lb_denied": "Requests a route's rules refused, by route and by the rule key that "
                     "refused them (deny, allow: 403; basic_auth: 401).",
    "gol7lb_rate_limited": "Requests refused (429) by a rate limit, by route (its name, e.g. "
                           "'routes[0] path_prefix=/api/'; unmatched: no route matched).",
    "gol7lb_rate_limit_store_errors": "Requests whose rate-limit store (Redis) could not be "
                                      "asked, so on_store_error decided, by rate limit.",
}
RETRIES = Counter("gol7lb_retries", HELP["gol7lb_retries"], ["backend"])
EJECTIONS = Counter("gol7lb_backend_ejections", HELP["gol7lb_backend_ejections"], ["backend"])
CONFIG_RELOADS = Counter("gol7lb_config_reloads", HELP["gol7lb_config_reloads"], ["result"])
TLS_HANDSHAKES = Counter("gol7lb_tls_handshakes", HELP["gol7lb_tls_handshakes"], ["result"])
LOCAL_ERRORS = Counter("gol7lb_local_errors", HELP["gol7lb_local_errors"], ["reason"])
MIRROR_REQUESTS = Counter("gol7lb_mirror_requests", HELP["gol7lb_mirror_requests"], ["result"])
DENIED = Counter("gol7lb_denied", HELP["gol7lb_denied"], ["route", "reason"])
RATE_LIMITED = Counter("gol7lb_rate_limited", HELP["gol7lb_rate_limited"], ["route"])
RATE_LIMIT_STORE_ERRORS = Counter("gol7lb_rate_limit_store_errors",
                                  HELP["gol7lb_rate_limit_store_errors"], ["limit"])
WEBSOCKET_CONNECTIONS = Gauge("gol7lb_websocket_connections",
                              HELP["gol7lb_websocket_connections"], ["backend"],
                              multiprocess_mode="livesum")


class RequestRecorder:
    """Per-request counting, batched. A request adds to plain dicts in this process; the
    batch goes to prometheus_client (one `inc(n)` per series, each a lock, a pid check and a
    write to the memory-mapped file) when the process has no request open any more (so a
    scrape after the last answer sees every request, exactly) and otherwise at most
    `flush_seconds` later, from a thread. Under load that is one write per series per batch
    instead of three per request.

    Writing never raises into a request: prometheus_client opens its files (and grows their
    maps) on first use of a series, which fails when the process is out of descriptors;
    what could not be written stays in the batch for the next flush, logged once."""

    def __init__(self, flush_seconds: float = 0.1) -> None:
        self._lock = threading.Lock()
        self._open = 0
        self._requests: dict[tuple[str, str, int, str], int] = {}
        self._durations: dict[tuple[str, str], list[float]] = {}
        self._events: dict[tuple[Counter, tuple[str, ...]], int] = {}  # retries, errors...
        self._children: dict[tuple[str, str, int, str], Any] = {}
        self._hits: dict[tuple[str, str, int], Any] = {}
        self._sums: dict[tuple[str, str], Any] = {}
        self._failing = Episode()
        self._flusher = PeriodicFlush(self.flush, flush_seconds, "gol7lb-metrics")

    def begin(self) -> None:
        """A request opened (its `record` closes it)."""
        with self._lock:
            self._open += 1

    def record(self, pool: str, backend: str, code: int, method: str, seconds: float) -> None:
        bucket = bisect_left(LATENCY_BUCKETS, seconds)  # le: the first bound >= seconds
        key = (pool, backend, code, method)
        with self._lock:
            self._open = max(0, self._open - 1)
            self._requests[key] = self._requests.get(key, 0) + 1
            cells = self._durations.get((pool, backend))
            if cells is None:
                cells = self._durations[(pool, backend)] = [0.0] * (len(_BUCKET_LABELS) + 1)
            cells[bucket] += 1
            cells[-1] += seconds
            idle = self._open == 0
        if idle:
            self.flush()
        elif not self._flusher.started:
            self._flusher.ensure_started()

    def flush(self) -> None:
        """Hand what was counted since the last flush to prometheus_client."""
        with self._lock:
            if not self._requests and not self._events:
                return
            requests, self._requests = self._requests, {}
            durations, self._durations = self._durations, {}
            events, self._events = self._events, {}
        try:
            self._write(requests, durations, events)
        except Exception as e:  # EMFILE, ENOMEM...: keep the rest for the next flush
            self._keep(requests, durations, events)
            if self._failing.begins():
                log.error("metrics: cannot write the multiprocess files (%s); counts are "
                          "kept until they can be", e or type(e).__name__)

    def _write(self, requests: dict[tuple[str, str, int, str], int],
               durations: dict[tuple[str, str], list[float]],
               events: dict[tuple[Counter, tuple[str, ...]], int]) -> None:
        """Each count leaves its batch only once written, so a failure loses nothing."""
        for key in list(requests):
            child = self._children.get(key)
            if child is None:
                pool, backend, code, method = key
                label = method if method in KNOWN_METHODS else "other"
                child = REQUESTS.labels(pool, backend, str(code), label)
                if len(self._children) < 20000:
                    self._children[key] = child
            child.inc(requests.pop(key))
        for (pool, backend), cells in durations.items():
            for bucket, hits in enumerate(cells[:-1]):
                if hits:
                    hit_key = (pool, backend, bucket)
                    child = self._hits.get(hit_key)
                    if child is None:
                        child = self._hits[hit_key] = _DURATION_HITS.labels(
                            pool, backend, _BUCKET_LABELS[bucket])
                    child.inc(hits)
                    cells[bucket] = 0
            child = self._sums.get((pool, backend))
            if child is None:
                child = self._sums[(pool, backend)] = _DURATION_SUM.labels(pool, backend)
            child.inc(cells[-1])
            cells[-1] = 0.0
        for counter, labels in list(events):
            counter.labels(*labels).inc(events.pop((counter, labels)))

    def _keep(self, requests: dict[tuple[str, str, int, str], int],
              durations: dict[tuple[str, str], list[float]],
              events: dict[tuple[Counter, tuple[str, ...]], int]) -> None:
        with self._lock:
            for request, count in requests.items():
                self._requests[request] = self._requests.get(request, 0) + count
            for pair, cells in durations.items():
                mine = self._durations.setdefault(pair, [0.0] * len(cells))
                for i, value in enumerate(cells):
                    mine[i] += value
            for event, count in events.items():
                self._events[event] = self._events.get(event, 0) + count

    def _event(self, counter: Counter, *labels: str) -> None:
        with self._lock:
            key = (counter, labels)
            self._events[key] = self._events.get(key, 0) + 1

    def retry(self, backend: str) -> None:
        """An attempt on `backend` failed and the request goes to another one."""
        self._event(RETRIES, backend)

    def local_error(self, reason: str) -> None:
        """The LB answered 503 for lack of its own resources (`reason`: the errno's name)."""
        self._event(LOCAL_ERRORS, reason)

    def mirror(self, result: str) -> None:
        """A mirrored copy ended (or was never sent): from the mirror's threads too, after
        the request was counted, so the periodic flush writes it."""
        self._event(MIRROR_REQUESTS, result)
        if not self._flusher.started:
            self._flusher.ensure_started()
    def denied(self, route: str, reason: str) -> None:
        """A route's rules refused a request (`reason`: the rule key, e.g. "deny")."""
        self._event(DENIED, route, reason)

    def rate_limited(self, route: str) -> None:
        """A rate limit refused a request on `route` (its name, or "unmatched")."""
        self._event(RATE_LIMITED, route)

    def rate_limit_store_error(self, limit: str) -> None:
        """The store of rate limit `limit` could not be asked for a request."""
        self._event(RATE_LIMIT_STORE_ERRORS, limit)


def worker_exited(pid: int) -> None:
    """gunicorn's child_exit: the worker's live gauges go, its counters stay."""
    multiprocess.mark_process_dead(pid)


class BackendStateCollector:
    """`gol7lb_backend_up`, `_in_flight` and `_weight`, read from the shared state when
    scraped (so they are exact and cost the proxy nothing)."""

    def __init__(self, snapshot: Callable[[], Any], hosts: HostTable) -> None:
        self._snapshot = snapshot
        self._hosts = hosts

    def collect(self) -> Iterator[Metric]:
        snap = self._snapshot()
        up = GaugeMetricFamily("gol7lb_backend_up", "1 while active health checks pass.",
                               labels=["backend"])
        in_flight = GaugeMetricFamily("gol7lb_backend_in_flight",
                                      "Requests in flight to the backend, all workers.",
                                      labels=["backend"])
        weight = GaugeMetricFamily("gol7lb_backend_weight", "Configured weight in the pool.",
                                   labels=["pool", "backend"])
        if snap is not None:
            for backend_id in snap.backends():
                up.add_metric([backend_id], 1.0 if snap.alive(backend_id) else 0.0)
                slot = snap.slots.get(backend_id)
                in_flight.add_metric([backend_id],
                                     float(self._hosts.in_flight(slot) if slot is not None else 0))
            for pool in snap.pools.values():
                for backend in pool.backends:
                    weight.add_metric([pool.name, backend.id], float(backend.weight))
        yield from (up, in_flight, weight)


# Series a scrape shows at 0 before anything happened (Prometheus's advice: an alert on
# `increase(gol7lb_config_reloads_total{result="error"}[5m])` needs the series to exist
# before the first error). Family name: (type, sample name, label, where its values come from).
_ZERO_FILLED = {
    "gol7lb_config_reloads": ("counter", "gol7lb_config_reloads_total", "result", "results"),
    "gol7lb_retries": ("counter", "gol7lb_retries_total", "backend", "backends"),
    "gol7lb_backend_ejections": ("counter", "gol7lb_backend_ejections_total", "backend",
                                 "backends"),
    "gol7lb_websocket_connections": ("gauge", "gol7lb_websocket_connections", "backend",
                                     "backends"),
    "gol7lb_local_errors": ("counter", "gol7lb_local_errors_total", "reason", "reasons"),
}
LOCAL_ERROR_REASONS = ("emfile", "enfile", "enobufs", "enomem")  # upstream.LOCAL_ERRNOS


class MergedCollector:
    """Every process's files merged (prometheus_client's MultiProcessCollector), with the
    request-duration counters turned into the `gol7lb_request_duration_seconds` histogram
    and the contract's event counters shown at 0 for every running backend until they move."""

    def __init__(self, backend_ids: Callable[[], Iterable[str]] = tuple) -> None:
        self._merged = multiprocess.MultiProcessCollector(None)
        self._backend_ids = backend_ids

    def collect(self) -> Iterator[Metric]:
        found: dict[str, Metric] = {}
        for metric in self._histogram_built():
            if metric.name in _ZERO_FILLED:
                found[metric.name] = metric
            else:
                yield metric
        values = {"results": ("ok", "error"), "backends": tuple(self._backend_ids()),
                  "reasons": LOCAL_ERROR_REASONS}
        for name, (kind, sample, label, source) in _ZERO_FILLED.items():
            family = found.get(name) or Metric(name, HELP[name], kind)
            present = {s.labels.get(label) for s in family.samples if s.name == sample}
            for missing in (v for v in values[source] if v not in present):
                family.add_sample(sample, {label: missing}, 0.0)
            if family.samples:
                yield family

    def _histogram_built(self) -> Iterator[Metric]:
        hits: dict[tuple[str, str], dict[str, float]] = {}
        sums: dict[tuple[str, str], float] = {}
        for metric in self._merged.collect():
            if metric.name == "gol7lb_request_duration_bucket_hits":
                for sample in metric.samples:
                    if sample.name.endswith("_total"):
                        labels = (sample.labels["pool"], sample.labels["backend"])
                        per = hits.setdefault(labels, {})
                        le = sample.labels["le"]
                        per[le] = per.get(le, 0.0) + sample.value
            elif metric.name == "gol7lb_request_duration_sum_seconds":
                for sample in metric.samples:
                    if sample.name.endswith("_total"):
                        labels = (sample.labels["pool"], sample.labels["backend"])
                        sums[labels] = sums.get(labels, 0.0) + sample.value
            else:
                yield metric
        family = HistogramMetricFamily(DURATION_NAME, DURATION_HELP, labels=["pool", "backend"])
        for labels in sorted(hits.keys() | sums.keys()):
            per = hits.get(labels, {})
            running = 0.0
            buckets = []
            for le in _BUCKET_LABELS:
                running += per.get(le, 0.0)
                buckets.append((le, running))
            family.add_metric(list(labels), buckets, sum_value=sums.get(labels, 0.0))
        yield family


def scrape_registry(extra: Iterable[Any] = (),
                    backend_ids: Callable[[], Iterable[str]] = tuple) -> CollectorRegistry:
    """The admin listener's registry: every process's files merged, plus live state."""
    registry = CollectorRegistry()
    registry.register(MergedCollector(backend_ids))
    for collector in extra:
        registry.register(collector)
    return registry


def exposition(registry: CollectorRegistry) -> tuple[bytes, str]:
    return generate_latest(registry), CONTENT_TYPE_LATEST


def latency_percentiles(registry: CollectorRegistry,
                        quantiles: tuple[float, ...] = (0.5, 0.99)) -> dict[str, list[float]]:
    """Per backend, the request-duration quantiles in milliseconds, estimated from the merged
    histogram buckets by linear interpolation (as PromQL's histogram_quantile does)."""
    buckets: dict[str, dict[float, float]] = {}
    for metric in registry.collect():
        if metric.name != DURATION_NAME:
            continue
        for sample in metric.samples:
            if not sample.name.endswith("_bucket"):
                continue
            backend = sample.labels.get("backend", "")
            bound = float(sample.labels["le"])
            per = buckets.setdefault(backend, {})
            per[bound] = per.get(bound, 0.0) + sample.value
    result = {}
    for backend, per in buckets.items():
        bounds = sorted(per)
        total = per[bounds[-1]] if bounds else 0.0
        if total <= 0:
            continue
        result[backend] = [_quantile(q, bounds, per, total) * 1000 for q in quantiles]
    return result


def _quantile(q: float, bounds: list[float], counts: dict[float, float], total: float) -> float:
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for bound in bounds:
        count = counts[bound]
        if count >= rank:
            if math.isinf(bound):
                return lower_bound  # beyond the last finite bucket: its upper edge
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (
                count - lower_count)
        lower_bound, lower_count = bound, count
    return lower_bound


# Per-route counters /status and the dashboard show: family name -> the key in /status.
ROUTE_COUNTERS = {"gol7lb_denied": "denied", "gol7lb_rate_limited": "rate_limited"}


def route_counts(registry: CollectorRegistry) -> dict[str, dict[str, float]]:
    """Per route label, the totals of the per-route counters over every reason."""
    counts: dict[str, dict[str, float]] = {}
    for metric in registry.collect():
        key = ROUTE_COUNTERS.get(metric.name)
        if key is None:
            continue
        for sample in metric.samples:
            if sample.name.endswith("_total"):
                per = counts.setdefault(sample.labels.get("route", ""), {})
                per[key] = per.get(key, 0.0) + sample.value
    return counts
