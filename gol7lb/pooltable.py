"""What a worker serves from for one generation of the shared state: the compiled routes, each
pool's policy over the backends that may take requests, sticky-cookie values, effective
weights while a backend ramps up (slow start), and the worker's keep-alive sockets by address.

Built once per generation (never per request); while a backend ramps, rebuilt from the same
snapshot once a second without any IPC. Requests in flight keep the table they started with.
"""

from __future__ import annotations

import math
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from gol7lb import logfmt, upstreamtls
from gol7lb.backends import Backend
from gol7lb.balancer import Policy, make_policy, pool_sticky_secret, sticky_key
from gol7lb.compress import Compression
from gol7lb.config import Settings
from gol7lb.control import Snapshot
from gol7lb.counters import rotation_cell
from gol7lb.headers import ForwardedPolicy
from gol7lb.hosts import PoolPeers
from gol7lb.pools import DEFAULT_POOL, Pool, Route
from gol7lb.ratelimit import RouteLimits, compile_limits
from gol7lb.routing import Router
from gol7lb.rules import UNMATCHED
from gol7lb.upstream import IdleConnections

RAMP_SCALE = 10  # weights are multiplied by this while some backend of the pool ramps up
RAMP_REBUILD_SECONDS = 1.0


@dataclass
class PoolRuntime:
    """One pool as a worker serves it."""

    config: Pool  # the pool as configured
    policy: Policy
    available: frozenset[str]
    limits: dict[str, int]  # backend id -> max_connections over all workers (0: none)
    rotation: int  # this pool's rotation cell in SharedCounters (its tickets)
    sticky_values: dict[str, str] = field(default_factory=dict)  # cookie value -> backend id
    sticky_by_id: dict[str, str] = field(default_factory=dict)  # backend id -> cookie value
    by_id: dict[str, Backend] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.config.name


@dataclass
class PoolTable:
    snapshot: Snapshot
    settings: Settings
    router: Router
    pools: dict[str, PoolRuntime]
    connections: dict[str, IdleConnections]  # backend id -> this worker's keep-alive sockets
    slots: dict[str, int]  # backend id -> host slot (in flight, requests, failures)
    retry_after: str
    forwarded: ForwardedPolicy  # proxy.forwarded and proxy.trusted_proxies
    limits: RouteLimits  # rate limits: limits.by_route[Match.index] (-1: no route matched)
    rebuild_at: float = math.inf  # monotonic time of the next slow-start step
    compression: Compression | None = None  # [compression], when a route has compress

    def peers(self, backend_id: str) -> list[PoolPeers]:
        """The host slots of every pool holding the backend, for passive health's
        max_ejected_percent (worked out when a failure streak completes: rarely)."""
        slots = self.slots
        return [PoolPeers(tuple(slots[b.id] for b in runtime.config.backends if b.id in slots),
                          tuple(slots[i] for i in runtime.available if i in slots))
                for runtime in self.pools.values() if backend_id in runtime.by_id]


def ramp_factor(snapshot: Snapshot, backend_id: str, slow_start: float, now: float) -> float:
    """1.0, or the share of its weight a backend that came back recently (up again, newly
    added and checked, or ejection over) gets (>= 0.1); one up since the start gets it all."""
    if slow_start <= 0:
        return 1.0
    up_since = snapshot.health_of(backend_id).up_since
    came_back = max(up_since, snapshot.ejection_ended.get(backend_id, 0.0))
    elapsed = now - came_back
    if not came_back or elapsed >= slow_start:
        return 1.0
    return max(0.1, elapsed / slow_start)


def available_ids(snapshot: Snapshot, now: float) -> frozenset[str]:
    """Up, not drained, not ejected."""
    return frozenset(
        backend_id for backend_id in snapshot.backends()
        if snapshot.alive(backend_id) and backend_id not in snapshot.drained
        and snapshot.ejected.get(backend_id, 0.0) <= now)


