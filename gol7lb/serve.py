"""One client connection on a worker thread: the WSGI environ, the request body, the response.

The worker's event loop (worker.py) reads request heads without a thread; once a head is
complete, a pool thread takes the connection and calls `serve_request` for it. Client sockets
stay non-blocking all their life (the loop needs that), so every wait here is an explicit
poll() with a deadline: a client that stops reading or sending cannot hold a thread forever.
"""

from __future__ import annotations

import contextlib
import email.utils
import errno
import logging
import select
import socket
import ssl
import sys
import time
from collections.abc import Callable, Iterable
from http import HTTPStatus
from typing import Any
from urllib.parse import unquote_to_bytes

from gol7lb.http1 import Http1Parser, Request, RequestError

log = logging.getLogger("gol7lb.serve")

BLOCK = 64 * 1024
# A failure to write to or read from the client: nothing to answer, just close.
CLIENT_GONE = (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.EBADF, errno.ESHUTDOWN)


class ClientGone(ConnectionError):
    """The client closed or reset the connection, or stayed silent past its deadline."""


class BodyStalled(ClientGone, TimeoutError):
    """The client sent no more of its request body within `proxy.client_body_timeout` (a
    TimeoutError too, so the app can tell a stalled body from a broken one: 408, not 400)."""


class TunnelClosed(BrokenPipeError):
    """Raised by the app after it tunnelled the connection (Upgrade): nothing more to write.

    A BrokenPipeError (EPIPE) so that gunicorn's gthread worker, too, closes quietly.
    """

    def __init__(self) -> None:
        super().__init__(errno.EPIPE, "connection was tunnelled")


# Date ----------------------------------------------------------------------------------------

_date_second = 0
_date_header = b""


def date_header() -> bytes:
    """`Date: ...\\r\\n`, formatted once a second (email.utils is slow on every request)."""
    global _date_second, _date_header
    now = int(time.time())
    if now != _date_second:
        _date_header = b"Date: " + email.utils.formatdate(now, usegmt=True).encode() + b"\r\n"
        _date_second = now
    return _date_header


# socket I/O with deadlines ------------------------------------------------------------------
# A client socket is a plain one or, on HTTPS, a non-blocking ssl.SSLSocket. Its "would block"
# is SSLWantReadError or SSLWantWriteError (not BlockingIOError), and says which readiness to
# wait for: a TLS write can need the client's bytes first, and a read the socket's room.
WOULD_BLOCK = (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError)


def _wanted(error: OSError, default: int) -> int:
    """The poll event a "would block" waits for."""
    if isinstance(error, ssl.SSLWantReadError):
        return select.POLLIN
    if isinstance(error, ssl.SSLWantWriteError):
        return select.POLLOUT
    return default


def send_all(sock: socket.socket, data: bytes | memoryview, timeout: float) -> None:
    """Write everything on a non-blocking socket; TimeoutError if the client stops reading.
    (A TLS socket writes all or nothing: a retry sends the same bytes, as OpenSSL needs.)"""
    try:
        sent = sock.send(data)
    except WOULD_BLOCK as e:
        sent = 0
        event = _wanted(e, select.POLLOUT)
    else:
        if sent == len(data):
            return
        event = select.POLLOUT
    view = memoryview(data)[sent:]
    deadline = time.monotonic() + timeout
    while view:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("client stopped reading")
        poller = select.poll()
        poller.register(sock, event)
        if not poller.poll(left * 1000):
            continue
        try:
            sent = sock.send(view)
        except WOULD_BLOCK as e:
            event = _wanted(e, select.POLLOUT)
            continue
        event = select.POLLOUT
        view = view[sent:]
        deadline = time.monotonic() + timeout  # progress: the client is reading


def recv_some(sock: socket.socket, timeout: float) -> bytes:
    """Some bytes (b"" at EOF) from a non-blocking socket; TimeoutError after `timeout` silent."""
    try:
        return sock.recv(BLOCK)
    except WOULD_BLOCK as e:
        event = _wanted(e, select.POLLIN)
    deadline = time.monotonic() + timeout
    while True:
        poller = select.poll()
        poller.register(sock, event)
        if not poller.poll(max(0.0, deadline - time.monotonic()) * 1000):
            raise TimeoutError("client sent nothing")
        try:
            return sock.recv(BLOCK)
        except WOULD_BLOCK as e:
            event = _wanted(e, select.POLLIN)
        if time.monotonic() >= deadline:
            raise TimeoutError("client sent nothing")


def wait_readable(sock: socket.socket, timeout: float) -> bool:
    """Bytes to read: in the socket, or already decrypted inside a TLS one (which poll()
    cannot see)."""
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return True
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(timeout * 1000))


# the connection -----------------------------------------------------------------------------

