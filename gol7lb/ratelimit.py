"""Rate limits: `[rate_limits.NAME]` token buckets, named by a route's `rate_limit` (or the
top-level `rate_limit`, for requests that match no route), checked once the route is known.

A limit's budget is one token bucket per key (client address, a header, the path or the
route): `burst` tokens at most, refilled at `rate` per `per` seconds; a request takes one or
gets `429` with `Retry-After` and `RateLimit-Limit`/`-Remaining`/`-Reset`.

Where the buckets live (`store`):

* `local`: in one anonymous shared mapping the master makes before it forks (`install`), so
  every worker of the instance takes from the same buckets. Each limit owns a region of
  SETS x WAYS slots, found by its identity (name and key kind) in the region headers, so a
  reload keeps the budgets of the limits it keeps (a changed rate or burst applies to the
  tokens left). A key hashes to one set of WAYS slots; one take is a read-modify-write of
  that set under the worker's thread lock and a one-byte fcntl lock of the set, so two
  workers taking at once are serialised and the count is exact. The kernel drops a dead
  process's fcntl locks: a worker killed mid-take frees the set (the pitfall of a
  multiprocessing lock held by a killed process does not apply).
* `redis://...`: one bucket in Redis shared by every instance (ratelimit_redis.py).

Compiled once per configuration (`compile_limits`, called by pooltable.build_table); the
request path does one list lookup, and only a route with a limit pays for a check.
"""

from __future__ import annotations

import fcntl
import hashlib
import math
import mmap
import os
import re
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol, get_args
from urllib.parse import urlsplit

from gol7lb.errors import ConfigError

if TYPE_CHECKING:  # pools imports this module's parser
    from gol7lb.pools import Route

RATE_LIMIT_KEYS = ("key", "rate", "per", "burst", "store", "on_store_error")
StoreErrorPolicy = Literal["allow", "deny"]
STORE_ERROR_POLICIES: tuple[StoreErrorPolicy, ...] = get_args(StoreErrorPolicy)
LOCAL = "local"
MAX_LOCAL_LIMITS = 64  # local limits in one configuration
MAX_RATE = 1_000_000_000
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
NO_ROUTE = "unmatched"  # the route label of requests that match no route (rules.UNMATCHED)


@dataclass(frozen=True)
class RateLimitSpec:
    """One `[rate_limits.NAME]` table as the file declares it."""

    name: str
    rate: float  # tokens per `per` seconds
    per: float = 1.0
    burst: int = 1
    key: str = "client_ip"  # client_ip | path | route | header:NAME
    store: str = LOCAL  # "local" or a redis:// URL
    on_store_error: StoreErrorPolicy = "allow"

    @property
    def refill(self) -> float:
        """Tokens per second."""
        return self.rate / self.per

    @property
    def identity(self) -> bytes:
        """What keeps a limit's buckets across reloads: its name and what it counts by."""
        return hashlib.blake2b(f"{self.name}\0{self.key}".encode(), digest_size=32).digest()

    def describe(self) -> dict[str, Any]:
        return {"key": self.key, "rate": self.rate, "per": self.per, "burst": self.burst,
                "store": safe_url(self.store), "on_store_error": self.on_store_error}


# -- configuration -----------------------------------------------------------------------------


def _bad(name: str, value: Any, origin: str, allowed: str) -> ConfigError:
    return ConfigError(f"invalid setting {name} = {value!r} ({origin}): must be {allowed}")


def check_key(value: Any) -> bool:
    """client_ip | path | route | header:NAME."""
    if not isinstance(value, str):
        return False
    if value in ("client_ip", "path", "route"):
        return True
    kind, sep, name = value.partition(":")
    return kind == "header" and bool(sep) and bool(_TOKEN.fullmatch(name))


def check_store(value: Any) -> bool:
    """"local", or redis://host:port/db (rediss:// for TLS)."""
    if value == LOCAL:
        return True
    if not isinstance(value, str) or not value.isprintable() or " " in value:
        return False
    try:
        url = urlsplit(value)
        url.port  # noqa: B018 (raises ValueError on a bad port)
    except ValueError:
        return False
    db = url.path.removeprefix("/")
    return url.scheme in ("redis", "rediss") and bool(url.hostname) and \
        (db == "" or db.isdigit()) and not url.query and not url.fragment


