"""Selection policies: pure functions of (healthy backends, a ticket) -> the order to try them.

A policy is built once per liveness change (not per request) and then only indexes into
precomputed tuples, so the per-request cost is a modulo and a tuple lookup.
"""

from __future__ import annotations

import bisect
import itertools
import math
import random
from collections.abc import Callable, Sequence
from typing import Protocol

from gol7lb.backends import Backend


class Policy(Protocol):
    def order(self, ticket: int) -> Sequence[Backend]:
        """Backends to try for one request: the chosen one first, then the fallbacks."""
        ...


def smooth_weighted_schedule(backends: Sequence[Backend]) -> tuple[int, ...]:
    """nginx's smooth weighted round robin, unrolled into one cycle of backend indexes.

    Weights 5,1,1 give a,a,b,a,c,a,a rather than a,a,a,a,a,b,c, so a heavy backend's share is
    spread out. Weights are reduced by their gcd to keep the cycle short.
    """
    if not backends:
        return ()
    divisor = math.gcd(*(b.weight for b in backends))
    weights = [b.weight // divisor for b in backends]
    total = sum(weights)
    current = [0] * len(weights)
    schedule = []
    for _ in range(total):
        for i, w in enumerate(weights):
            current[i] += w
        best = max(range(len(weights)), key=lambda i: current[i])
        current[best] -= total
        schedule.append(best)
    return tuple(schedule)


def _fallback_orders(backends: Sequence[Backend]) -> tuple[tuple[Backend, ...], ...]:
    """For each backend, itself followed by the others in configured order after it."""
    n = len(backends)
    return tuple(tuple(backends[(i + k) % n] for k in range(n)) for i in range(n))


class RoundRobinPolicy:
    """Weighted round robin driven by a ticket that all workers draw from one shared counter."""

    def __init__(self, healthy: Sequence[Backend]) -> None:
        self.backends = tuple(healthy)
        self._schedule = smooth_weighted_schedule(self.backends)
        self._orders = _fallback_orders(self.backends)

    def order(self, ticket: int) -> Sequence[Backend]:
        if not self._schedule:
            return ()
        return self._orders[self._schedule[ticket % len(self._schedule)]]


class RandomPolicy:
    """Weighted random choice; the ticket is ignored, so no shared counter is touched."""

    def __init__(self, healthy: Sequence[Backend],
                 rng: Callable[[], float] = random.random) -> None:
        self.backends = tuple(healthy)
        self._cumulative = tuple(itertools.accumulate(b.weight for b in self.backends))
        self._orders = _fallback_orders(self.backends)
        self._rng = rng

    def order(self, ticket: int) -> Sequence[Backend]:
        if not self._cumulative:
            return ()
        point = self._rng() * self._cumulative[-1]
        return self._orders[bisect.bisect_right(self._cumulative, point)]


POLICIES: dict[str, Callable[[Sequence[Backend]], Policy]] = {
    "round_robin": RoundRobinPolicy,
    "random": RandomPolicy,
}


def make_policy(algorithm: str, healthy: Sequence[Backend]) -> Policy:
    return POLICIES[algorithm](healthy)


def next_peer(backends: Sequence[Backend], alive: Sequence[bool], ticket: int) -> Backend | None:
    """The seed project's GetNextPeer: the ticket-th healthy backend in rotation, or None."""
    healthy = [b for b, up in zip(backends, alive, strict=True) if up]
    order = RoundRobinPolicy(healthy).order(ticket)
    return order[0] if order else None
