"""Selection policies: pure functions of (a pool's backends, a pick context) -> the order to try.

A policy is built once per state change (liveness, drain, ejection, weight ramp, reload), not
per request: everything that does not depend on the request is precomputed into tuples, so
`order()` costs an index, a bisect or a short scan, and returns a tuple it did not allocate.
Nothing here does I/O or touches shared state: the proxy passes the ticket, the in-flight
counts and the request's hash key in a `PickContext`.
"""

from __future__ import annotations

import base64
import bisect
import functools
import hashlib
import hmac
import itertools
import math
import random
import struct
from array import array
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypeGuard, get_args

from gol7lb.backends import Backend
from gol7lb.pools import Pool


@dataclass(slots=True)  # not frozen: a frozen dataclass's __init__ costs ~1 us per request
class PickContext:
    """What one request brings to a pick; each policy reads only what its `uses_*` flags say."""

    ticket: int = 0  # from the shared rotation counter
    in_flight: Callable[[str], int] = lambda backend_id: 0  # over all workers, by backend id
    key: bytes | None = None  # consistent_hash: the request's hash key
    rng: random.Random | None = None  # random/power_of_two; None: the module's generator



class Policy(Protocol):
    uses_ticket: bool  # True when order() reads ctx.ticket (the proxy then draws one)
    uses_in_flight: bool  # True when order() calls ctx.in_flight

    def order(self, ctx: PickContext) -> Sequence[Backend]:
        """Available backends to try for one request: the chosen one first, then every other
        available backend once, as fallbacks (retries go down this list)."""
        ...


# -- shared building blocks -------------------------------------------------------------------

ROTATIONS_PRECOMPUTED = 128  # up to this many backends, every rotation is a ready tuple


class Rotations(Protocol):
    """What a policy reads of its rotations: rotation i by index (0 <= i < len), and len."""

    def __getitem__(self, i: int, /) -> tuple[Backend, ...]: ...

    def __len__(self) -> int: ...


class _SlicedRotations:
    """Rotation i of a large pool as one slice of the doubled tuple: n allocations of n
    references per request beat n*n references held per policy when n is in the hundreds."""

    __slots__ = ("_doubled", "_n")

    def __init__(self, backends: tuple[Backend, ...]) -> None:
        self._doubled = backends + backends
        self._n = len(backends)

    def __getitem__(self, i: int) -> tuple[Backend, ...]:
        return self._doubled[i:i + self._n]

    def __len__(self) -> int:
        return self._n


def _rotations(backends: tuple[Backend, ...]) -> Rotations:
    """For each backend, itself followed by the others in configured order after it."""
    n = len(backends)
    if n > ROTATIONS_PRECOMPUTED:
        return _SlicedRotations(backends)
    return tuple(tuple(backends[(i + k) % n] for k in range(n)) for i in range(n))