class Conn:
    """A client connection; owned either by the event loop (`waiting`) or by one thread."""

    __slots__ = ("sock", "fd", "peer", "server", "parser", "deadline", "waiting", "fresh",
                 "busy_since", "handshaking", "tls", "sts", "redirect", "prelude", "session")

    def __init__(self, sock: socket.socket, peer: tuple[str, str], server: tuple[str, str],
                 parser: Http1Parser, deadline: float) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.peer = peer
        self.server = server
        self.parser = parser
        self.deadline = deadline
        self.waiting = False
        self.fresh = True  # no request served yet: a timeout answers 408 even if nothing came
        # The connection's stages before HTTP: the TLS handshake (worker.py) while
        # `handshaking`; `tls` once it is done (then `sock` is an ssl.SSLSocket).
        self.handshaking = False
        self.tls = False
        self.sts = b""  # a Strict-Transport-Security line for every answer (tls.hsts)
        self.redirect = False  # accepted on tls.redirect_port: answered by redirect.py
        # With proxy.proxy_protocol: the PROXY header's bytes read so far; None once it is in
        # (or when none is expected). Its addresses then replace `peer` and `server`.
        self.prelude: bytes | None = None
        self.session: Any = None  # an HTTP/2 connection: its http2.Session owns it

    def fill(self, timeout: float, lend: Callable[[], None] | None = None) -> None:
        """Read more of the request (a body, on a thread) and parse it. When nothing is there
        yet, `lend()` first: the thread is about to wait on a client, so it leaves the pool to
        a replacement (worker.py) instead of holding a thread others need."""
        try:
            try:
                data = self.sock.recv(BLOCK)
            except WOULD_BLOCK:
                if lend is not None:
                    lend()
                data = recv_some(self.sock, timeout)
        except TimeoutError:
            raise BodyStalled(f"no request body bytes for {timeout:g}s") from None
        except OSError as e:
            raise ClientGone(str(e) or type(e).__name__) from None
        if not data:
            raise ClientGone("client closed the connection")
        self.parser.feed(data)


def error_response(status: int, reason: str) -> bytes:
    """A complete plain-text error answer that closes the connection."""
    phrase = HTTPStatus(status).phrase
    body = f"{status} {phrase}: {reason}\n".encode("latin-1", "replace")
    return (f"HTTP/1.1 {status} {phrase}\r\nContent-Type: text/plain; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n").encode() + date_header() \
        + b"\r\n" + body


# wsgi.input -----------------------------------------------------------------------------------

class RequestBody:
    """The request body as a WSGI input stream, read from the socket as the app asks for it.

    The first read sends `100 Continue` to a client that asked for it: the LB is starting to
    send its body on. A read that waits longer than `timeout` (proxy.client_body_timeout)
    ends the exchange: `408` if no answer began, and the connection closes.
    """

    def __init__(self, conn: Conn, req: Request, timeout: float,
                 response: Response | None = None,
                 lend: Callable[[], None] | None = None) -> None:
        self.conn = conn
        self.req = req
        self.timeout = timeout
        self.response = response
        self.lend = lend
        self.buffer = b""

    def _more(self) -> bool:
        """Move the next body piece into the buffer; False at the end of the body."""
        req = self.req
        while not req.body:
            if req.complete:
                return False
            if req.expect_continue:
                req.expect_continue = False
                send_all(self.conn.sock, b"HTTP/1.1 100 Continue\r\n\r\n", self.timeout)
            try:
                self.conn.fill(self.timeout, self.lend)
            except BodyStalled:
                if self.response is not None:
                    self.response.refuse(408, "request body not received in time")
                raise
        piece = req.body.popleft()
        self.buffer = self.buffer + piece if self.buffer else piece
        return True

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            while self._more():
                pass
            data, self.buffer = self.buffer, b""
            return data
        while len(self.buffer) < size and self._more():
            pass
        data, self.buffer = self.buffer[:size], self.buffer[size:]
        return data

    def readline(self, size: int | None = -1) -> bytes:
        while b"\n" not in self.buffer and (size is None or size < 0 or len(self.buffer) < size):
            if not self._more():
                break
        end = self.buffer.find(b"\n") + 1 or len(self.buffer)
        if size is not None and size >= 0:
            end = min(end, size)
        data, self.buffer = self.buffer[:end], self.buffer[end:]
        return data

    def readlines(self, hint: int | None = None) -> list[bytes]:
        return list(iter(self.readline, b""))

    def __iter__(self) -> Any:
        return iter(self.readline, b"")