def _number(table: Mapping[str, Any], key: str, default: Any, at: str, origin: str,
            allowed: str, lo: float, hi: float, whole: bool = False) -> Any:
    value = table.get(key, default)
    kinds = int if whole else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not lo <= value <= hi:
        raise _bad(f"{at}.{key}", value, origin, allowed)
    return value


def rate_limits_from_toml(data: Any, origin: str) -> list[RateLimitSpec]:
    """`[rate_limits.NAME]` tables; each refusal names its own key and value."""
    if not isinstance(data, dict):
        raise _bad("rate_limits", data, origin, "tables like [rate_limits.per_client]")
    specs = []
    for name, table in data.items():
        at = f"rate_limits.{name}"
        if not _NAME.fullmatch(name):
            raise _bad("rate_limits", name, origin,
                       "names of letters, digits, _ . - (up to 64)")
        if not isinstance(table, dict):
            raise _bad(at, table, origin, f"a table [{at}] with key, rate, per, burst")
        extra = sorted(set(table) - set(RATE_LIMIT_KEYS))
        if extra:
            raise ConfigError(f"unknown setting {at}.{extra[0]} ({origin}): allowed are "
                              + ", ".join(RATE_LIMIT_KEYS))
        if "rate" not in table:
            raise ConfigError(f"missing setting {at}.rate ({origin}): how many requests per "
                              "`per` seconds, like rate = 100")
        rate = _number(table, "rate", None, at, origin, f"a number > 0 up to {MAX_RATE}",
                       0, MAX_RATE)
        if rate <= 0:
            raise _bad(f"{at}.rate", rate, origin, f"a number > 0 up to {MAX_RATE}")
        per = _number(table, "per", 1.0, at, origin, "a number of seconds > 0 up to 86400",
                      0, 86400)
        if per <= 0:
            raise _bad(f"{at}.per", per, origin, "a number of seconds > 0 up to 86400")
        burst = _number(table, "burst", max(1, math.ceil(rate)), at, origin,
                        f"a whole number from 1 to {MAX_RATE}", 1, MAX_RATE, whole=True)
        key = table.get("key", "client_ip")
        if not check_key(key):
            raise _bad(f"{at}.key", key, origin, "client_ip, path, route or header:NAME")
        store = table.get("store", LOCAL)
        if not check_store(store):
            raise _bad(f"{at}.store", store, origin,
                       '"local" or a Redis URL like "redis://127.0.0.1:6379/0"')
        policy = table.get("on_store_error", "allow")
        if policy not in STORE_ERROR_POLICIES:
            raise _bad(f"{at}.on_store_error", policy, origin, "allow or deny")
        specs.append(RateLimitSpec(name, float(rate), float(per), burst, key, store, policy))
    local = [s.name for s in specs if s.store == LOCAL]
    if len(local) > MAX_LOCAL_LIMITS:
        raise _bad("rate_limits", f"{len(local)} local limits", origin,
                   f"at most {MAX_LOCAL_LIMITS} limits with store = \"local\"")
    return specs


def route_where(index: int, route: Route) -> str:
    """A route as an operator finds it in the file: its index and what it matches."""
    match = [f"{k}={v!r}" for k, v in (("host", route.host), ("path_prefix", route.path_prefix))
             if v]
    if route.methods:
        match.append("methods=" + ",".join(sorted(route.methods)))
    if route.headers:
        match.append("headers=" + ",".join(k for k, _ in route.headers))
    return f"routes[{index}] ({' '.join(match) or 'every request'})"


def check_rate_limit_names(routes: Sequence[Route], top_level: str,
                           specs: Sequence[RateLimitSpec], origin: str) -> None:
    """Every `rate_limit` names a `[rate_limits.NAME]`: refused otherwise, naming the route."""
    names = {s.name for s in specs}
    known = ", ".join(sorted(names)) or "none (no [rate_limits.NAME] table)"
    for i, route in enumerate(routes):
        if route.rate_limit and route.rate_limit not in names:
            raise ConfigError(f"invalid setting routes[{i}].rate_limit = {route.rate_limit!r} "
                              f"({origin}; {route_where(i, route)}): no such rate limit; rate "
                              f"limits are {known}")
    if top_level and top_level not in names:
        raise ConfigError(f"invalid setting rate_limit = {top_level!r} ({origin}): no such rate "
                          f"limit; rate limits are {known}")


