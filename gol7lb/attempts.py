"""The one attempt loop, for plain and upgrade requests: pick a backend, exchange with it,
classify the outcome (outcomes.py), retry or queue; stream the answer, map failures.

The backend side of an exchange (sockets, request head, response parsing) is upstream.py.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import socket
import time
from collections.abc import Callable, Iterable, Sequence
from http import HTTPStatus
from typing import Any

from gol7lb import outlier, proxyproto, tunnel
from gol7lb.backends import Backend
from gol7lb.balancer import PickContext, request_cookie, request_key, sticky_set_cookie
from gol7lb.bodies import ClientBodyError, FinishedBody, RequestBody, UpstreamBody
from gol7lb.compress import CompressedBody, Negotiated
from gol7lb.counters import SharedCounters
from gol7lb.exchange import Exchange
from gol7lb.headers import client_response_headers
from gol7lb.hosts import WorkerCells
from gol7lb.manager import ControlClient
from gol7lb.metrics import RequestRecorder
from gol7lb.outcomes import Episode, Outcome, classify_error, classify_status, may_retry
from gol7lb.pooltable import PoolRuntime, PoolTable
from gol7lb.upstream import (
    CLOSED,
    TIMED_OUT,
    IdleConnections,
    LocalResourceError,
    UpstreamResponse,
    read_response_head,
    request_head,
)

log = logging.getLogger("gol7lb.proxy")  # the request path's logger (logfmt.LOGGERS)

IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
CLOSE = [("Connection", "close")]  # a malformed request ends its connection

StartResponse = Callable[..., Any]


class AttemptLoop:
    """What every request goes through once routed (ProxyApp is one): the attempts, the
    passive-health bookkeeping they do, and the answers the LB makes itself."""

    def __init__(self, counters: SharedCounters, cells: WorkerCells,
                 client: ControlClient | None, threads: int, recorder: RequestRecorder) -> None:
        self.counters = counters
        self.cells = cells
        self.client = client
        self.threads = threads
        self.recorder = recorder
        self._outages: dict[str, PoolRuntime] = {}  # pool name -> the pool seen with none up
        self._local_errors = Episode()

    # picking ------------------------------------------------------------------------------------

    def _context(self, table: PoolTable, pool: PoolRuntime, environ: dict[str, Any],
                 path: str) -> PickContext:
        policy = pool.policy
        in_flight = _no_load
        if policy.uses_in_flight:
            slots, hosts = table.slots, self.cells.table

            def in_flight(backend_id: str) -> int:
                slot = slots.get(backend_id)
                return hosts.in_flight(slot) if slot is not None else 0
        key = None
        if pool.config.algorithm == "consistent_hash":
            key = request_key(pool.config.hash_key, environ, path)
        ticket = self.counters.take_ticket(pool.rotation) if policy.uses_ticket else 0
        return PickContext(ticket, in_flight, key)

    def _pick(self, table: PoolTable, pool: PoolRuntime, environ: dict[str, Any], path: str,
              tried: set[str], sticky: str | None,
              bounded: bool = True) -> tuple[Backend | None, bool]:
        """The next backend to try, with its in-flight slot taken; (None, full) when there is
        none: full is True when every candidate was at its limit (worth queueing for)."""
        order: Sequence[Backend] = pool.policy.order(self._context(table, pool, environ, path))
        if sticky is not None and sticky in pool.available:
            order = [pool.by_id[sticky], *(b for b in order if b.id != sticky)]
        full = False
        share = self._local_share(pool) if bounded else _UNBOUNDED
        for backend in order:
            if backend.id in tried:
                continue
            slot = table.slots.get(backend.id)
            if slot is not None and not self.cells.try_begin(slot, pool.limits[backend.id],
                                                             share):
                full = True
                continue
            return backend, False
        return None, full

    def _local_share(self, pool: PoolRuntime) -> int:
        """A backend may hold at most this many of this worker's threads (Envoy's circuit
        breaker, per worker): its fair share, doubled, so a frozen backend leaves the others
        the rest."""
        available = len(pool.available) or 1
        if available == 1:
            return self.threads
        return max(2, math.ceil(2 * self.threads / available))

    # forwarding -------------------------------------------------------------------------------

    def forward(self, environ: dict[str, Any], start_response: StartResponse,
                 table: PoolTable, pool: PoolRuntime, exchange: Exchange, target: str,
                 path: str, headers: dict[str, str], body: RequestBody,
                 client_sock: socket.socket | None, upgrade: bool = False,
                 negotiated: Negotiated | None = None) -> Iterable[bytes]:
        """The one attempt loop, for plain and upgrade requests alike (pick, exchange,
        classify, retry by `proxy.retry_on`, queue by `proxy.queue_timeout`); an upgrade's
        `101` is one branch of it (tunnel.switch), as in Caddy's reverseproxy.go."""
        method = exchange.method
        settings = table.settings
        cookie_name = pool.config.sticky_cookie
        sticky = request_cookie(environ, cookie_name) if cookie_name else None
        sticky_id = pool.sticky_values.get(sticky) if sticky else None
        idempotent_without_body = method in IDEMPOTENT and not body.present
        # A tunnel gives its serving thread back (a new one is started), so an upgrade is
        # not bounded by the per-worker thread share.
        bounded = not upgrade
        tried: set[str] = set()
        last: Outcome | None = None
        queue_deadline = 0.0  # set when every candidate is first found at its limit
        head = request_head(method, target, headers)  # the same for every attempt
        send_proxy = pool.config.send_proxy_protocol  # "v1"/"v2": a PROXY header per connection
        prelude = proxyproto.for_request(send_proxy, environ) if send_proxy else b""
        for _attempt in range(1 + settings.proxy.retries):
            backend, full = self._pick(table, pool, environ, path, tried, sticky_id, bounded)
            if backend is None and full and not tried:
                queue_deadline = time.monotonic() + settings.proxy.queue_timeout
            while backend is None and full and not tried and \
                    time.monotonic() < queue_deadline:
                time.sleep(QUEUE_POLL_SECONDS)  # every candidate is at max_connections
                backend, full = self._pick(table, pool, environ, path, tried, sticky_id,
                                           bounded)
            if backend is None:
                break
            tried.add(backend.id)
            if last is not None:
                self.recorder.retry(exchange.backend_id)
                exchange.flag("URX")
            exchange.attempts += 1
            exchange.backend_id = backend.id
            exchange.slot = table.slots.get(backend.id)
            connections = table.connections[backend.id]
            started = time.perf_counter()
            sock: socket.socket | None = None
            try:
                sock, reused = connections.acquire(prelude)
                sock, response = self._exchange(sock, reused, connections, method, head, body)
            except ClientBodyError as e:
                _close(sock)
                self._attempt_ended(exchange, table, failed=False)
                return self._body_error(start_response, exchange, e)
            except LocalResourceError as e:
                _close(sock)
                self._attempt_ended(exchange, table, failed=False)
                return self._local_error(start_response, exchange, e, upgrade)
            except Exception as e:
                _close(sock)
                last = classify_error(e)
                self._attempt_ended(exchange, table, failed=True)
                exchange.flag(last.flag)
                # The access line says what happened: an error line per attempt floods.
                log.debug("backend %s failed (%s): %s (request %s)", backend.id, last.kind,
                          _reason(e, settings.proxy.read_timeout), exchange.rid)
                if may_retry(last, settings.proxy.retry_on, body.replayable,
                             idempotent_without_body):
                    continue
                return self._error(start_response, exchange, last.status, last.message,
                                   close=upgrade)
            exchange.upstream_s = time.perf_counter() - started
            failure = classify_status(response.status)
            if failure is not None:
                self._passive_failure(exchange, table)
                last = failure
                if may_retry(failure, settings.proxy.retry_on, body.replayable,
                             idempotent_without_body) and len(tried) <= settings.proxy.retries \
                        and len(tried) < len(pool.available):
                    response.release()
                    sock.close()
                    self._attempt_ended(exchange, table, failed=True, noted=True)
                    exchange.flag(failure.flag)
                    log.debug("backend %s answered %d; trying another (request %s)",
                              backend.id, response.status, exchange.rid)
                    continue
            elif exchange.slot is not None:
                self.cells.table.note_success(exchange.slot)
            if upgrade and response.status == 101:
                assert client_sock is not None  # ProxyApp._upgrade answers 400 without one
                tunnel.switch(environ, response, sock, client_sock, backend, exchange,
                              settings.proxy.client_idle_timeout)
            cookie = None
            if pool.config.sticky_cookie and sticky != pool.sticky_by_id.get(backend.id):
                cookie = sticky_set_cookie(pool.config.sticky_cookie, pool.sticky_by_id[backend.id])
            return self._respond(start_response, response, sock, connections, client_sock,
                                 exchange, cookie, negotiated)

        if last is None:
            if tried or full:
                exchange.flag("UO")
                return self._error(start_response, exchange, 503, "every backend is at its "
                                   "connection limit", [("Retry-After", "1")], close=upgrade)
            exchange.flag("UH")
            self._no_healthy_backend(pool)
            return self._error(start_response, exchange, 503, "no healthy backend",
                               [("Retry-After", table.retry_after)], close=upgrade)
        return self._error(start_response, exchange, last.status, last.message, close=upgrade)

    def _no_healthy_backend(self, pool: PoolRuntime) -> None:
        """Logged once per outage of a pool (per worker), not per request: a pool that gets
        a backend back is a new PoolRuntime (the table is rebuilt when liveness flips)."""
        if self._outages.get(pool.name) is not pool:
            self._outages[pool.name] = pool
            log.error("no healthy backend in pool %s: answering 503 until one is back "
                      "(logged once per outage; the access log flags each request UH)",
                      pool.name)

    def _local_error(self, start_response: StartResponse, exchange: Exchange,
                     error: LocalResourceError, upgrade: bool) -> list[bytes]:
        """The LB could not open a backend socket for lack of its own resources (EMFILE...):
        the backend is not at fault (no failure counted, no retry, which would fail the same
        way), the client may come back soon. Logged once per episode, counted apart."""
        exchange.flag("LR")
        name = errno.errorcode.get(error.errno or 0, "other").lower()
        self.recorder.local_error(name)
        if self._local_errors.begins():
            log.error("out of local resources opening backend connections (%s: %s); "
                      "answering 503 meanwhile (logged once per episode; counted in "
                      "gol7lb_local_errors_total)", name.upper(), error.strerror)
        return self._error(start_response, exchange, 503, "the load balancer is out of "
                           "resources", [("Retry-After", "1")], close=upgrade)

    def _attempt_ended(self, exchange: Exchange, table: PoolTable, failed: bool,
                       noted: bool = False) -> None:
        """An attempt that will not stream a response: its slot and share go back."""
        if failed and not noted:
            self._passive_failure(exchange, table)
        if exchange.slot is not None:
            self.cells.end(exchange.slot, failed)
            exchange.slot = None

    def _passive_failure(self, exchange: Exchange, table: PoolTable) -> None:
        outlier.passive_failure(self.cells, self.client, exchange.slot, exchange.backend_id, table)

    def _exchange(self, sock: socket.socket, reused: bool, connections: IdleConnections,
                  method: str, head: bytes,
                  body: RequestBody) -> tuple[socket.socket, UpstreamResponse]:
        """Send one request and read the response head.

        A kept-alive connection the backend closed meanwhile fails on first use; then the
        request goes once more on a fresh connection, which is safe because its body (if
        any) is kept whole and either the backend cannot have seen the request (the head did
        not go out) or the method is idempotent. If that fresh connect fails, ConnectFailed
        sends the request on to the next backend.
        """
        head_sent = False
        try:
            sock.sendall(head)
            head_sent = True
            if not body.present:
                return sock, read_response_head(sock, method)
            if body.deferred:
                return sock, self._send_after_continue(sock, method, body)
        except CLOSED:
            if not reused or (head_sent and method not in IDEMPOTENT) or not body.replayable:
                raise
            fresh = connections.reconnect(sock)  # the same PROXY header, if any
            try:
                return self._exchange(fresh, False, connections, method, head, body)
            except BaseException:
                fresh.close()  # the caller only knows the first socket
                raise
        # If the backend stops reading, it may still have answered (e.g. 413): read that.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            body.send(sock)
        return sock, read_response_head(sock, method)

    @staticmethod
    def _send_after_continue(sock: socket.socket, method: str,
                             body: RequestBody) -> UpstreamResponse:
        """`Expect: 100-continue`: the body goes once the backend says `100 Continue` (or
        stays silent for EXPECT_WAIT_SECONDS); an early final answer is relayed instead, and
        the backend connection, which still expects the body, is not kept."""
        response = UpstreamResponse(sock, method)
        response.await_continue(EXPECT_WAIT_SECONDS)
        if response.head_done:
            response.read_head()
            response.keep_alive = False
            return response
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            body.send(sock)
        response.read_head()
        return response

    def _respond(self, start_response: StartResponse, response: UpstreamResponse,
                 sock: socket.socket, connections: IdleConnections,
                 client_sock: socket.socket | None, exchange: Exchange,
                 cookie: str | None, negotiated: Negotiated | None = None) -> Iterable[bytes]:
        reason = response.reason if response.reason and response.reason.isprintable() else ""
        if not reason.isascii() or not reason:
            try:
                reason = HTTPStatus(response.status).phrase
            except ValueError:
                reason = "Unknown"
        try:
            headers = client_response_headers(response.headers, exchange.rid)
        except ValueError as e:
            response.release()
            sock.close()
            exchange.flag("UPE")
            log.debug("backend %s sent an invalid response header %s (request %s)",
                      connections.backend.id, e, exchange.rid)
            if exchange.slot is not None:
                self.cells.end(exchange.slot, True)
                exchange.slot = None
            return self._error(start_response, exchange, 502, "bad gateway")
        if cookie:
            headers.append(("Set-Cookie", cookie))
        rules = exchange.rules
        if rules is not None and rules.response_headers is not None:
            headers = rules.response_headers.response(headers)
        exchange.status = response.status
        exchange.answered = True
        if negotiated is not None:  # the route compresses: compress.py decides
            return self._compressed(start_response, response, sock, connections, client_sock,
                                    exchange, reason, headers, negotiated)
        start_response(f"{response.status} {reason}", headers)
        if response.complete:
            return FinishedBody(response.take_body(), sock, response.keep_alive, connections,
                                exchange)
        return UpstreamBody(response, sock, connections, client_sock, exchange)

    @staticmethod
    def _compressed(start_response: StartResponse, response: UpstreamResponse,
                    sock: socket.socket, connections: IdleConnections,
                    client_sock: socket.socket | None, exchange: Exchange, reason: str,
                    headers: list[tuple[str, str]], negotiated: Negotiated) -> Iterable[bytes]:
        """The answer of a route with `compress = true`: compressed block by block when its
        head and the client allow it (the size of a whole body is its real one)."""
        if response.complete:
            data = response.take_body()
            encoder = negotiated.apply(response.status, headers, len(data))
            if encoder is not None:
                data = encoder.whole(data)
            start_response(f"{response.status} {reason}", headers)
            return FinishedBody(data, sock, response.keep_alive, connections, exchange)
        encoder = negotiated.apply(response.status, headers)
        start_response(f"{response.status} {reason}", headers)
        body = UpstreamBody(response, sock, connections, client_sock, exchange)
        return body if encoder is None else CompressedBody(body, encoder)

    def _body_error(self, start_response: StartResponse, exchange: Exchange,
                    error: ClientBodyError) -> list[bytes]:
        """The client's body broke off (400) or stalled past its timeout (408): its fault, not
        the backend's; the connection closes."""
        log.info("client request body failed (request %s): %s", exchange.rid, error)
        if isinstance(error.__cause__, TimeoutError):
            return self._error(start_response, exchange, 408, "request body not received in "
                               "time", CLOSE)
        return self._error(start_response, exchange, 400, "incomplete request body", CLOSE)

    def _error(self, start_response: StartResponse, exchange: Exchange, status: int,
               message: str, extra: list[tuple[str, str]] | None = None,
               close: bool = False) -> list[bytes]:
        """An answer the LB makes itself (no backend's status): counted and logged now.
        `close`: the client connection ends after it (an upgrade request's)."""
        body = f"{status} {HTTPStatus(status).phrase}: {message}\n".encode()
        headers = [("Content-Type", "text/plain; charset=utf-8"), *(extra or [])]
        if close:
            headers.append(("Connection", "close"))
        return self._own_answer(start_response, exchange, status, body, headers)

    def _own_answer(self, start_response: StartResponse, exchange: Exchange, status: int,
                    body: bytes, headers: list[tuple[str, str]]) -> list[bytes]:
        """Any answer the LB makes itself (errors, and the route rules' redirect, respond,
        403 and 401): counted and access-logged like a backend's. The route's
        response_headers apply once the request has passed its rules (rules.py's order)."""
        headers = [*headers, ("Content-Length", str(len(body))), ("X-Request-ID", exchange.rid)]
        rules = exchange.rules
        if rules is not None and rules.response_headers is not None:
            headers = rules.response_headers.response(headers)
        exchange.status = status
        exchange.answered = False
        start_response(f"{status} {HTTPStatus(status).phrase}", headers)
        exchange.finish(len(body))
        return [body]


QUEUE_POLL_SECONDS = 0.005
EXPECT_WAIT_SECONDS = 1.0  # how long a backend may stay silent after Expect (curl waits 1 s)
_UNBOUNDED = 1 << 62


def _no_load(backend_id: str) -> int:
    return 0


def _reason(error: BaseException, read_timeout: float) -> str:
    if isinstance(error, TIMED_OUT):
        return f"timed out after {read_timeout:g}s"
    return str(error) or type(error).__name__


def _close(sock: socket.socket | None) -> None:
    if sock is not None:
        sock.close()