class EmptyBody:
    """wsgi.input of a request whose (empty) body is complete: one shared instance."""

    buffer = b""

    def read(self, size: int | None = -1) -> bytes:
        return b""

    def readline(self, size: int | None = -1) -> bytes:
        return b""

    def readlines(self, hint: int | None = None) -> list[bytes]:
        return []

    def __iter__(self) -> Any:
        return iter(())


EMPTY_BODY = EmptyBody()


# environ ------------------------------------------------------------------------------------

_ENV_KEYS: dict[str, str | None] = {"Content-Type": "CONTENT_TYPE",
                                    "Content-Length": "CONTENT_LENGTH"}
_BASE_ENVIRON: dict[str, Any] = {
    "wsgi.version": (1, 0), "wsgi.url_scheme": "http", "wsgi.errors": sys.stderr,
    "wsgi.multithread": True, "wsgi.multiprocess": True, "wsgi.run_once": False,
    "wsgi.input_terminated": True, "SCRIPT_NAME": "", "SERVER_SOFTWARE": "gol7lb",
}


def _env_key(name: str) -> str | None:
    """HTTP_X_FOO for X-Foo; None for names with `_` (they could pose as X-Foo), like gunicorn."""
    key = _ENV_KEYS.get(name, "")
    if key != "":
        return key
    lower = name.lower()
    if lower in ("content-type", "content-length"):
        key = lower.replace("-", "_").upper()
    elif "_" in name:
        key = None
    else:
        key = "HTTP_" + name.upper().replace("-", "_")
    if len(_ENV_KEYS) < 4096:
        _ENV_KEYS[name] = key
    return key


def build_environ(conn: Conn, req: Request, body: RequestBody | EmptyBody) -> dict[str, Any]:
    env = _BASE_ENVIRON.copy()
    target = req.target
    path, _, query = target.partition("?")
    env["REQUEST_METHOD"] = req.method
    env["RAW_URI"] = target
    env["PATH_INFO"] = unquote_to_bytes(path).decode("latin-1") if "%" in path else path
    env["QUERY_STRING"] = query
    env["SERVER_PROTOCOL"] = "HTTP/" + req.version
    env["REMOTE_ADDR"], env["REMOTE_PORT"] = conn.peer
    env["SERVER_NAME"], env["SERVER_PORT"] = conn.server
    env["gol7lb.local_port"] = conn.server[1]  # the socket's own (gunicorn's comes from Host)
    env["wsgi.input"] = body
    env["gunicorn.socket"] = conn.sock
    if conn.tls:
        env["wsgi.url_scheme"] = "https"  # X-Forwarded-Proto and Forwarded say so too
        env["HTTPS"] = "on"
    fields = []  # the HTTP_* keys, so the proxy need not scan the whole environ for them
    known = _ENV_KEYS.get
    for name, value in req.headers:
        key = known(name, "")
        if key == "":
            key = _env_key(name)
        if key is None:
            continue
        if key in env:
            env[key] = env[key] + ("; " if key == "HTTP_COOKIE" else ", ") + value
        else:
            env[key] = value
            if key[0] == "H":
                fields.append(key)
    env["gol7lb.fields"] = fields
    if req.upgrade:
        env["gol7lb.early_data"] = conn.parser.leftover
    return env


# the response -------------------------------------------------------------------------------

_FRAMING_LENGTHS = frozenset(map(len, ("content-length", "connection", "transfer-encoding")))

