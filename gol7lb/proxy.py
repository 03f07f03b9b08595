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
from http import HTTPStatus
from typing import Any

from gol7lb import tunnel
from gol7lb.backends import Backend
from gol7lb.config import Settings
from gol7lb.headers import (
    ForwardedPolicy,
    client_response_headers,
    request_id,
    upstream_request_headers,
)
from gol7lb.state import LivenessView, SharedCounters
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


class UpstreamBody:
    """The response body as a WSGI iterable: streamed block by block, never held whole."""

    def __init__(self, response: UpstreamResponse, sock: socket.socket, pool: UpstreamPool,
                 client_sock: socket.socket | None, rid: str) -> None:
        self.response = response
        self.sock = sock
        self.pool = pool
        self.client_sock = client_sock
        self.rid = rid
        self.done = False

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        try:
            data = self.response.read_block()
        except (OSError, UpstreamProtocolError) as e:
            self._abort(e)
        if data:
            return data
        self.done = True
        if self.response.keep_alive:
            self.pool.release(self.sock)
        else:
            self.sock.close()
        raise StopIteration

    def _abort(self, error: BaseException) -> None:
        """The backend failed mid-answer: the status is already sent, so cut the client off.

        Ending the iteration normally would tell the client the body was complete (a silent
        wrong answer); raising EPIPE makes gunicorn drop the connection without a traceback.
        """
        reason = ("timed out" if isinstance(error, TimeoutError)
                  else str(error) or type(error).__name__)
        log.error("backend %s failed mid-response (request %s): %s",
                  self.pool.backend.url, self.rid, reason)
        self.close()
        if self.client_sock is not None:
            with contextlib.suppress(OSError):
                self.client_sock.shutdown(socket.SHUT_RDWR)
        raise BrokenPipeError(errno.EPIPE, "backend failed mid-response")

    def close(self) -> None:
        self.response.release()
        if not self.done:
            self.done = True
            self.sock.close()  # unread bytes would poison the next request on this connection


