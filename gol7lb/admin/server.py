"""The admin listener's HTTP side: a table of routes, JSON in and out, bearer-token checks.

Every answer is complete and small; errors are `{"error": "..."}` with 400, 401, 403, 404,
405 (with `Allow`), 409 or 503, never a traceback.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import re
import socket
import sys
import threading
import time
from dataclasses import dataclass, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from gol7lb import logfmt, metrics
from gol7lb.admin.certificates import CertificateView
from gol7lb.admin.status import backend_entries, status_document
from gol7lb.backends import BackendError, check_weight, parse_backend_url
from gol7lb.config import DEFAULT_POOL, AdminSettings
from gol7lb.control import ControlError, Snapshot
from gol7lb.counters import SharedCounters
from gol7lb.hosts import HostTable
from gol7lb.manager import ControlClient

log = logging.getLogger("gol7lb.admin")
DASHBOARD = Path(__file__).with_name("dashboard.html")
MAX_BODY = 64 * 1024
SUPERVISOR_STALE_SECONDS = 5.0  # no heartbeat for this long: the supervisor is not running
# Bounds on reading the control state (a frozen Manager gives an answer, never a hang): /healthz
# answers within 1 s; /status, /metrics and the API within 2 s (from the last known state).
HEALTHZ_STATE_SECONDS = 0.7
STATE_CALL_SECONDS = 1.0
STATE_REUSE_SECONDS = 0.25  # a read that ended this recently serves the next callers too
JSON_TYPE = "application/json"
LATENCY_CACHE_SECONDS = 1.0


class ApiError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


@dataclass(frozen=True)
class Route:
    pattern: re.Pattern[str]
    handlers: dict[str, str]  # method -> AdminHandler method name
    mutating: frozenset[str] = frozenset()


ROUTES = (
    Route(re.compile(r"/"), {"GET": "get_dashboard"}),
    Route(re.compile(r"/healthz"), {"GET": "get_healthz"}),
    Route(re.compile(r"/status"), {"GET": "get_status"}),
    Route(re.compile(r"/metrics"), {"GET": "get_metrics"}),
    Route(re.compile(r"/backends"), {"GET": "get_backends", "POST": "post_backend"},
          frozenset({"POST"})),
    Route(re.compile(r"/backends/(?P<id>[^/]+)"), {"GET": "get_backend",
                                                   "DELETE": "delete_backend"},
          frozenset({"DELETE"})),
    Route(re.compile(r"/backends/(?P<id>[^/]+)/drain"), {"POST": "post_drain"},
          frozenset({"POST"})),
    Route(re.compile(r"/backends/(?P<id>[^/]+)/enable"), {"POST": "post_enable"},
          frozenset({"POST"})),
)


@dataclass(frozen=True)
class KnownState:
    """The last control state read from the Manager, and whether it is still current."""

    snapshot: Snapshot | None
    read_at: float  # time.monotonic() of that read
    error: str | None  # why the latest read failed: the snapshot is stale (None: current)
    generation: int = -1  # the shared generation counter just before that read

    def freshness(self) -> dict[str, Any]:
        """/status's marks: `stale`, `stale_reason`, `state_age` (seconds since read)."""
        return {"stale": self.error is not None, "stale_reason": self.error,
                "state_age": round(time.monotonic() - self.read_at, 3)}


class AdminServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, sock: socket.socket, client: ControlClient, counters: SharedCounters,
                 hosts: HostTable) -> None:
        self.bound_host: str = sock.getsockname()[0]  # an IPv4 or IPv6 address
        super().__init__(sock.getsockname()[:2], AdminHandler, bind_and_activate=False)
        self.socket.close()
        self.socket = sock  # bound by the master, so bind errors stop the start, not this child
        self.client = client
        self.counters = counters
        self.hosts = hosts
        self.certificates = CertificateView(
            lambda: snapshot.settings if (snapshot := self.snapshot_or_none()) else None)
        self.registry = metrics.scrape_registry(
            [metrics.BackendStateCollector(self.snapshot_or_none, hosts), self.certificates],
            self.backend_ids)
        self._latency: dict[str, list[float]] = {}
        self._latency_at = -LATENCY_CACHE_SECONDS
        self._latency_lock = threading.Lock()
        self._counts: dict[str, dict[str, float]] = {}
        self._counts_at = -LATENCY_CACHE_SECONDS
        self._read_lock = threading.Lock()
        self._known = KnownState(None, 0.0, "not read yet")
        self._attempted_at = -STATE_REUSE_SECONDS
        self.dashboard: bytes | None
        try:
            self.dashboard = DASHBOARD.read_bytes()
        except OSError:
            self.dashboard = None

    def latencies(self) -> dict[str, list[float]]:
        """p50/p99 per backend, merged from every process's histogram files at most once a
        second (a dashboard polls every second; merging the files is the expensive part)."""
        now = time.monotonic()
        with self._latency_lock:
            if now - self._latency_at >= LATENCY_CACHE_SECONDS:
                self._latency = metrics.latency_percentiles(self.registry)
                self._latency_at = now
            return self._latency

    def route_counts(self) -> dict[str, dict[str, float]]:
        """Denied (and rate-limited) requests per route, merged at most once a second too."""
        now = time.monotonic()
        with self._latency_lock:
            if now - self._counts_at >= LATENCY_CACHE_SECONDS:
                self._counts = metrics.route_counts(self.registry)
                self._counts_at = now
            return self._counts

    def handle_error(self, request: Any, client_address: Any) -> None:
        """One line, not socketserver's traceback on stderr (a client that hung up, mostly)."""
        error = sys.exc_info()[1]
        if not isinstance(error, ConnectionError):
            log.error("admin request from %s failed: %s: %s", client_address[0],
                      type(error).__name__, error)

    def known(self, timeout: float = STATE_CALL_SECONDS) -> KnownState:
        """The control state read now, within `timeout`; else the last one read, stale.

        One thread reads at a time; a read that ended while a caller waited (or just before
        it came, if nothing changed since) serves it too, so a scrape or a burst of probes
        costs one call (and an API call sees its own change), and a frozen
        Manager costs each caller at most `timeout`, never a thread left waiting.
        """
        started = time.monotonic()
        if not self._read_lock.acquire(timeout=timeout):
            return replace(self._known, error=f"no answer from the manager in {timeout:g}s")
        try:
            known = self._known
            if self._attempted_at < started - STATE_REUSE_SECONDS or (
                    known.error is None and known.generation != self.counters.generation):
                self._read(max(0.05, started + timeout - time.monotonic()))
            return self._known
        finally:
            self._read_lock.release()

    def _read(self, timeout: float) -> None:
        generation = self.counters.generation  # before the read: a change after it shows
        try:
            snapshot = self.client.snapshot(timeout)
        except Exception as e:
            self._known = replace(self._known, error=str(e) or type(e).__name__)
        else:
            self._known = KnownState(snapshot, time.monotonic(), None, generation)
            logfmt.apply(snapshot.settings.log)
        self._attempted_at = time.monotonic()

    def snapshot(self) -> Snapshot:
        """The control state as it is now, or a 503 (for the API: never act on stale state)."""
        known = self.known()
        if known.error is not None or known.snapshot is None:
            raise ApiError(503, f"shared state unreachable: {known.error}")
        return known.snapshot

    def backend_ids(self) -> list[str]:
        """The running backends' ids, as last known (none before the first read)."""
        snap = self.snapshot_or_none()
        return list(snap.backends()) if snap is not None else []

    def snapshot_or_none(self) -> Snapshot | None:
        """For /metrics: the last known state, stale or not."""
        return self.known().snapshot

    def control(self, method: str, *args: Any) -> None:
        try:
            self.client.call(method, *args)
        except ControlError as e:
            raise ApiError(e.status, e.message) from None
        except Exception as e:
            raise ApiError(503, f"shared state unreachable: {e or type(e).__name__}") from None


def _canonical_host(host: str) -> str:
    """An IP address in one spelling (an IPv4-mapped IPv6 one as IPv4), a name lower-case."""
    host = host.removeprefix("[").removesuffix("]")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host.lower().removesuffix(".")
    mapped = getattr(address, "ipv4_mapped", None)
    return str(mapped or address)


def _is_loopback(host: str) -> bool:
    """127.0.0.0/8 or ::1 (as localhost, and what a port published on the host's loopback,
    as docker-compose.admin.yml does, arrives with): no DNS name, so never rebinding."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _split_authority(authority: str, default_port: int = 0) -> tuple[str, int] | None:
    """'Name:8404' -> ('name', 8404); None for what is not a host[:port]."""
    try:
        parts = urlsplit("//" + authority.strip())
        host, port = parts.hostname, parts.port
    except ValueError:
        return None
    if not host or parts.netloc != authority.strip() or parts.username is not None:
        return None
    return _canonical_host(host), port or default_port


def _same_origin(origin: str, host: str) -> bool:
    """Whether a browser's Origin is the page served under this Host (default ports
    filled in from the Origin's scheme)."""
    scheme, sep, authority = origin.strip().partition("://")
    default = {"http": 80, "https": 443}.get(scheme.lower())
    if not sep or default is None:
        return False  # "null" (a sandboxed page, a file), or not a web origin at all
    ours = _split_authority(host, default)
    return ours is not None and _split_authority(authority, default) == ours


