"""The /status document: the running configuration and every backend's state, from one
snapshot of the control state plus the shared per-host counters."""

from __future__ import annotations

from typing import Any, Literal

from gol7lb.control import Snapshot
from gol7lb.hosts import HostTable, HostTotals
from gol7lb.rules import UNMATCHED

_ZERO = HostTotals(0, 0, 0)
BackendState = Literal["up", "down", "draining", "drained", "ejected"]  # as the dashboard's STATES


def backend_state(alive: bool, drained: bool, in_flight: int,
                  ejected: bool = False) -> BackendState:
    """An operator's drain outranks health, an ejection outranks a passing check."""
    if drained:
        return "draining" if in_flight > 0 else "drained"
    if ejected:
        return "ejected"
    return "up" if alive else "down"


def backend_entries(snapshot: Snapshot, hosts: HostTable,
                    latencies: dict[str, list[float]] | None = None) -> list[dict[str, Any]]:
    pools_of: dict[str, list[str]] = {}
    for pool in snapshot.pools.values():
        for backend in pool.backends:
            pools_of.setdefault(backend.id, []).append(pool.name)
    entries = []
    settings = snapshot.settings
    for backend_id, backend in snapshot.backends().items():
        record = snapshot.health_of(backend_id)
        slot = snapshot.slots.get(backend_id)
        totals = hosts.totals(slot) if slot is not None else _ZERO
        alive = record.alive
        latency = (latencies or {}).get(backend_id)
        ejected_until = snapshot.ejected.get(backend_id)
        entries.append({
            "id": backend_id,
            "url": backend.url,
            "alive": alive,
            "weight": backend.weight,
            "state": backend_state(alive, backend_id in snapshot.drained, totals.in_flight,
                                   ejected_until is not None),
            "in_flight": totals.in_flight,
            "requests": totals.requests,
            "failures": totals.failures,
            "ejected_until": ejected_until,
            "max_connections": backend.max_connections or settings.proxy.max_connections,
            "last_check": record.last_check_dict(),
            "source": snapshot.sources.get(backend_id, "config"),
            "discovered_from": snapshot.discovered_from.get(backend_id),
            "pools": pools_of.get(backend_id, []),
            "since": record.since,
            "checks": record.checks,
            "latency": ({"p50_ms": round(latency[0], 3), "p99_ms": round(latency[1], 3)}
                        if latency else None),
        })
    return entries


def route_entries(settings: Any, counts: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    """Each route's match and rules, with its denied and rate-limited counts."""
    return [{**route.describe(), **_counted(route.label, counts)} for route in settings.routes]


def _counted(label: str, counts: dict[str, dict[str, float]]) -> dict[str, int]:
    per = counts.get(label, {})
    return {"denied": int(per.get("denied", 0)), "rate_limited": int(per.get("rate_limited", 0))}


def status_document(snapshot: Snapshot, hosts: HostTable,
                    latencies: dict[str, list[float]] | None = None,
                    route_counts: dict[str, dict[str, float]] | None = None) -> dict[str, Any]:
    settings = snapshot.settings
    counts = route_counts or {}
    return {
        "algorithm": settings.algorithm,
        "config": {"generation": snapshot.config_generation, "loaded_at": snapshot.loaded_at,
                   "last_error": snapshot.last_error, "source": settings.source},
        "pools": {name: {"algorithm": pool.algorithm, "hash_key": pool.hash_key,
                         "sticky_cookie": pool.sticky_cookie or None,
                         "backends": [b.id for b in pool.backends]}
                  for name, pool in snapshot.pools.items()},
        "routes": route_entries(settings, counts),
        # the top-level rules, for requests that match no route
        "unmatched": {"name": UNMATCHED, "rules": settings.rules.describe(),
                      "rate_limit": settings.rate_limit or None,
                      "compress": settings.compress,
                      "mirror": {"pool": settings.mirror.pool, "percent": settings.mirror.percent}
                      if settings.mirror else None,
                      **_counted(UNMATCHED, counts)},
        "rate_limits": {spec.name: spec.describe() for spec in settings.rate_limits},
        "discovery": [{"name": state.get("name"), "addresses": state.get("addresses", []),
                       "error": state.get("error"), "resolved_at": state.get("resolved_at"),
                       "checked_at": state.get("checked_at")}
                      for state in snapshot.discovery.values()],
        "health": {"type": settings.health.type, "interval": settings.health.interval,
                   "timeout": settings.health.timeout, "rise": settings.health.rise,
                   "fall": settings.health.fall},
        "backends": backend_entries(snapshot, hosts, latencies),
    }
