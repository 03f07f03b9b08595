"""Routes: (host, path, method, headers) -> pool, compiled once per configuration.

First match in file order wins; a request no route matches goes to the default pool (or gets
404 when there is none). Matching is pure and cheap per request: the routes that can match a
given Host are worked out once per distinct host and cached (bounded), so a request only
checks path, method and headers of those, in order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gol7lb.pools import DEFAULT_POOL, Route
from gol7lb.rules import NO_RULES, UNMATCHED, CompiledRules, Rules
from gol7lb.rules import compiled as compile_rules
from gol7lb.target import AmbiguousTarget, normalise_path

HOST_CACHE_SIZE = 4096  # distinct Host values remembered; clients choose them, so bounded


@dataclass(frozen=True, slots=True)
class CompiledRoute:
    route: Route
    prefix: str  # "" for any path
    prefix_open: str  # the prefix with a trailing "/", for segment-aware matching
    methods: frozenset[str]
    headers: tuple[tuple[str, str], ...]  # (WSGI environ key, exact value)
    match: Match  # what a request this route takes gets (the same object every time)
    index: int = -1  # the route's place in the file

    def matches(self, environ: Mapping[str, Any], path: str, method: str) -> bool:
        if self.prefix and not (path == self.prefix or path.startswith(self.prefix_open)):
            return False
        if self.methods and method not in self.methods:
            return False
        return all(environ.get(key) == value for key, value in self.headers)


@dataclass(frozen=True, slots=True)
class Match:
    pool: str  # "" when the route's rules pick (split) or answer (redirect, respond)
    strip: str  # the prefix to remove from the path ("" for none)
    rules: CompiledRules | None = None  # the route's rules (rules.py), None when it has none
    route: Route | None = None  # None: the default pool, no route matched
    index: int = -1  # the route's place in the file; -1: no route matched (the default pool)


def host_matches(pattern: str, host: str) -> bool:
    """Exact, or "*.example.com": any subdomain at any depth, never the bare domain."""
    if pattern.startswith("*."):
        return host.endswith(pattern[1:]) and len(host) > len(pattern) - 1
    return host == pattern


def normalise_host(value: str | None) -> str:
    """Host header -> lower-case name without port or the root's trailing dot
    ("[::1]:80" -> "[::1]", "API.example.com.:80" -> "api.example.com")."""
    if not value:
        return ""
    host = value.strip().lower()
    if host.startswith("["):
        return host.split("]", 1)[0] + "]"
    host = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    return host[:-1] if host.endswith(".") else host


def strip_prefix(target: str, prefix: str) -> str:
    """"/api/x?q=1" less "/api/" -> "/x?q=1"; "/api" less "/api" -> "/"."""
    rest = target[len(prefix.rstrip("/")):]
    if not rest or rest.startswith("?"):
        return "/" + rest
    return rest


class Router:
    """Compiled routes of one configuration."""

    def __init__(self, routes: Sequence[Route], pools: Sequence[str],
                 rules: Rules = NO_RULES, unmatched: Route | None = None) -> None:
        self.routes = tuple(self._compile(r, i) for i, r in enumerate(routes))
        self.default = DEFAULT_POOL if DEFAULT_POOL in pools else None
        # The top-level rules apply to requests no route matches; redirect or respond there
        # answer them even without a default pool.
        top = compile_rules(rules, UNMATCHED, "")
        # `unmatched` carries the top-level compress and mirror, when set
        self._default_match = Match(self.default or "", "", top, unmatched) \
            if self.default or (top is not None and rules.answers) else None
        self._hosted = any(r.route.host for r in self.routes)
        self._by_host: dict[str, tuple[CompiledRoute, ...]] = {}

    @staticmethod
    def _compile(route: Route, index: int) -> CompiledRoute:
        try:  # requests are matched on normalised paths, so the prefix is normalised too
            prefix = normalise_path(route.path_prefix) if route.path_prefix else ""
        except AmbiguousTarget:
            prefix = route.path_prefix  # e.g. "/a%2Fb/": such requests are refused anyway
        open_prefix = prefix if prefix.endswith("/") else prefix + "/"
        headers = tuple(("HTTP_" + name.upper().replace("-", "_"), value)
                        for name, value in route.headers)
        rules = compile_rules(route.rules, route.label, prefix)
        match = Match(route.pool, prefix if route.strip_prefix else "", rules, route, index)
        return CompiledRoute(route, prefix, open_prefix, route.methods, headers, match, index)

    def _for_host(self, host: str) -> tuple[CompiledRoute, ...]:
        found = self._by_host.get(host)
        if found is None:
            found = tuple(r for r in self.routes
                          if not r.route.host or host_matches(r.route.host, host))
            if len(self._by_host) < HOST_CACHE_SIZE:
                self._by_host[host] = found
        return found

    def match(self, environ: Mapping[str, Any], path: str, method: str,
              host: str | None) -> Match | None:
        """The pool for this request, or None (no route, no default pool: 404)."""
        if self.routes:
            candidates = self._for_host(normalise_host(host)) if self._hosted else self.routes
            for compiled in candidates:
                if compiled.matches(environ, path, method):
                    return compiled.match
        return self._default_match