def safe_url(url: str) -> str:
    """A store URL without its password, for /status and logs."""
    if url == LOCAL:
        return url
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = (f"{parts.username}:***@" if parts.username else ":***@") + host + (
        f":{parts.port}" if parts.port else "")
    return parts._replace(netloc=netloc).geturl()


# -- token bucket maths ------------------------------------------------------------------------


def refill_and_take(tokens: float, elapsed: float, refill: float,
                    burst: float) -> tuple[bool, float]:
    """The bucket after `elapsed` seconds at `refill` tokens a second (never above `burst`),
    then one request: whether it took a token, and the tokens left."""
    tokens = min(float(burst), tokens + max(0.0, elapsed) * refill)
    if tokens >= 1.0:
        return True, tokens - 1.0
    return False, tokens


def _whole_seconds(seconds: float) -> int:
    """Seconds rounded up (a client that waits this long finds what was promised), at least 1;
    a rounding error of the division does not add a second."""
    return max(1, math.ceil(seconds - 1e-9))


def refusal_headers(tokens: float, refill: float, burst: int) -> list[tuple[str, str]]:
    """The answer to a refused request, with `tokens` (< 1) left in its bucket:
    Retry-After is when the next token is there; RateLimit-Reset when the bucket is full."""
    return [("Retry-After", str(_whole_seconds((1.0 - tokens) / refill))),
            ("RateLimit-Limit", str(burst)), ("RateLimit-Remaining", "0"),
            ("RateLimit-Reset", str(_whole_seconds((burst - tokens) / refill)))]


def store_down_headers(burst: int) -> list[tuple[str, str]]:
    """A request refused because the store cannot be asked (on_store_error = "deny")."""
    return [("Retry-After", "1"), ("RateLimit-Limit", str(burst)),
            ("RateLimit-Remaining", "0"), ("RateLimit-Reset", "1")]


# -- the local store: shared memory ------------------------------------------------------------

REGIONS = 2 * MAX_LOCAL_LIMITS  # twice the limits: a reload that renames them all still fits
SETS = 1024  # sets of a region; a key hashes to one
WAYS = 4  # slots of a set: 4096 keys tracked at once per limit
_SLOT = 4  # cells of 8 bytes: fingerprint (u64), tokens (f64), stamp (f64, monotonic), spare
_HEADER = 8  # cells of a region header (a cache line): identity (u64), last used (f64)
_HEADERS = REGIONS * _HEADER
IDLE_REGION_SECONDS = 1.0  # a region's "last used" is written at most this often
CLAIM_BYTE = REGIONS * SETS  # the lock byte for claiming regions; set s of region r: r*SETS+s