class AdminHandler(BaseHTTPRequestHandler):
    server: AdminServer
    protocol_version = "HTTP/1.1"
    server_version = "gol7lb-admin"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        """Quiet: orchestrators poll /healthz every few seconds."""

    # plumbing ---------------------------------------------------------------------------------

    def _send(self, status: int, body: bytes, content_type: str = "text/plain; charset=utf-8",
              headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, document: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(document, indent=2).encode() + b"\n", JSON_TYPE, headers)

    def _dispatch(self) -> None:
        path = self.path.split("?", 1)[0]
        method = "GET" if self.command == "HEAD" else self.command
        try:
            for route in ROUTES:
                match = route.pattern.fullmatch(path)
                if match is None:
                    continue
                if method not in route.handlers:
                    allowed = sorted(route.handlers)
                    allow = ", ".join(allowed + (["HEAD"] if "GET" in allowed else []))
                    raise ApiError(405, f"{self.command} is not allowed on {path}: use "
                                        f"{allow}", {"Allow": allow})
                if method in route.mutating:
                    admin = self.server.snapshot().settings.admin
                    self._refuse_cross_site(admin)
                    self._authorize(admin.token)
                args = {k: unquote(v) for k, v in match.groupdict().items()}
                getattr(self, route.handlers[method])(**args)
                return
            raise ApiError(404, f"no such admin endpoint {path!r}: try /, /status, /metrics, "
                                "/healthz or /backends")
        except ApiError as e:
            self._discard_body()
            self._json(e.status, {"error": e.message}, e.headers)
        except ConnectionError:  # the client went away mid-answer: nothing left to tell it
            self.close_connection = True
        except Exception as e:  # never a traceback to the client; one line in the log
            log.error("admin %s %s failed: %s: %s", self.command, path, type(e).__name__, e)
            self._json(500, {"error": "internal error, see the LB's log"})

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _dispatch  # noqa: N815

    def _refuse_cross_site(self, admin: AdminSettings) -> None:
        """A web page must never drive the API, token or not (DESIGN, Admin listener): a
        browser always names the page's Origin, a DNS-rebinding page still sends its own name
        as Host, and a cross-site form or text/plain body needs no CORS preflight (which this
        listener never grants), so refuse all three with 403."""
        hosts = self.headers.get_all("Host") or []
        host = _split_authority(hosts[0]) if len(hosts) == 1 else None
        if host is None or not (host[0] in self._own_names(admin) or _is_loopback(host[0])):
            raise ApiError(403, f"Host {', '.join(hosts) or '(none)'!r} is not this admin "
                                "listener's address, localhost or a name in admin.hosts "
                                "(GOL7LB_ADMIN_HOSTS): refused (DNS rebinding)")
        origin = self.headers.get("Origin")
        if origin is not None and not _same_origin(origin, hosts[0]):
            raise ApiError(403, f"Origin {origin!r} is not this admin listener's own "
                                f"(http://{hosts[0]}): a web page may not change the LB")
        content_type = self.headers.get("Content-Type")
        has_body = bool(self.headers.get("Transfer-Encoding")) or \
            self.headers.get("Content-Length", "0").strip() not in ("", "0")
        media = content_type.partition(";")[0].strip().lower() if content_type else None
        if (media is None and has_body) or (media is not None and media != JSON_TYPE):
            raise ApiError(403, f"Content-Type {content_type!r} refused: a mutating call "
                                f"sends no body or a {JSON_TYPE} one (forms and text/plain "
                                "could come from any web page)")

    def _own_names(self, admin: AdminSettings) -> set[str]:
        """What Host may name besides a loopback address: the bound address, the address this
        connection reached, localhost and admin.hosts."""
        names = {"localhost", _canonical_host(self.server.bound_host),
                 _canonical_host(self.connection.getsockname()[0])}
        if admin.address is not None:
            names.add(_canonical_host(admin.address[0]))
        names.update(_canonical_host(name) for name in admin.hosts)
        return names - {"0.0.0.0", "::"}  # a wildcard bind is no address a client names

    def _authorize(self, token: str) -> None:
        if not token:
            return
        given = self.headers.get("Authorization", "")
        scheme, _, credentials = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(credentials.strip().encode(),
                                                                 token.encode()):
            raise ApiError(401, "this call needs Authorization: Bearer <admin.token>",
                           {"WWW-Authenticate": 'Bearer realm="gol7lb-admin"'})

    def _discard_body(self) -> None:
        length = self.headers.get("Content-Length")
        if length and length.isdigit() and int(length) <= MAX_BODY:
            self.rfile.read(int(length))
        elif length or self.headers.get("Transfer-Encoding"):
            self.close_connection = True

    def _read_json(self) -> dict[str, Any]:
        length_text = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding") or length_text is None:
            self.close_connection = True
            raise ApiError(400, "send the JSON body with a Content-Length")
        if not length_text.isdigit() or int(length_text) > MAX_BODY:
            self.close_connection = True
            raise ApiError(400, f"the body must be at most {MAX_BODY} bytes of JSON")
        raw = self.rfile.read(int(length_text))
        self.headers.replace_header("Content-Length", "0")  # consumed
        try:
            body = json.loads(raw or b"null")
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise ApiError(400, 'the body must be a JSON object like {"url": "http://host:port"}')
        return body

    def _entry(self, backend_id: str) -> dict[str, Any]:
        snapshot = self.server.snapshot()
        for entry in backend_entries(snapshot, self.server.hosts):
            if entry["id"] == backend_id:
                return entry
        raise ApiError(404, f"no backend {backend_id!r} (ids are host:port, as in /status)")

    # endpoints --------------------------------------------------------------------------------

    def get_dashboard(self) -> None:
        if self.server.dashboard is None:
            raise ApiError(404, "the dashboard page is not installed")
        self._send(200, self.server.dashboard, "text/html; charset=utf-8",
                   {"Content-Security-Policy": "default-src 'self'; style-src 'self' "
                    "'unsafe-inline'; script-src 'self' 'unsafe-inline'"})

    def get_healthz(self) -> None:
        reasons = []
        known = self.server.known(HEALTHZ_STATE_SECONDS)
        if known.error is not None:
            reasons.append(f"shared state unreachable: {known.error}")
        age = self.server.counters.heartbeat_age()
        if age is None or age > SUPERVISOR_STALE_SECONDS:
            reasons.append("supervisor not running" + (f" (last heartbeat {age:.1f}s ago)"
                                                       if age is not None else ""))
        if reasons:
            self._send(503, ("unhealthy: " + "; ".join(reasons) + "\n").encode())
        else:
            self._send(200, b"ok\n")

    def get_status(self) -> None:
        known = self.server.known()
        if known.snapshot is None:
            raise ApiError(503, f"shared state unreachable: {known.error}")
        document = status_document(known.snapshot, self.server.hosts, self.server.latencies(),
                                   self.server.route_counts())
        document["tls"] = self.server.certificates.status()
        self._json(200, {**document, **known.freshness()})

    def get_metrics(self) -> None:
        body, content_type = metrics.exposition(self.server.registry)
        self._send(200, body, content_type)

    def get_backends(self) -> None:
        self._json(200, backend_entries(self.server.snapshot(), self.server.hosts))

    def get_backend(self, id: str) -> None:  # noqa: A002
        self._json(200, self._entry(id))

    def post_backend(self) -> None:
        body = self._read_json()
        unknown = sorted(set(body) - {"url", "weight", "pool"})
        if unknown:
            raise ApiError(400, f"unknown field {unknown[0]!r}: allowed are url, weight, pool")
        pool = body.get("pool", DEFAULT_POOL)
        if not isinstance(pool, str) or not pool:
            raise ApiError(400, "pool must be a pool name (a string)")
        try:
            weight = check_weight(body.get("weight", 1), str(body.get("url")))
            backend = parse_backend_url(body.get("url"), weight)  # type: ignore[arg-type]
        except BackendError as e:
            raise ApiError(400, f"invalid backend: {e}") from None
        self.server.control("add_backend", pool, backend)
        log.info("admin API: added backend %s to pool %s", backend.id, pool)
        self._json(201, self._entry(backend.id), {"Location": f"/backends/{backend.id}"})

    def delete_backend(self, id: str) -> None:  # noqa: A002
        self.server.control("remove_backend", id)
        log.info("admin API: removed backend %s", id)
        self._json(200, {"id": id, "removed": True})

    def post_drain(self, id: str) -> None:  # noqa: A002
        self._discard_body()
        self.server.control("set_drained", id, True)
        log.info("admin API: draining backend %s", id)
        self._json(200, self._entry(id))

    def post_enable(self, id: str) -> None:  # noqa: A002
        self._discard_body()
        self.server.control("set_drained", id, False)
        log.info("admin API: enabled backend %s", id)
        self._json(200, self._entry(id))