def smooth_weighted_schedule(backends: Sequence[Backend],
                             weights: Sequence[int] | None = None) -> tuple[int, ...]:
    """nginx's smooth weighted round robin, unrolled into one cycle of backend indexes.

    Weights 5,1,1 give a,a,b,a,c,a,a rather than a,a,a,a,a,b,c, so a heavy backend's share is
    spread out. Weights (`weights`, else each Backend.weight) are reduced by their gcd to keep
    the cycle short; the cycle is sum(weights) long and costs that times len(backends) to build.
    """
    if not backends:
        return ()
    raw = list(weights) if weights is not None else [b.weight for b in backends]
    divisor = math.gcd(*raw)
    reduced = [w // divisor for w in raw]
    total = sum(reduced)
    current = [0] * len(reduced)
    indexes = range(len(reduced))
    schedule = []
    for _ in range(total):
        for i, w in enumerate(reduced):
            current[i] += w
        best = max(indexes, key=current.__getitem__)
        current[best] -= total
        schedule.append(best)
    return tuple(schedule)


def _pick_weighted(cumulative: Sequence[int], point: float) -> int:
    """Index whose cumulative-weight interval holds `point` (clamped: float rounding can
    make random() * total equal total)."""
    return min(bisect.bisect_right(cumulative, point), len(cumulative) - 1)


# -- the policies -----------------------------------------------------------------------------

class RoundRobinPolicy:
    """Smooth weighted round robin driven by a ticket all workers draw from one shared counter,
    so the rotation is global, not per worker."""

    uses_ticket = True
    uses_in_flight = False

    def __init__(self, available: Sequence[Backend],
                 weights: Sequence[int] | None = None) -> None:
        self.backends = tuple(available)
        self._schedule = smooth_weighted_schedule(self.backends, weights)
        self._orders = _rotations(self.backends)

    def order(self, ctx: PickContext) -> Sequence[Backend]:
        if not self._schedule:
            return ()
        return self._orders[self._schedule[ctx.ticket % len(self._schedule)]]


class RandomPolicy:
    """Weighted random choice: no shared counter is touched at all."""

    uses_ticket = False
    uses_in_flight = False

    def __init__(self, available: Sequence[Backend],
                 weights: Sequence[int] | None = None) -> None:
        self.backends = tuple(available)
        raw = weights if weights is not None else [b.weight for b in self.backends]
        self._cumulative = tuple(itertools.accumulate(raw))
        self._orders = _rotations(self.backends)

    def order(self, ctx: PickContext) -> Sequence[Backend]:
        if not self._cumulative:
            return ()
        point = (ctx.rng or random).random() * self._cumulative[-1]
        return self._orders[_pick_weighted(self._cumulative, point)]


class LeastConnectionsPolicy:
    """Fewest in-flight requests per unit of weight (over all workers).

    Loads are compared by cross-multiplying (a/wa < b/wb as a*wb < b*wa), so no floats. The
    scan starts at the ticket's place in the smooth weighted schedule and keeps the first of
    equal loads, so ties rotate, and an idle pool is served in weighted round-robin order.
    Fallbacks are the others in configured rotation after the chosen one.
    """

    uses_ticket = True
    uses_in_flight = True

    def __init__(self, available: Sequence[Backend],
                 weights: Sequence[int] | None = None) -> None:
        self.backends = tuple(available)
        self._ids = tuple(b.id for b in self.backends)
        self._weights = tuple(weights if weights is not None
                              else [b.weight for b in self.backends])
        self._schedule = smooth_weighted_schedule(self.backends, self._weights)
        n = len(self.backends)
        self._scans = tuple(tuple((i + k) % n for k in range(1, n)) for i in range(n))
        self._orders = _rotations(self.backends)

    def order(self, ctx: PickContext) -> Sequence[Backend]:
        if not self._schedule:
            return ()
        in_flight, ids, weights = ctx.in_flight, self._ids, self._weights
        best = self._schedule[ctx.ticket % len(self._schedule)]
        best_load, best_weight = in_flight(ids[best]), weights[best]
        for i in self._scans[best]:
            if best_load == 0:
                break  # nothing beats an idle backend
            load = in_flight(ids[i])
            if load * best_weight < best_load * weights[i]:
                best, best_load, best_weight = i, load, weights[i]
        return self._orders[best]


class PowerOfTwoPolicy:
    """Two distinct backends drawn at random, the one with fewer in-flight per weight wins.

    The two are drawn by weight (the second from the remaining weight), not uniformly, and a
    tie goes to the first drawn: so an idle pool is served exactly like weighted random, and
    weights still count when loads are equal. Under load, the per-weight comparison steers
    traffic away from the busier of the two. Two `in_flight` reads per request, whatever n.
    """

    uses_ticket = False
    uses_in_flight = True

    def __init__(self, available: Sequence[Backend],
                 weights: Sequence[int] | None = None) -> None:
        self.backends = tuple(available)
        self._ids = tuple(b.id for b in self.backends)
        self._weights = tuple(weights if weights is not None
                              else [b.weight for b in self.backends])
        self._cumulative = tuple(itertools.accumulate(self._weights))
        self._orders = _rotations(self.backends)

    def order(self, ctx: PickContext) -> Sequence[Backend]:
        cumulative = self._cumulative
        if len(cumulative) < 2:
            return self._orders[0] if cumulative else ()
        draw = (ctx.rng or random).random
        total = cumulative[-1]
        first = _pick_weighted(cumulative, draw() * total)
        first_weight = self._weights[first]
        # The second from the other backends' weight: skip over the first one's interval.
        point = draw() * (total - first_weight)
        if point >= cumulative[first] - first_weight:
            point += first_weight
        second = _pick_weighted(cumulative, point)
        if second == first:  # float rounding at an interval's edge
            second = (first + 1) % len(cumulative)
        weights, in_flight = self._weights, ctx.in_flight
        if in_flight(self._ids[second]) * first_weight < \
                in_flight(self._ids[first]) * weights[second]:
            return self._orders[second]
        return self._orders[first]


# -- consistent hashing -----------------------------------------------------------------------

POINTS_PER_WEIGHT = 100  # ring points per unit of weight: load within about +-10% per backend
RING_MEMO_MAX = 1 << 16  # orders remembered per policy (one per ring point in use)


def stable_hash(data: bytes) -> int:
    """64 bits of blake2b: the same in every process and after a restart (`hash()` is salted)."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


_EIGHT_POSITIONS = struct.Struct(">8Q")


def _backend_points(backend_id: str, count: int) -> list[int]:
    """A backend's ring positions; one 64-byte digest gives 8 of them. The first `count` do not
    depend on `count`, so a ramping weight only adds or removes this backend's own points."""
    points: list[int] = []
    for block in range((count + 7) // 8):
        digest = hashlib.blake2b(f"{backend_id}#{block}".encode(), digest_size=64).digest()
        points.extend(_EIGHT_POSITIONS.unpack(digest))
    del points[count:]
    return points


@functools.lru_cache(maxsize=16)
def _ring(members: tuple[tuple[str, int], ...]) -> tuple[array[int], array[int]]:
    """(sorted positions, owner index per position) for (backend id, weight) members.

    Cached: liveness flips do not change the ring, only which owners may take a request.
    Costs about 1 us per point (100 per unit of weight). Each point is sorted as one int,
    position << 32 | rank of the backend's id, so ties between positions (2**-64 odds) are
    broken by id, never by configured order.
    """
    by_id = sorted(range(len(members)), key=lambda index: members[index][0])
    combined: list[int] = []
    for rank, index in enumerate(by_id):
        backend_id, weight = members[index]
        combined.extend([position << 32 | rank for position in
                         _backend_points(backend_id, weight * POINTS_PER_WEIGHT)])
    combined.sort()
    return (array("Q", [point >> 32 for point in combined]),
            array("I", [by_id[point & 0xFFFFFFFF] for point in combined]))


class ConsistentHashPolicy:
    """A hash ring (ketama style) over ALL the pool's backends, down ones included.

    Why a ring, not Maglev or jump hash: removing one backend from a ring moves exactly the keys
    it owned and nothing else (Maglev only approximately; jump hash only for the last bucket),
    and "the next point on the ring" gives each key a stable, deterministic fallback, so a down
    backend's keys go to the next available backend and come back when it rises.
    POINTS_PER_WEIGHT points per unit of weight, placed by blake2b of the backend's id.
    The fallbacks are the other available backends in the order the ring meets them after the
    key; they are worked out once per ring point and remembered. Without a key, rotation by ticket.
    """

    uses_ticket = True  # read only when a request has no key (e.g. a missing header)
    uses_in_flight = False

    def __init__(self, backends: Sequence[Backend], available: Collection[str],
                 weights: Mapping[str, int] | None = None) -> None:
        members = tuple(backends)
        given = weights or {}
        self._members = members
        self._positions, self._owners = _ring(
            tuple((b.id, max(1, given.get(b.id, b.weight))) for b in members))
        self._usable = tuple(b.id in available for b in members)
        self.backends = tuple(b for b, ok in zip(members, self._usable, strict=True) if ok)
        self._rotations = _rotations(self.backends)
        self._memo: dict[int, tuple[Backend, ...]] = {}

    def order(self, ctx: PickContext) -> Sequence[Backend]:
        if not self.backends:
            return ()
        if ctx.key is None:
            return self._rotations[ctx.ticket % len(self.backends)]
        start = bisect.bisect_right(self._positions, stable_hash(ctx.key))
        if start == len(self._positions):
            start = 0
        found = self._memo.get(start)
        if found is None:
            found = self._walk(start)
            if len(self._memo) < RING_MEMO_MAX:
                self._memo[start] = found
        return found

    def _walk(self, start: int) -> tuple[Backend, ...]:
        """The available backends in the order the ring meets them from point `start`."""
        owners, usable, wanted = self._owners, self._usable, len(self.backends)
        seen: set[int] = set()
        found: list[Backend] = []
        size = len(owners)
        for step in range(size):
            owner = owners[(start + step) % size]
            if usable[owner] and owner not in seen:
                seen.add(owner)
                found.append(self._members[owner])
                if len(found) == wanted:
                    break
        return tuple(found)


# -- building ---------------------------------------------------------------------------------

# The one declaration of the balancing algorithms (the `algorithm` settings take these words).
Algorithm = Literal["round_robin", "random", "least_connections", "power_of_two",
                    "consistent_hash"]
ALGORITHMS: tuple[Algorithm, ...] = get_args(Algorithm)
SIMPLE_POLICIES: dict[Algorithm, Callable[[Sequence[Backend], Sequence[int] | None], Policy]] = {
    "round_robin": RoundRobinPolicy,
    "random": RandomPolicy,
    "least_connections": LeastConnectionsPolicy,
    "power_of_two": PowerOfTwoPolicy,
}
if (*SIMPLE_POLICIES, "consistent_hash") != ALGORITHMS:
    raise AssertionError("SIMPLE_POLICIES plus consistent_hash must be Algorithm, in its order")


def is_algorithm(name: str) -> TypeGuard[Algorithm]:
    return name in ALGORITHMS


# -- request keys ------------------------------------------------------------------------------


def request_key(hash_key: str, environ: dict[str, Any], path: str) -> bytes:
    """What consistent_hash hashes: client_ip | path | header:NAME | cookie:NAME; a request
    without that header or cookie hashes its client address."""
    value: str | None = None
    if hash_key == "path":
        value = path
    elif hash_key.startswith("header:"):
        value = environ.get("HTTP_" + hash_key[7:].upper().replace("-", "_"))
    elif hash_key.startswith("cookie:"):
        value = request_cookie(environ, hash_key[7:])
    if value is None:
        value = environ.get("REMOTE_ADDR") or ""
    return value.encode("latin-1", "replace")


def make_policy(algorithm: str, backends: Sequence[Backend],
                available: Collection[str],
                weights: Mapping[str, int] | None = None) -> Policy:
    """`backends`: the pool's backends in configured order (ALL of them, down ones included,
    so consistent_hash can keep its ring stable); `available`: ids that may take requests
    now (up, not drained, not ejected); `weights`: effective weight by id (>= 1) overriding
    Backend.weight (the proxy passes ramped weights for slow start).
    """
    if algorithm == "consistent_hash":
        return ConsistentHashPolicy(backends, available, weights)
    factory = SIMPLE_POLICIES.get(algorithm) if is_algorithm(algorithm) else None
    if factory is None:
        raise ValueError(f"unknown balancing algorithm {algorithm!r}; "
                         f"known: {', '.join(ALGORITHMS)}")
    chosen = [b for b in backends if b.id in available]
    effective = None if weights is None else [max(1, weights.get(b.id, b.weight))
                                              for b in chosen]
    return factory(chosen, effective)


def next_peer(backends: Sequence[Backend], alive: Sequence[bool], ticket: int) -> Backend | None:
    """The seed project's GetNextPeer: the ticket-th healthy backend in rotation, or None."""
    healthy = {b.id for b, up in zip(backends, alive, strict=True) if up}
    order = make_policy("round_robin", backends, healthy).order(PickContext(ticket=ticket))
    return order[0] if order else None


# -- sticky sessions --------------------------------------------------------------------------

STICKY_VALUE_CHARS = 22  # 132 bits of HMAC-SHA256, urlsafe base64 without padding


def sticky_key(secret: bytes, pool_name: str, backend_id: str) -> str:
    """The opaque cookie value naming a backend of a pool: a keyed hash, so the value reveals
    nothing of the address and cannot be forged for an address without the key. The pool's
    name is hashed in too, so one address in two pools gets two values."""
    mac = hmac.new(secret, f"{pool_name}\0{backend_id}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac).decode("ascii")[:STICKY_VALUE_CHARS]


def pool_sticky_secret(sticky_secret: str, pool: Pool) -> bytes:
    """The key of a pool's sticky cookie: `sticky_secret` when set; else derived from the
    pool's configuration (name, algorithm, backend urls), so it is the same after a restart and
    on every instance reading the same file. A derived key is only as secret as the file: set
    `sticky_secret` where clients must not be able to aim at a backend they know the URL of."""
    if sticky_secret:
        return sticky_secret.encode()
    material = "\n".join(["gol7lb sticky v1", pool.name, pool.algorithm,
                          *sorted(b.url for b in pool.backends)])
    return hashlib.sha256(material.encode()).digest()


def request_cookie(environ: dict[str, Any], name: str) -> str | None:
    """One cookie's value from the Cookie header (RFC 6265 pairs; the first one wins)."""
    header: str | None = environ.get("HTTP_COOKIE")
    if not header:
        return None
    for pair in header.split(";"):
        key, sep, value = pair.strip().partition("=")
        if sep and key == name:
            return value.strip().strip('"')
    return None


def sticky_set_cookie(cookie_name: str, value: str) -> str:
    """The Set-Cookie value that pins a client to the backend `value` names."""
    return f"{cookie_name}={value}; Path=/; HttpOnly; SameSite=Lax"