class SharedBuckets:
    """Every local limit's buckets in one anonymous shared mapping (MAP_SHARED, made before
    fork: the workers share it; pages are only backed once touched). `lock_path`: the file
    whose bytes lock the sets across processes ("" in one process: the thread lock alone)."""

    def __init__(self, lock_path: str = "") -> None:
        self.map = mmap.mmap(-1, (_HEADERS + REGIONS * SETS * WAYS * _SLOT) * 8)
        self.cells = memoryview(self.map).cast("Q")
        self.floats = memoryview(self.map).cast("d")
        self.lock_fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600) if lock_path else None
        self.lock = threading.Lock()

    def _locked(self, byte: int) -> _ByteLock:
        return _ByteLock(self.lock, self.lock_fd, byte)

    def claim(self, identities: Sequence[int]) -> dict[int, int]:
        """Each limit's region (identity -> region): the one that already carries its identity
        (the budgets survive a reload), else a free one, else the one idle longest among
        those no limit of this configuration holds (its buckets start full)."""
        cells, floats = self.cells, self.floats
        with self._locked(CLAIM_BYTE):
            held = {cells[r * _HEADER]: r for r in range(REGIONS) if cells[r * _HEADER]}
            found = {i: held[i] for i in identities if i in held}
            wanted = set(found.values())
            spare = sorted((r for r in range(REGIONS) if r not in wanted),
                           key=lambda r: (cells[r * _HEADER] != 0, floats[r * _HEADER + 1]))
            now = time.monotonic()
            for identity in identities:
                if identity in found:
                    continue
                region = spare.pop(0)
                start = (_HEADERS + region * SETS * WAYS * _SLOT) * 8
                self.map[start:start + SETS * WAYS * _SLOT * 8] = bytes(SETS * WAYS * _SLOT * 8)
                cells[region * _HEADER] = identity
                floats[region * _HEADER + 1] = now
                found[identity] = region
            return found

    def take(self, region: int, digest: bytes, refill: float, burst: int) -> tuple[bool, float]:
        """One request on the bucket of key `digest` (16 bytes) in `region`."""
        fingerprint = int.from_bytes(digest[:8], "little") or 1
        set_index = region * SETS + int.from_bytes(digest[8:12], "little") % SETS
        base = _HEADERS + set_index * WAYS * _SLOT
        cells, floats, fd = self.cells, self.floats, self.lock_fd
        with self.lock:  # the byte lock inline: this runs on every limited request
            if fd is not None:
                fcntl.lockf(fd, fcntl.LOCK_EX, 1, set_index)
            try:
                now = time.monotonic()  # read under the lock: stamps never go backwards
                ways = cells[base:base + WAYS * _SLOT:_SLOT].tolist()
                if fingerprint in ways:
                    slot = base + ways.index(fingerprint) * _SLOT
                    tokens, elapsed = floats[slot + 1], now - floats[slot + 2]
                else:
                    slot = self._victim(base, ways, now, refill, burst)
                    tokens, elapsed = float(burst), 0.0
                allowed, tokens = refill_and_take(tokens, elapsed, refill, burst)
                cells[slot] = fingerprint
                floats[slot + 1] = tokens
                floats[slot + 2] = now
                header = region * _HEADER + 1
                if now - floats[header] > IDLE_REGION_SECONDS:
                    floats[header] = now
            finally:
                if fd is not None:
                    fcntl.lockf(fd, fcntl.LOCK_UN, 1, set_index)
        return allowed, tokens

    def _victim(self, base: int, ways: list[int], now: float, refill: float,
                burst: int) -> int:
        """A new key's slot in its set: an empty one, else the one whose bucket holds most
        tokens (a full bucket is the same as none; a partly spent one's key starts from a
        full bucket when it comes back)."""
        if 0 in ways:
            return base + ways.index(0) * _SLOT
        floats = self.floats
        best, slot = -1.0, base
        for way in range(WAYS):
            i = base + way * _SLOT
            held = min(burst, floats[i + 1] + max(0.0, now - floats[i + 2]) * refill)
            if held > best:
                slot, best = i, held
        return slot


class _ByteLock:
    """The process's thread lock, then one byte of the lock file (fcntl: released by the kernel
    if the process dies)."""

    __slots__ = ("lock", "fd", "byte")

    def __init__(self, lock: threading.Lock, fd: int | None, byte: int) -> None:
        self.lock, self.fd, self.byte = lock, fd, byte

    def __enter__(self) -> None:
        self.lock.acquire()
        if self.fd is not None:
            try:
                fcntl.lockf(self.fd, fcntl.LOCK_EX, 1, self.byte)
            except BaseException:
                self.lock.release()
                raise

    def __exit__(self, *exc: object) -> None:
        try:
            if self.fd is not None:
                fcntl.lockf(self.fd, fcntl.LOCK_UN, 1, self.byte)
        finally:
            self.lock.release()


_shared: SharedBuckets | None = None


def install(lock_path: str) -> SharedBuckets:
    """In the master before it forks: the buckets every worker of this instance shares."""
    global _shared
    _shared = SharedBuckets(lock_path)
    return _shared


def shared_buckets() -> SharedBuckets:
    """The instance's buckets; in a process the master did not set up (tests, tools), its own."""
    global _shared
    if _shared is None:
        _shared = SharedBuckets()
    return _shared


# -- limiters ----------------------------------------------------------------------------------


class StoreDown(Exception):
    """The store could not be asked (Redis unreachable or too slow)."""


class Store(Protocol):
    def take(self, spec: RateLimitSpec, digest: bytes) -> tuple[bool, float]:
        """Whether the request took a token, and the tokens left; StoreDown if unknown."""