class ProxyApp:
    """The WSGI application each gunicorn worker runs."""

    def __init__(self, settings: Settings, view: LivenessView, counters: SharedCounters) -> None:
        self.settings = settings
        self.view = view
        self.counters = counters
        self.retries = settings.proxy.retries
        self.uses_ticket = settings.algorithm == "round_robin"
        self.retry_after = str(max(1, math.ceil(settings.health.interval)))
        self.forwarded = ForwardedPolicy(settings.proxy.forwarded, settings.proxy.trusted_proxies)
        self.pools = {b.url: UpstreamPool(b, settings.proxy.connect_timeout,
                                          settings.proxy.read_timeout)
                      for b in settings.backends}
        # Passive health: a backend that just refused a connection is tried last in this worker
        # for a while, so a dead backend costs one failed connect, not one per request.
        self.quarantine_seconds = min(settings.health.interval, 10.0)
        self._quarantined: dict[str, float] = {}
        self._quarantine_lock = threading.Lock()

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        rid = request_id(environ)
        method = environ["REQUEST_METHOD"]
        if method == "CONNECT":
            return self._error(start_response, 405, rid, "CONNECT is not supported: this is a "
                               "reverse proxy", [("Allow", "GET, HEAD, POST, PUT, DELETE, PATCH, "
                                                  "OPTIONS")])
        raw = environ.get("RAW_URI") or environ.get("PATH_INFO") or "/"
        try:
            if not raw.isascii() or _BAD_TARGET_CHAR.search(raw):
                raise ValueError(raw)
            target, authority = split_target(raw)
        except ValueError:
            return self._error(start_response, 400, rid, "bad request target")

        order = self.view.policy().order(self.counters.take_ticket() if self.uses_ticket else 0)
        if not order:
            log.error("no healthy backend for %s %s (request %s)", method, target, rid)
            return self._error(start_response, 503, rid, "no healthy backend",
                               [("Retry-After", self.retry_after)])
        if self._quarantined:
            order = self._prefer_unquarantined(order)

        client_sock = environ.get("gunicorn.socket")
        try:
            port = str(client_sock.getsockname()[1]) if client_sock else environ["SERVER_PORT"]
        except OSError:
            port = environ.get("SERVER_PORT", "")
        first = order[0]
        host = authority or environ.get("HTTP_HOST") or first.netloc
        headers = upstream_request_headers(environ, host, port, rid, self.forwarded)
        if "HTTP_UPGRADE" in environ and tunnel.is_upgrade(environ):
            return tunnel.forward(self, environ, start_response, method, target, headers,
                                  order[: 1 + self.retries], client_sock, rid)
        return self._forward(environ, start_response, method, target, headers,
                             order[: 1 + self.retries], client_sock, rid)

    def _forward(self, environ: dict[str, Any], start_response: StartResponse, method: str,
                 target: str, headers: dict[str, str], attempts: Sequence[Backend],
                 client_sock: socket.socket | None, rid: str) -> Iterable[bytes]:
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
            pool = self.pools[backend.url]
            try:
                sock, reused = pool.acquire()
                sock, response = self._exchange(sock, reused, pool, method, head, body,
                                                length, chunked, has_body)
            except ConnectFailed as e:  # nothing reached the backend: the next one may serve
                log.error("backend %s: connect failed: %s (request %s)", backend.url, e, rid)
                self._quarantine(backend)
                last_failure = e
                continue
            except ClientBodyError as e:
                sock.close()
                log.info("client request body failed (request %s): %s", rid, e)
                return self._error(start_response, 400, rid, "incomplete request body",
                                   [("Connection", "close")])
            except TimeoutError:
                sock.close()
                log.error("backend %s timed out after %gs (request %s)", backend.url,
                          self.settings.proxy.read_timeout, rid)
                return self._error(start_response, 504, rid, "backend timed out")
            except (ConnectionError, UpstreamClosed) as e:
                sock.close()
                log.error("backend %s failed before answering: %s (request %s)", backend.url,
                          str(e) or type(e).__name__, rid)
                if not replayable:
                    return self._error(start_response, 502, rid, "bad gateway")
                self._quarantine(backend)  # and on to the next one, like nginx's next_upstream
                last_failure = e
                continue
            except (OSError, UpstreamProtocolError) as e:
                sock.close()
                log.error("backend %s failed: %s (request %s)", backend.url,
                          str(e) or type(e).__name__, rid)
                return self._error(start_response, 502, rid, "bad gateway")
            return self._respond(start_response, response, sock, pool, client_sock, rid)

        assert last_failure is not None
        if not isinstance(last_failure, ConnectFailed):
            return self._error(start_response, 502, rid, "bad gateway")
        if last_failure.timed_out:
            return self._error(start_response, 504, rid, "backend connect timed out")
        return self._error(start_response, 502, rid, "no backend accepted the connection")

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
                 rid: str) -> Iterable[bytes]:
        reason = response.reason if response.reason and response.reason.isprintable() else ""
        if not reason.isascii() or not reason:
            try:
                reason = HTTPStatus(response.status).phrase
            except ValueError:
                reason = "Unknown"
        try:
            headers = client_response_headers(response.headers, rid)
        except ValueError as e:
            sock.close()
            log.error("backend %s sent an invalid response header %s (request %s)",
                      pool.backend.url, e, rid)
            return self._error(start_response, 502, rid, "bad gateway")
        start_response(f"{response.status} {reason}", headers)
        return UpstreamBody(response, sock, pool, client_sock, rid)

    def _quarantine(self, backend: Backend) -> None:
        with self._quarantine_lock:
            self._quarantined[backend.url] = time.monotonic() + self.quarantine_seconds

    def _prefer_unquarantined(self, order: Sequence[Backend]) -> Sequence[Backend]:
        now = time.monotonic()
        with self._quarantine_lock:
            for url, until in list(self._quarantined.items()):
                if until <= now:
                    del self._quarantined[url]
            blocked = self._quarantined
            if not blocked:
                return order
        return sorted(order, key=lambda b: b.url in blocked)  # stable: keeps rotation order

    @staticmethod
    def _error(start_response: StartResponse, status: int, rid: str, message: str,
               extra: list[tuple[str, str]] | None = None) -> list[bytes]:
        body = f"{status} {HTTPStatus(status).phrase}: {message}\n".encode()
        headers = [("Content-Type", "text/plain; charset=utf-8"),
                   ("Content-Length", str(len(body))), ("X-Request-ID", rid), *(extra or [])]
        start_response(f"{status} {HTTPStatus(status).phrase}", headers)
        return [body]