class Response:
    """start_response and the body writer: head and first body block go out in one send."""

    __slots__ = ("conn", "req", "timeout", "status", "headers", "head_sent", "keep_alive",
                 "chunked", "no_body", "remaining", "code", "serving")

    def __init__(self, conn: Conn, req: Request, timeout: float, keep_alive: bool,
                 serving: Callable[[], bool] | None = None) -> None:
        self.serving = serving  # False once the worker stops: the answer then says close
        self.conn = conn
        self.req = req
        self.timeout = timeout
        self.status = ""
        self.headers: list[tuple[str, str]] = []
        self.head_sent = False
        self.keep_alive = keep_alive
        self.chunked = False
        self.no_body = False
        self.remaining: int | None = None
        self.code = 0

    def start_response(self, status: str, headers: list[tuple[str, str]],
                       exc_info: Any = None) -> Callable[[bytes], None]:
        if exc_info is not None and self.head_sent:
            raise exc_info[1].with_traceback(exc_info[2])
        self.status = status
        self.headers = headers
        return self.write

    def _head(self) -> bytes:
        code = self.code = int(self.status[:3])
        if not self.req.complete:
            self.keep_alive = False  # answered before the whole body came: it will close
        elif self.serving is not None and not self.serving():
            self.keep_alive = False  # the worker began to stop during the request (a SIGHUP)
        lines = ["HTTP/1.1 ", self.status, "\r\n"]
        length = None
        headers = self.headers
        sts = self.conn.sts
        if sts:  # tls.hsts: ours replaces the backend's
            headers = [h for h in headers if h[0].lower() != "strict-transport-security"]
        for name, value in headers:
            if len(name) not in _FRAMING_LENGTHS:  # cannot be one of the three below
                lines += (name, ": ", value, "\r\n")
                continue
            lower = name.lower()
            if lower == "content-length":
                length = int(value)
                continue
            if lower == "connection":
                if "close" in value.lower():
                    self.keep_alive = False
                continue
            elif lower == "transfer-encoding":
                continue  # framing to the client is this writer's choice
            lines += (name, ": ", value, "\r\n")
        if self.req.method == "HEAD" or code in (204, 304) or code < 200:
            self.no_body = True
            if length is not None:
                lines += ("Content-Length: ", str(length), "\r\n")
        elif length is not None:
            self.remaining = length
            lines += ("Content-Length: ", str(length), "\r\n")
        elif self.req.version == "1.1":
            self.chunked = True
            lines.append("Transfer-Encoding: chunked\r\n")
        else:
            self.keep_alive = False  # HTTP/1.0 without a length: the body ends at close
        lines.append("Connection: keep-alive\r\n" if self.keep_alive else "Connection: close\r\n")
        return "".join(lines).encode("latin-1") + sts + date_header() + b"\r\n"

    def _frame(self, data: bytes) -> bytes:
        if self.no_body or not data:
            return b""
        if self.chunked:
            return b"%x\r\n%b\r\n" % (len(data), data)
        if self.remaining is not None:
            if len(data) > self.remaining:
                data = data[:self.remaining]
                self.keep_alive = False
            self.remaining -= len(data)
        return data

    def write(self, data: bytes) -> None:
        if not self.head_sent:
            head = self._head()
            self.head_sent = True
            send_all(self.conn.sock, head + self._frame(data), self.timeout)
            return
        framed = self._frame(data)
        if framed:
            send_all(self.conn.sock, framed, self.timeout)

    def refuse(self, status: int, reason: str) -> None:
        """End the exchange now: an error answer if none began, then only the close; what the
        app writes after this (its own error page) is dropped."""
        if not self.head_sent:
            _send_quietly(self.conn.sock, error_response(status, reason))
            self.code = status
        self.head_sent = self.no_body = True
        self.keep_alive = False

    def finish(self) -> None:
        """After the last body block: the terminating chunk, or the head of an empty body."""
        if not self.head_sent:
            self.write(b"")
        if self.chunked and not self.no_body:
            send_all(self.conn.sock, b"0\r\n\r\n", self.timeout)
        elif self.remaining:
            self.keep_alive = False  # the app sent less than it announced: never reuse


def serve_request(app: Callable[..., Iterable[bytes]], conn: Conn, req: Request,
                  timeout: float, keep_alive: bool,
                  extra: dict[str, Any] | None = None,
                  serving: Callable[[], bool] | None = None,
                  body_timeout: float | None = None,
                  lend: Callable[[], None] | None = None) -> bool:
    """Run the WSGI app for one request and write its answer; True to keep the connection.
    `serving()` turning False while the app runs makes the answer say `Connection: close`.
    Body reads wait at most `body_timeout` (default `timeout`) each, calling `lend()` before
    they wait."""
    response = Response(conn, req, timeout, keep_alive and req.keep_alive and not req.upgrade,
                        serving)
    body: RequestBody | EmptyBody = EMPTY_BODY if req.complete and not req.body and \
        not req.upgrade else RequestBody(conn, req, timeout if body_timeout is None
                                         else body_timeout, response, lend)
    environ = build_environ(conn, req, body)
    if extra:
        environ.update(extra)
    result: Iterable[bytes] | None = None
    try:
        result = app(environ, response.start_response)
        for block in result:
            if block:
                response.write(block)
        response.finish()
    except RequestError as e:
        if not response.head_sent:
            _send_quietly(conn.sock, error_response(e.status, e.reason))
        return False
    except TunnelClosed:
        return False
    except (ClientGone, TimeoutError):
        return False
    except OSError as e:
        if e.errno not in CLIENT_GONE:
            log.exception("error writing to client %s", conn.peer[0])
        return False
    except Exception:
        log.exception("error handling %s %s", req.method, req.target)
        if not response.head_sent:
            _send_quietly(conn.sock, error_response(500, "internal error"))
        return False
    finally:
        close = getattr(result, "close", None)
        if close is not None:
            try:
                close()
            except Exception:
                log.exception("error closing the response of %s %s", req.method, req.target)
    return response.keep_alive and req.complete and not body.buffer


def _send_quietly(sock: socket.socket, data: bytes) -> None:
    with contextlib.suppress(OSError):
        sock.send(data)