class LocalStore:
    """One local limit's region of the shared buckets."""

    def __init__(self, buckets: SharedBuckets, region: int) -> None:
        self.buckets = buckets
        self.region = region

    def take(self, spec: RateLimitSpec, digest: bytes) -> tuple[bool, float]:
        return self.buckets.take(self.region, digest, spec.refill, spec.burst)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a check decided when it did not simply let the request through."""

    refused: list[tuple[str, str]] | None  # the 429's headers, or None: let through
    store_error: bool = False


STORE_ERROR_ALLOWED = Outcome(None, True)


class Limiter:
    """A route's limit: the key of a request, and the check."""

    __slots__ = ("spec", "route", "store", "_key", "_header", "_identity")

    def __init__(self, spec: RateLimitSpec, route: str, store: Store) -> None:
        self.spec = spec
        self.route = route  # the metrics label: the route's name, or "unmatched"
        self.store = store
        self._key = spec.key
        self._header = "HTTP_" + spec.key[7:].upper().replace("-", "_") \
            if spec.key.startswith("header:") else ""
        self._identity = spec.identity[:16]  # hashed before the key: each limit its own keys

    def key(self, environ: Mapping[str, Any], path: str) -> bytes:
        """What the bucket is chosen by; a request without the header counts by its address."""
        kind = self._key
        if kind == "path":
            return b"p\0" + path.encode("utf-8", "surrogateescape")
        if kind == "route":
            return b"r\0" + self.route.encode()
        if self._header:
            value: str | None = environ.get(self._header)
            if value is not None:
                return b"h\0" + value.encode("latin-1", "replace")
        address: str = environ.get("REMOTE_ADDR") or ""
        return b"a\0" + address.encode("latin-1", "replace")

    def check(self, environ: Mapping[str, Any], path: str) -> Outcome | None:
        """None: the request took a token. Otherwise what to do instead."""
        spec = self.spec
        digest = hashlib.blake2b(self._identity + self.key(environ, path),
                                 digest_size=16).digest()
        try:
            allowed, tokens = self.store.take(spec, digest)
        except StoreDown:
            if spec.on_store_error == "allow":
                return STORE_ERROR_ALLOWED
            return Outcome(store_down_headers(spec.burst), True)
        if allowed:
            return None
        return Outcome(refusal_headers(tokens, spec.refill, spec.burst))


@dataclass(frozen=True)
class RouteLimits:
    """One configuration's limiters: `by_route[i]` for route i, the top level's last (so index
    -1, "no route", finds it); None where there is none."""

    specs: tuple[RateLimitSpec, ...]
    routes: tuple[Route, ...]
    top_level: str
    by_route: list[Limiter | None]


def compile_limits(specs: Sequence[RateLimitSpec], routes: Sequence[Route], top_level: str,
                   previous: RouteLimits | None = None) -> RouteLimits:
    """Built once per configuration; the previous one is kept while its inputs are unchanged
    (a health change makes a new table, not new limiters)."""
    specs, routes = tuple(specs), tuple(routes)
    if previous is not None and (previous.specs, previous.routes, previous.top_level) == (
            specs, routes, top_level):
        return previous
    wanted = [r.rate_limit for r in routes] + [top_level]
    if not any(wanted):
        return RouteLimits(specs, routes, top_level, [None] * len(wanted))
    by_name = {s.name: s for s in specs}
    used = [by_name[name] for name in dict.fromkeys(n for n in wanted if n)]
    stores: dict[str, Store] = {}
    local = {s.name: int.from_bytes(s.identity[:8], "little") or 1
             for s in used if s.store == LOCAL}
    if local:
        buckets = shared_buckets()
        regions = buckets.claim(list(local.values()))
        for name, identity in local.items():
            stores[name] = LocalStore(buckets, regions[identity])
    for s in used:
        if s.store != LOCAL:
            from gol7lb.ratelimit_redis import redis_store  # only configurations that use Redis

            stores[s.name] = redis_store(s.store)
    labels = [route.label or str(i) for i, route in enumerate(routes)] + [NO_ROUTE]
    return RouteLimits(specs, routes, top_level,
                       [Limiter(by_name[name], label, stores[name]) if name else None
                        for name, label in zip(wanted, labels, strict=True)])
