"""Pools and routes as the file declares them: `[[backends]]` (the pool named `default`),
`[pools.NAME]` and `[[routes]]`, parsed and validated into frozen values.

Every error is a `ConfigError` whose text is the one line an operator sees at start, in
`python -m gol7lb check` and in a refused reload.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, get_args

from gol7lb.backends import (
    WEIGHT_ALLOWED,
    Backend,
    BackendError,
    check_weight,
    parse_backend_url,
)
from gol7lb.errors import ConfigError
from gol7lb.rules import NO_RULES, RULE_KEYS, Rules, describe_match, rules_from_toml
from gol7lb.target import AmbiguousTarget, normalise_path

if TYPE_CHECKING:  # balancer imports this module
    from gol7lb.balancer import Algorithm

DEFAULT_POOL = "default"
MAX_CONNECTIONS = 1_000_000
_POOL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_HOST_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
_SRV_NAME = re.compile(r"_[a-z0-9-]+\._(tcp|udp)(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)+\.?")
BACKEND_KEYS = ("url", "weight", "max_connections", "discover", "name")
DiscoveryKind = Literal["dns", "srv"]
DISCOVERY_KINDS: tuple[DiscoveryKind, ...] = get_args(DiscoveryKind)
POOL_KEYS = ("algorithm", "hash_key", "sticky_cookie", "backends", "send_proxy_protocol")
PROXY_PROTOCOL_VERSIONS = ("", "v1", "v2")  # "": none; else the PROXY header sent to backends
ROUTE_KEYS = ("host", "path_prefix", "methods", "headers", "pool", "strip_prefix", *RULE_KEYS,
              "rate_limit", "compress", "mirror")
MIRROR_KEYS = ("pool", "percent")


@dataclass(frozen=True)
class DiscoverySpec:
    """A backend entry whose addresses come from DNS: every A/AAAA address of `name` on
    `port` (kind "dns"), or the targets, ports and weights of an SRV name (kind "srv")."""

    kind: DiscoveryKind
    name: str
    port: int = 0  # dns only
    weight: int = 1  # dns only (srv records carry their own)
    max_connections: int = 0
    tls: bool = False  # dns only: https://, each address verified against `name`

    @property
    def key(self) -> str:
        return f"{self.kind}:{self.name}:{self.port}" + (":tls" if self.tls else "")


@dataclass(frozen=True)
class Pool:
    """A named group of backends with its own selection policy."""

    name: str
    algorithm: Algorithm
    backends: tuple[Backend, ...]
    hash_key: str = "client_ip"
    sticky_cookie: str = ""
    discover: tuple[DiscoverySpec, ...] = ()  # backends found in DNS, added when resolved
    send_proxy_protocol: str = ""  # "v1" | "v2": a PROXY header first on each connection


@dataclass(frozen=True)
class MirrorSpec:
    """`mirror = { pool = "shadow", percent = 10 }`: a copy of that share of the route's
    requests goes to `pool` (mirror.py), its answers discarded."""

    pool: str
    percent: float = 100.0


@dataclass(frozen=True)
class Route:
    """Requests matching every given condition go to `pool` (or its `rules.split`, or are
    answered by its rules); conditions left out match all."""

    pool: str  # "" when the rules pick (split) or answer (redirect, respond)
    host: str = ""  # "api.example.com" or "*.example.com"; lower case
    path_prefix: str = ""
    methods: frozenset[str] = field(default_factory=frozenset)
    headers: tuple[tuple[str, str], ...] = ()  # (lower-case name, exact value)
    strip_prefix: bool = False
    rules: Rules = NO_RULES
    label: str = ""  # "routes[2] path_prefix=/old/": its name in metrics, /status and errors
    compress: bool = False  # answers compressed by [compression] (compress.py)
    mirror: MirrorSpec | None = None
    rate_limit: str = ""  # a [rate_limits.NAME], checked after the access rules

    def describe(self) -> dict[str, Any]:
        """For /status."""
        found: dict[str, Any] = {
            "name": self.label, "host": self.host or None,
            "path_prefix": self.path_prefix or None,
            "methods": sorted(self.methods) or None,
            "headers": dict(self.headers) or None, "pool": self.pool or None,
            "strip_prefix": self.strip_prefix, "rules": self.rules.describe(),
            "rate_limit": self.rate_limit or None}
        if self.compress:
            found["compress"] = True
        if self.mirror is not None:
            found["mirror"] = {"pool": self.mirror.pool, "percent": self.mirror.percent}
        return found


def bad(name: str, value: Any, origin: str, allowed: str) -> ConfigError:
    return ConfigError(f"invalid setting {name} = {value!r} ({origin}): must be {allowed}")


def unknown_keys(table: Mapping[str, Any], allowed: Sequence[str], where: str,
                 origin: str) -> None:
    extra = sorted(set(table) - set(allowed))
    if extra:
        raise ConfigError(f"unknown setting {where}.{extra[0]} ({origin}): allowed are "
                          + ", ".join(allowed))


def check_hash_key(value: str) -> bool:
    """client_ip | path | header:NAME | cookie:NAME."""
    if value in ("client_ip", "path"):
        return True
    kind, sep, name = value.partition(":")
    return bool(sep) and kind in ("header", "cookie") and bool(_TOKEN.fullmatch(name))


def check_cookie_name(value: str) -> bool:
    return value == "" or bool(_TOKEN.fullmatch(value))


def is_host_name(text: str) -> bool:
    """A DNS name or an IP address, without a port (an admin Host's port is not compared)."""
    try:
        ipaddress.ip_address(text.removeprefix("[").removesuffix("]"))
        return True
    except ValueError:
        labels = text.lower().removesuffix(".").split(".")
        return all(_HOST_LABEL.fullmatch(label) for label in labels)


def backends_from_toml(items: Any, where: str,
                       origin: str) -> tuple[list[Backend], list[DiscoverySpec]]:
    """`[[backends]]` tables: fixed addresses, and entries discovered through DNS."""
    if not isinstance(items, list):
        raise bad(where, items, origin, f"an array of tables [[{where}]] with url and weight")
    backends = []
    specs: list[DiscoverySpec] = []
    seen: set[str] = set()
    for i, item in enumerate(items):
        at = f"{where}[{i}]"
        if not isinstance(item, dict):
            raise bad(at, item, origin, "a table with url and optional weight, max_connections")
        unknown_keys(item, BACKEND_KEYS, at, origin)
        limit = item.get("max_connections", 0)
        if isinstance(limit, bool) or not isinstance(limit, int) or \
                not 0 <= limit <= MAX_CONNECTIONS:
            raise bad(f"{at}.max_connections", limit, origin,
                      f"a whole number from 0 (no limit) to {MAX_CONNECTIONS}")
        if "discover" in item:
            specs.append(_discovery_spec(item, at, origin, limit))
            continue
        if "name" in item:
            raise bad(f"{at}.name", item["name"], origin, 'used with discover = "srv" only')
        if "url" not in item:
            raise ConfigError(f"missing setting {at}.url ({origin}): every backend needs a url "
                              'like url = "http://10.0.0.1:8081"')
        backend = _backend(item, at, origin, limit)
        if backend.id in seen:
            raise ConfigError(f"invalid setting {where} ({origin}): duplicate backend "
                              f"{backend.url}: list each address once")
        seen.add(backend.id)
        backends.append(backend)
    return backends, specs


def _discovery_spec(item: Mapping[str, Any], at: str, origin: str,
                    limit: int) -> DiscoverySpec:
    kind = item["discover"]
    if kind not in DISCOVERY_KINDS:
        raise bad(f"{at}.discover", kind, origin, 'one of "dns", "srv"')
    if kind == "srv":
        name = item.get("name")
        if not isinstance(name, str) or not _SRV_NAME.fullmatch(name.lower()):
            raise bad(f"{at}.name", name, origin,
                      'an SRV name like "_http._tcp.api.internal" (discover = "srv")')
        if "url" in item or "weight" in item:
            raise bad(at, item, origin, "for srv, name only: targets, ports and weights come "
                      "from the records")
        return DiscoverySpec("srv", name.lower().rstrip("."), 0, 1, limit)
    if "name" in item:
        raise bad(f"{at}.name", item["name"], origin, 'used with discover = "srv" only')
    parsed = _backend(item, at, origin, limit)
    return DiscoverySpec("dns", parsed.host.lower().rstrip("."), parsed.port, parsed.weight,
                         limit, parsed.tls)


def _backend(item: Mapping[str, Any], at: str, origin: str, limit: int) -> Backend:
    """A table's url and weight, each refusal naming its own key and value."""
    weight = item.get("weight", 1)
    try:
        check_weight(weight, str(item.get("url")))
    except BackendError:
        raise bad(f"{at}.weight", weight, origin, WEIGHT_ALLOWED) from None
    try:
        return parse_backend_url(item.get("url"), weight, limit)  # type: ignore[arg-type]
    except BackendError as e:
        raise ConfigError(f"invalid setting {at}.url ({origin}): {e}") from None


def pools_from_toml(data: Any, origin: str, defaults: Mapping[str, str],
                    check: Callable[[str, Any], Any]) -> list[Pool]:
    """`[pools.NAME]` tables. `defaults` gives hash_key and sticky_cookie when a pool has none;
    `check(setting_name, value)` validates a pool's algorithm/hash_key/sticky_cookie like the
    top-level setting of the same name."""
    if not isinstance(data, dict):
        raise bad("pools", data, origin, "tables like [pools.api]")
    pools = []
    for name, table in data.items():
        where = f"pools.{name}"
        if not _POOL_NAME.fullmatch(name) or name == DEFAULT_POOL:
            raise bad("pools", name, origin, "pool names of letters, digits, _ . - (up to 64), "
                      f"and not {DEFAULT_POOL!r}, which is the [[backends]] list")
        if not isinstance(table, dict):
            raise bad(where, table, origin, f"a table [{where}]")
        unknown_keys(table, POOL_KEYS, where, origin)
        backends, specs = backends_from_toml(table.get("backends", []), f"{where}.backends",
                                             origin)
        if not backends and not specs:
            raise ConfigError(f"invalid setting {where} ({origin}): a pool needs at least one "
                              f"backend ([[{where}.backends]] with a url)")
        values = {}
        for key in ("algorithm", "hash_key", "sticky_cookie"):
            value = table.get(key, defaults[key])
            values[key] = check(key, value) if key in table else value
        send = table.get("send_proxy_protocol", "")
        if send not in PROXY_PROTOCOL_VERSIONS:
            raise bad(f"{where}.send_proxy_protocol", send, origin, '"", "v1" or "v2"')
        pools.append(Pool(name, values["algorithm"], tuple(backends), values["hash_key"],
                          values["sticky_cookie"], tuple(specs), send))
    return pools


def _host_pattern(value: Any, at: str, origin: str) -> str:
    allowed = 'a host name like "api.example.com" or "*.example.com" (port ignored)'
    if not isinstance(value, str):
        raise bad(at, value, origin, allowed)
    host = value.strip().lower()
    if host.startswith("[") or host.count(":") > 1:  # an IPv6 literal, maybe with a port
        return host.rsplit("]", 1)[0] + "]" if host.startswith("[") else host
    host = host.rsplit(":", 1)[0] if ":" in host else host
    labels = host[2:].split(".") if host.startswith("*.") else host.split(".")
    if not host or not all(_HOST_LABEL.fullmatch(label) for label in labels):
        raise bad(at, value, origin, allowed)
    return host


def routes_from_toml(items: Any, origin: str) -> list[Route]:
    if not isinstance(items, list):
        raise bad("routes", items, origin, "an array of tables [[routes]]")
    routes = []
    for i, item in enumerate(items):
        at = f"routes[{i}]"
        if not isinstance(item, dict):
            raise bad(at, item, origin, "a table with pool and match conditions")
        unknown_keys(item, ROUTE_KEYS, at, origin)
        host = _host_pattern(item["host"], f"{at}.host", origin) if "host" in item else ""
        prefix = item.get("path_prefix", "")
        if not isinstance(prefix, str) or (prefix and (not prefix.startswith("/")
                                                      or not prefix.isascii()
                                                      or not prefix.isprintable()
                                                      or " " in prefix or "?" in prefix)):
            raise bad(f"{at}.path_prefix", prefix, origin, 'a path starting with "/"')
        if prefix:
            try:
                normalise_path(prefix)
            except AmbiguousTarget as e:  # no request could ever match it: say so now
                raise bad(f"{at}.path_prefix", prefix, origin, "an unambiguous path, which "
                          f"requests can match (this one has: {e})") from None
        methods = item.get("methods", [])
        if not isinstance(methods, list) or not all(
                isinstance(m, str) and _TOKEN.fullmatch(m) for m in methods):
            raise bad(f"{at}.methods", methods, origin, 'a list of methods like ["GET", "POST"]')
        headers = item.get("headers", {})
        if not isinstance(headers, dict) or not all(
                _TOKEN.fullmatch(str(k)) and isinstance(v, str) and v.isprintable()
                for k, v in headers.items()):
            raise bad(f"{at}.headers", headers, origin,
                      'a table of header names and exact values like { "X-Canary" = "1" }')
        strip = item.get("strip_prefix", False)
        if not isinstance(strip, bool):
            raise bad(f"{at}.strip_prefix", strip, origin, "true or false")
        if strip and not prefix:
            raise bad(f"{at}.strip_prefix", strip, origin, "used together with path_prefix")
        match = describe_match(host, prefix, methods, list(headers.items()))
        where = f"{origin}; the route {at} {match}"
        rules = rules_from_toml(item, at, where)
        pool = _route_pool(item, rules, at, where)
        compress = item.get("compress", False)
        if not isinstance(compress, bool):
            raise bad(f"{at}.compress", compress, where, "true or false")
        mirror = mirror_from_toml(item["mirror"], f"{at}.mirror", where) \
            if "mirror" in item else None
        rate_limit = item.get("rate_limit", "")
        if not isinstance(rate_limit, str):
            raise bad(f"{at}.rate_limit", rate_limit, where, "the name of a [rate_limits.NAME]")
        routes.append(Route(pool, host, prefix, frozenset(m.upper() for m in methods),
                            tuple((k.lower(), v) for k, v in headers.items()), strip, rules,
                            f"{at} {match}", compress, mirror, rate_limit))
    return routes


def mirror_from_toml(value: Any, at: str, where: str) -> MirrorSpec:
    if not isinstance(value, dict):
        raise bad(at, value, where, 'a table like { pool = "shadow", percent = 10 }')
    unknown_keys(value, MIRROR_KEYS, at, where)
    pool = value.get("pool")
    if not isinstance(pool, str) or not pool:
        raise bad(f"{at}.pool", pool, where, "the name of a pool")
    percent = value.get("percent", 100)
    if isinstance(percent, bool) or not isinstance(percent, int | float) or \
            not 0 <= percent <= 100:
        raise bad(f"{at}.percent", percent, where, "a number from 0 to 100")
    return MirrorSpec(pool, float(percent))


def _route_pool(item: Mapping[str, Any], rules: Rules, at: str, where: str) -> str:
    """A route names a pool, or splits between pools, or answers itself (redirect, respond)."""
    pool = item.get("pool")
    if rules.answers or rules.split:
        if pool is not None:
            given = "split" if rules.split else "redirect" if rules.redirect else "respond"
            raise bad(f"{at}.pool", pool, where, f"left out: this route has {given}, so it "
                      "names no pool of its own")
        return ""
    if not isinstance(pool, str) or not pool:
        raise ConfigError(f"missing setting {at}.pool ({where}): every route names a pool, "
                          "a split, a redirect or a respond")
    return pool


def check_routes(routes: Sequence[Route], pools: Mapping[str, Pool], origin: str) -> None:
    names = ", ".join(sorted(pools)) or "none (no [[backends]] and no [pools.NAME])"
    for i, route in enumerate(routes):
        where = f"{origin}; the route {route.label}"
        if route.pool and route.pool not in pools:
            raise ConfigError(f"invalid setting routes[{i}].pool = {route.pool!r} ({where}): "
                              f"no such pool; pools are {names}")
        if route.mirror is not None and route.mirror.pool not in pools:
            raise ConfigError(f"invalid setting routes[{i}].mirror.pool = {route.mirror.pool!r} "
                              f"({where}): no such pool; pools are {names}")
        for pool, _ in route.rules.split:
            if pool not in pools:
                raise ConfigError(f"invalid setting routes[{i}].split = {pool!r} ({where}): "
                                  f"no such pool; pools are {names}")