def build_table(snapshot: Snapshot, previous: PoolTable | None) -> PoolTable:
    settings = snapshot.settings
    logfmt.apply(settings.log)
    now = time.time()
    available = available_ids(snapshot, now)
    old = previous.connections if previous else {}
    connections: dict[str, IdleConnections] = {}
    pools = {}
    ramping = False
    tls = _tls_context(snapshot)
    for index, (name, pool) in enumerate(snapshot.pools.items()):
        for backend in pool.backends:
            if backend.id not in connections:
                connections[backend.id] = _connections_for(
                    backend, settings, old.get(backend.id), tls if backend.tls else None)
        pool_available = frozenset(b.id for b in pool.backends if b.id in available)
        factors = {b.id: ramp_factor(snapshot, b.id, settings.health.slow_start, now)
                   for b in pool.backends}
        weights: Mapping[str, int] | None = None
        if any(f < 1.0 for f in factors.values()):
            ramping = True
            weights = {b.id: max(1, round(b.weight * RAMP_SCALE * factors[b.id]))
                       for b in pool.backends}
        runtime = PoolRuntime(
            pool, make_policy(pool.algorithm, pool.backends, pool_available, weights),
            pool_available,
            {b.id: b.max_connections or settings.proxy.max_connections for b in pool.backends},
            # Without the Manager's slots (the start-up fallback), the order it assigns first.
            rotation_cell(snapshot.pool_slots.get(name, index)),
            by_id={b.id: b for b in pool.backends})
        if pool.sticky_cookie:
            secret = pool_sticky_secret(settings.sticky_secret, pool)
            runtime.sticky_by_id = {b.id: sticky_key(secret, pool.name, b.id)
                                    for b in pool.backends}
            runtime.sticky_values = {v: k for k, v in runtime.sticky_by_id.items()}
        pools[name] = runtime
    for backend_id, idle in old.items():
        if backend_id not in connections:
            idle.retire()  # idle sockets close now, busy ones when their request ends
    return PoolTable(
        snapshot, settings, Router(settings.routes, list(snapshot.pools), settings.rules,
                                   _unmatched(settings)),
        pools, connections,
        dict(snapshot.slots), str(max(1, math.ceil(settings.health.interval))),
        _forwarded_policy(settings, previous),
        compile_limits(settings.rate_limits, settings.routes, settings.rate_limit,
                       previous.limits if previous else None),
        rebuild_at=time.monotonic() + RAMP_REBUILD_SECONDS if ramping else math.inf,
        compression=_compression(settings, previous))


def _unmatched(settings: Settings) -> Route | None:
    """The top-level compress and mirror as the route of requests that match no route."""
    if not settings.compress and settings.mirror is None:
        return None
    return Route(DEFAULT_POOL, compress=settings.compress, mirror=settings.mirror,
                 label=UNMATCHED)


def _compression(settings: Settings, previous: PoolTable | None) -> Compression | None:
    """Built when some route compresses; kept across generations while [compression] is
    unchanged (it caches its choice per Accept-Encoding value)."""
    if not settings.compress and not any(route.compress for route in settings.routes):
        return None
    if previous is not None and previous.compression is not None and \
            previous.settings.compression == settings.compression:
        return previous.compression
    return Compression(settings.compression)


def _forwarded_policy(settings: Settings, previous: PoolTable | None) -> ForwardedPolicy:
    """Kept across generations while unchanged: it caches its verdict per client address."""
    proxy = settings.proxy
    if previous is not None and (previous.settings.proxy.forwarded,
                                 previous.settings.proxy.trusted_proxies) == (
            proxy.forwarded, proxy.trusted_proxies):
        return previous.forwarded
    return ForwardedPolicy(proxy.forwarded, proxy.trusted_proxies)


def _tls_context(snapshot: Snapshot) -> ssl.SSLContext | None:
    """The configuration's context for https:// backends (one object while the settings and
    files are unchanged), or None when no backend needs one."""
    if not any(b.tls for pool in snapshot.pools.values() for b in pool.backends):
        return None
    return upstreamtls.context(snapshot.settings.proxy)


def _connections_for(backend: Backend, settings: Settings, existing: IdleConnections | None,
                     tls: ssl.SSLContext | None) -> IdleConnections:
    connect, read = settings.proxy.connect_timeout, settings.proxy.read_timeout
    if existing is None:
        return IdleConnections(backend, connect, read, tls)
    existing.configure(backend, connect, read, tls)
    return existing
