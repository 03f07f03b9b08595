"""The WSGI proxy: pick a backend, forward the request, stream the answer, map failures.

The backend side of an exchange (sockets, request head, response parsing) is upstream.py.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import re
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from gol7lb import logfmt
from gol7lb.accesslog import AccessLog
from gol7lb.backends import Backend
from gol7lb.balancer import Policy, make_policy
from gol7lb.config import DEFAULT_POOL, Settings
from gol7lb.headers import client_response_headers, request_id, upstream_request_headers
from gol7lb.hosts import WorkerCells
from gol7lb.metrics import RequestRecorder
from gol7lb.state import CachedView, SharedCounters, Snapshot
from gol7lb.upstream import (
    BLOCK,
    ConnectFailed,
    UpstreamClosed,
    UpstreamPool,
    UpstreamProtocolError,
    UpstreamResponse,
    read_response_head,
    request_head,
)

log = logging.getLogger("gunicorn.error")

IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
_ABSOLUTE_FORM = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
_BAD_TARGET_CHAR = re.compile(r"[\x00-\x20\x7f]")

StartResponse = Callable[..., Any]


class ClientBodyError(Exception):
    """The client's request body broke off or was malformed: not the backend's fault."""


def split_target(raw: str) -> tuple[str, str | None]:
    """Origin-form target and, for an absolute-form request, the authority that replaces Host.

    The authority never chooses where to connect; it only becomes the Host header, as
    RFC 9112 section 3.2.2 asks of a server receiving absolute-form.
    """
    if raw.startswith("/") or raw == "*":
        return raw, None
    match = _ABSOLUTE_FORM.match(raw)
    if not match:
        raise ValueError(raw)
    rest = raw[match.end():]
    cut = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
    authority = rest[:cut].rpartition("@")[2]
    path = rest[cut:]
    if not path.startswith("/"):
        path = "/" + path
    if not authority:
        raise ValueError(raw)
    return path, authority


@dataclass
class PoolRuntime:
    """One pool as a worker serves it: its policy over the backends that may take requests."""

    name: str
    policy: Policy
    uses_ticket: bool


@dataclass
class Routing:
    """What the worker serves from for one generation of the shared state. Built once per
    generation (never per request); requests in flight keep the one they started with."""

    snapshot: Snapshot
    settings: Settings
    pools: dict[str, PoolRuntime]
    upstreams: dict[str, UpstreamPool]  # backend id -> this worker's keep-alive sockets
    slots: dict[str, int]  # backend id -> host slot (in-flight, requests, failures)
    retry_after: str


def build_routing(snapshot: Snapshot, previous: Routing | None) -> Routing:
    """Policies over the healthy, not drained backends; keep-alive pools kept by address."""
    settings = snapshot.settings
    logfmt.set_format(settings.log.format)
    old = previous.upstreams if previous else {}
    upstreams: dict[str, UpstreamPool] = {}
    pools = {}
    for name, pool in snapshot.pools.items():
        for backend in pool.backends:
            if backend.id not in upstreams:
                upstreams[backend.id] = _upstream_for(backend, settings, old.get(backend.id))
        candidates = [b for b in pool.backends
                      if snapshot.alive(b.id) and b.id not in snapshot.drained]
        pools[name] = PoolRuntime(name, make_policy(pool.algorithm, candidates),
                                  pool.algorithm == "round_robin")
    for backend_id, upstream in old.items():
        if backend_id not in upstreams:
            upstream.retire()  # idle sockets close now, busy ones when their request ends
    return Routing(snapshot, settings, pools, upstreams, dict(snapshot.slots),
                   str(max(1, math.ceil(settings.health.interval))))


def _upstream_for(backend: Backend, settings: Settings,
                  existing: UpstreamPool | None) -> UpstreamPool:
    connect, read = settings.proxy.connect_timeout, settings.proxy.read_timeout
    if existing is None:
        return UpstreamPool(backend, connect, read)
    existing.configure(backend, connect, read)
    return existing


class Exchange:
    """One client request from head to last byte: what the access log, the metrics and the
    per-host counters are told once it ends."""

    __slots__ = ("app", "started", "method", "path", "client", "rid", "pool", "backend_id",
                 "slot", "status", "upstream_s", "answered")

    def __init__(self, app: ProxyApp, method: str, path: str, client: str, rid: str) -> None:
        self.app = app
        self.started = time.perf_counter()
        self.method = method
        self.path = path
        self.client = client
        self.rid = rid
        self.pool = "-"
        self.backend_id = "-"
        self.slot: int | None = None  # the host slot counted in flight until finish()
        self.status = 0
        self.upstream_s: float | None = None
        self.answered = False  # the status came from a backend (metrics label it by address)

    def finish(self, sent: int, failed: bool = False) -> None:
        app = self.app
        if self.slot is not None:
            app.cells.end(self.slot, failed)
            self.slot = None
        total = time.perf_counter() - self.started
        metric_backend = self.backend_id if self.answered else "none"
        app.recorder.record(self.pool, metric_backend, self.status, self.method, total)
        log_settings = app.view.current().settings.log
        if log_settings.access:
            app.access_log.write(log_settings.format, self.client, self.method, self.path,
                                 self.status, sent, self.pool, self.backend_id,
                                 self.upstream_s, total, self.rid)


class UpstreamBody:
    """The response body as a WSGI iterable: streamed block by block, never held whole."""

    def __init__(self, response: UpstreamResponse, sock: socket.socket, pool: UpstreamPool,
                 client_sock: socket.socket | None, exchange: Exchange) -> None:
        self.response = response
        self.sock = sock
        self.pool = pool
        self.client_sock = client_sock
        self.exchange = exchange
        self.sent = 0
        self.done = False

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        try:
            data = self.response.read_block()
        except (OSError, UpstreamProtocolError) as e:
            self._abort(e)
        if data:
            self.sent += len(data)
            return data
        self.done = True
        if self.response.keep_alive:
            self.pool.release(self.sock)
        else:
            self.sock.close()
        self.exchange.finish(self.sent)
        raise StopIteration

    def _abort(self, error: BaseException) -> None:
        """The backend failed mid-answer: the status is already sent, so cut the client off.

        Ending the iteration normally would tell the client the body was complete (a silent
        wrong answer); raising EPIPE makes gunicorn drop the connection without a traceback.
        """
        reason = ("timed out" if isinstance(error, TimeoutError)
                  else str(error) or type(error).__name__)
        log.error("backend %s failed mid-response (request %s): %s",
                  self.pool.backend.id, self.exchange.rid, reason)
        self._close(failed=True)
        if self.client_sock is not None:
            with contextlib.suppress(OSError):
                self.client_sock.shutdown(socket.SHUT_RDWR)
        raise BrokenPipeError(errno.EPIPE, "backend failed mid-response")

    def _close(self, failed: bool) -> None:
        if not self.done:
            self.done = True
            self.sock.close()  # unread bytes would poison the next request on this connection
            self.exchange.finish(self.sent, failed)

    def close(self) -> None:
        """Called by the server when the client went away or the body ended early."""
        self._close(failed=False)


class ProxyApp:
    """The WSGI application each gunicorn worker runs."""

    def __init__(self, view: CachedView[Routing], counters: SharedCounters,
                 cells: WorkerCells, recorder: RequestRecorder | None = None,
                 access_log: AccessLog | None = None) -> None:
        self.view = view
        self.counters = counters
        self.cells = cells
        self.recorder = recorder or RequestRecorder()
        self.access_log = access_log or AccessLog()
        # Passive health: a backend that just refused a connection is tried last in this worker
        # for a while, so a dead backend costs one failed connect, not one per request.
        self._quarantined: dict[str, float] = {}
        self._quarantine_lock = threading.Lock()

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        rid = request_id(environ)
        method = environ["REQUEST_METHOD"]
        raw = environ.get("RAW_URI") or environ.get("PATH_INFO") or "/"
        exchange = Exchange(self, method, raw, environ.get("REMOTE_ADDR") or "-", rid)
        routing = self.view.current()
        if method == "CONNECT":
            return self._error(start_response, exchange, 405, "CONNECT is not supported: this "
                               "is a reverse proxy", [("Allow", "GET, HEAD, POST, PUT, DELETE, "
                                                       "PATCH, OPTIONS")])
        try:
            if not raw.isascii() or _BAD_TARGET_CHAR.search(raw):
                raise ValueError(raw)
            target, authority = split_target(raw)
        except ValueError:
            return self._error(start_response, exchange, 400, "bad request target")

        pool = routing.pools.get(DEFAULT_POOL)
        if pool is None:
            return self._error(start_response, exchange, 404, "no route matches this request "
                               "and there is no default pool")
        exchange.pool = pool.name
        order = pool.policy.order(self.counters.take_ticket() if pool.uses_ticket else 0)
        if not order:
            log.error("no healthy backend in pool %s for %s %s (request %s)", pool.name, method,
                      target, rid)
            return self._error(start_response, exchange, 503, "no healthy backend",
                               [("Retry-After", routing.retry_after)])
        if self._quarantined:
            order = self._prefer_unquarantined(order)

        client_sock = environ.get("gunicorn.socket")
        try:
            port = str(client_sock.getsockname()[1]) if client_sock else environ["SERVER_PORT"]
        except OSError:
            port = environ.get("SERVER_PORT", "")
        first = order[0]
        host = authority or environ.get("HTTP_HOST") or first.netloc
        headers = upstream_request_headers(environ, host, port, rid)
        return self._forward(environ, start_response, routing, exchange, target, headers,
                             order[: 1 + routing.settings.proxy.retries], client_sock)

    def _forward(self, environ: dict[str, Any], start_response: StartResponse,
                 routing: Routing, exchange: Exchange, target: str, headers: dict[str, str],
                 attempts: Sequence[Backend], client_sock: socket.socket | None) -> Iterable[bytes]:
        method = exchange.method
        rid = exchange.rid
        body = environ["wsgi.input"]
        chunked = "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower()
        length = 0 if chunked else int(environ.get("CONTENT_LENGTH") or 0)
        if length:
            headers["Content-Length"] = str(length)
        elif chunked:
            headers["Transfer-Encoding"] = "chunked"
        has_body = chunked or length > 0
        head = request_head(method, target, headers)

        # A request that can be sent again: its method is idempotent and no body was read.
        replayable = method in IDEMPOTENT and not has_body
        last_failure: Exception | None = None
        for backend in attempts:
            if last_failure is not None:
                self.recorder.retry(exchange.backend_id)
            pool = routing.upstreams[backend.id]
            exchange.backend_id = backend.id
            exchange.slot = routing.slots.get(backend.id)
            if exchange.slot is not None:
                self.cells.begin(exchange.slot)
            attempt_started = time.perf_counter()
            sock: socket.socket | None = None
            try:
                sock, reused = pool.acquire()
                sock, response = self._exchange(sock, reused, pool, method, head, body,
                                                length, chunked, has_body)
            except ConnectFailed as e:  # nothing reached the backend: the next one may serve
                log.error("backend %s: connect failed: %s (request %s)", backend.id, e, rid)
                self._quarantine(backend, routing.settings.health.interval)
                self._attempt_failed(exchange)
                last_failure = e
                continue
            except ClientBodyError as e:
                _close(sock)
                self._attempt_failed(exchange, failed=False)
                log.info("client request body failed (request %s): %s", rid, e)
                return self._error(start_response, exchange, 400, "incomplete request body",
                                   [("Connection", "close")])
            except TimeoutError:
                _close(sock)
                self._attempt_failed(exchange)
                log.error("backend %s timed out after %gs (request %s)", backend.id,
                          routing.settings.proxy.read_timeout, rid)
                return self._error(start_response, exchange, 504, "backend timed out")
            except (ConnectionError, UpstreamClosed) as e:
                _close(sock)
                self._attempt_failed(exchange)
                log.error("backend %s failed before answering: %s (request %s)", backend.id,
                          str(e) or type(e).__name__, rid)
                if not replayable:
                    return self._error(start_response, exchange, 502, "bad gateway")
                self._quarantine(backend, routing.settings.health.interval)
                last_failure = e  # and on to the next one, like nginx's next_upstream
                continue
            except (OSError, UpstreamProtocolError) as e:
                _close(sock)
                self._attempt_failed(exchange)
                log.error("backend %s failed: %s (request %s)", backend.id,
                          str(e) or type(e).__name__, rid)
                return self._error(start_response, exchange, 502, "bad gateway")
            exchange.upstream_s = time.perf_counter() - attempt_started
            return self._respond(start_response, response, sock, pool, client_sock, exchange)

        assert last_failure is not None
        if not isinstance(last_failure, ConnectFailed):
            return self._error(start_response, exchange, 502, "bad gateway")
        if last_failure.timed_out:
            return self._error(start_response, exchange, 504, "backend connect timed out")
        return self._error(start_response, exchange, 502, "no backend accepted the connection")

    def _attempt_failed(self, exchange: Exchange, failed: bool = True) -> None:
        if exchange.slot is not None:
            self.cells.end(exchange.slot, failed)
            exchange.slot = None

    def _exchange(self, sock: socket.socket, reused: bool, pool: UpstreamPool, method: str,
                  head: bytes, body: Any, length: int, chunked: bool,
                  has_body: bool) -> tuple[socket.socket, UpstreamResponse]:
        """Send one request and read the response head.

        A kept-alive connection the backend closed meanwhile fails on first use; then the
        request goes once more on a fresh connection, which is safe because nothing of the
        request body has been read from the client yet and either the backend cannot have
        seen the request (the head did not go out) or the method is idempotent. If that
        fresh connect fails, ConnectFailed sends the request on to the next backend.
        """
        head_sent = False
        try:
            sock.sendall(head)
            head_sent = True
            if not has_body:
                return sock, read_response_head(sock, method)
        except (ConnectionError, UpstreamClosed):
            if not reused or (head_sent and method not in IDEMPOTENT):
                raise
            sock.close()
            fresh = pool.connect()
            try:
                return self._exchange(fresh, False, pool, method, head, body, length, chunked,
                                      has_body)
            except BaseException:
                fresh.close()  # the caller only knows the first socket
                raise
        # If the backend stops reading, it may still have answered (e.g. 413): read that.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self._send_body(sock, body, length, chunked)
        return sock, read_response_head(sock, method)

    @staticmethod
    def _send_body(sock: socket.socket, body: Any, length: int, chunked: bool) -> None:
        sent = 0
        while True:
            try:
                block = body.read(BLOCK)
            except Exception as e:  # gunicorn's body parser errors and client socket errors
                raise ClientBodyError(str(e) or type(e).__name__) from e
            if not block:
                break
            sent += len(block)
            sock.sendall(b"%x\r\n%b\r\n" % (len(block), block) if chunked else block)
        if chunked:
            sock.sendall(b"0\r\n\r\n")
        elif sent < length:
            raise ClientBodyError(f"client sent {sent} of {length} body bytes")

    def _respond(self, start_response: StartResponse, response: UpstreamResponse,
                 sock: socket.socket, pool: UpstreamPool, client_sock: socket.socket | None,
                 exchange: Exchange) -> Iterable[bytes]:
        reason = response.reason if response.reason and response.reason.isprintable() else ""
        if not reason.isascii() or not reason:
            try:
                reason = HTTPStatus(response.status).phrase
            except ValueError:
                reason = "Unknown"
        try:
            headers = client_response_headers(response.headers, exchange.rid)
        except ValueError as e:
            sock.close()
            self._attempt_failed(exchange)
            log.error("backend %s sent an invalid response header %s (request %s)",
                      pool.backend.id, e, exchange.rid)
            return self._error(start_response, exchange, 502, "bad gateway")
        exchange.status = response.status
        exchange.answered = True
        start_response(f"{response.status} {reason}", headers)
        return UpstreamBody(response, sock, pool, client_sock, exchange)

    def _quarantine(self, backend: Backend, interval: float) -> None:
        with self._quarantine_lock:
            self._quarantined[backend.id] = time.monotonic() + min(interval, 10.0)

    def _prefer_unquarantined(self, order: Sequence[Backend]) -> Sequence[Backend]:
        now = time.monotonic()
        with self._quarantine_lock:
            for backend_id, until in list(self._quarantined.items()):
                if until <= now:
                    del self._quarantined[backend_id]
            blocked = self._quarantined
            if not blocked:
                return order
        return sorted(order, key=lambda b: b.id in blocked)  # stable: keeps rotation order

    def _error(self, start_response: StartResponse, exchange: Exchange, status: int,
               message: str, extra: list[tuple[str, str]] | None = None) -> list[bytes]:
        """An answer the LB makes itself (no backend's status): counted and logged now."""
        phrase = HTTPStatus(status).phrase
        body = f"{status} {phrase}: {message}\n".encode()
        headers = [("Content-Type", "text/plain; charset=utf-8"),
                   ("Content-Length", str(len(body))), ("X-Request-ID", exchange.rid),
                   *(extra or [])]
        exchange.status = status
        exchange.answered = False
        start_response(f"{status} {phrase}", headers)
        exchange.finish(len(body))
        return [body]


def _close(sock: socket.socket | None) -> None:
    if sock is not None:
        sock.close()
