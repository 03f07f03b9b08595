"""The backend side of one exchange: kept-alive sockets per backend, the request head written in
one send, and the answer parsed by llhttp (through httptools) and streamed block by block.

Why not http.client: its header parsing goes through the email package and took over a quarter
of a worker's CPU per proxied request in profiles (py-spy, wrk -c32); llhttp is Node's C parser,
strict about framing, and does chunked decoding too. Why not urllib3: its urlopen re-encodes the
request target, which must go out byte for byte, and it adds headers the client did not send.
"""

from __future__ import annotations

import errno
import select
import socket
import ssl
import struct
import threading
import time
import weakref
from collections import OrderedDict, deque

import httptools

from gol7lb import upstreamtls
from gol7lb.backends import Backend

BLOCK = 64 * 1024
MAX_IDLE_PER_BACKEND = 64
MAX_HEAD = 64 * 1024  # a response head larger than this is refused, as by nginx's buffers


class ConnectFailed(OSError):
    """Opening a connection to a backend failed: the next backend may be tried."""

    def __init__(self, reason: str, timed_out: bool) -> None:
        super().__init__(reason)
        self.timed_out = timed_out


class LocalResourceError(OSError):
    """The LB itself could not open a socket (out of descriptors, buffers or memory): not the
    backend's failure, and another backend would fail the same way."""


LOCAL_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


# How a backend's read_timeout shows: EAGAIN from a socket opened by open_connection (kernel
# timeout), or TimeoutError from one given a Python timeout later (health checks, tunnels).
TIMED_OUT = (TimeoutError, BlockingIOError)


class UpstreamProtocolError(Exception):
    """The backend's bytes are not a valid HTTP/1.x answer, or it closed before finishing one."""


class UpstreamClosed(UpstreamProtocolError):
    """The backend closed the connection before sending any answer."""


# How a backend closing a kept-alive connection shows: a reset, EOF, or over TLS an EOF
# without close_notify.
CLOSED = (ConnectionError, UpstreamClosed, ssl.SSLEOFError, ssl.SSLZeroReturnError)


class IdleConnections:
    """Idle keep-alive sockets to one backend, owned by one worker process."""

    def __init__(self, backend: Backend, connect_timeout: float, read_timeout: float,
                 tls: ssl.SSLContext | None = None) -> None:
        self.backend = backend
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.tls = tls  # https:// backends: the configuration's context (upstreamtls.py)
        self.retired = False
        self._idle: deque[socket.socket] = deque()
        self._private = PrivateIdle()

    def configure(self, backend: Backend, connect_timeout: float, read_timeout: float,
                  tls: ssl.SSLContext | None = None) -> None:
        """A reload kept this address; idle sockets carry the old read timeout and TLS
        settings, so they go when those changed."""
        self.backend = backend
        self.connect_timeout = connect_timeout
        if read_timeout != self.read_timeout or tls is not self.tls:
            self.read_timeout = read_timeout
            self.tls = tls
            self._close_idle()
        self.retired = False

    def retire(self) -> None:
        """The address left the configuration: no socket to it is kept any longer."""
        self.retired = True
        self._close_idle()

    def _close_idle(self) -> None:
        self._private.close_all()
        while True:
            try:
                self._idle.pop().close()
            except IndexError:
                return

    def acquire(self, prelude: bytes = b"") -> tuple[socket.socket, bool]:
        """An idle socket still open on the far side, else a new one; (sock, reused).
        With a `prelude` (a PROXY header), only a socket that began with the same one."""
        if prelude:
            kept = self._private.take(prelude)
            return (kept, True) if kept is not None else (self.connect(prelude), False)
        while True:
            try:
                sock = self._idle.pop()
            except IndexError:
                return self.connect(), False
            if still_open(sock):
                return sock, True
            sock.close()

    def connect(self, prelude: bytes = b"") -> socket.socket:
        sock = open_connection(self.backend, self.connect_timeout, self.read_timeout, self.tls,
                               prelude)
        if prelude:
            self._private.tag(sock, prelude)
        return sock

    def reconnect(self, sock: socket.socket) -> socket.socket:
        """A fresh connection in place of `sock` (closed), with the same PROXY header."""
        prelude = self._private.untag(sock)
        sock.close()
        return self.connect(prelude)

    def release(self, sock: socket.socket) -> None:
        if self._private.tagged(sock):
            self._private.keep(sock, self.retired)
        elif not self.retired and len(self._idle) < MAX_IDLE_PER_BACKEND:
            self._idle.append(sock)
        else:
            sock.close()


class PrivateIdle:
    """Idle sockets that began with a PROXY header, by that header: one carries its first
    client's address for its whole life, so it is reused only for a request with the same
    header (same client address and port, same address it reached), as HAProxy does.
    Only pools with `send_proxy_protocol` put anything here."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle: OrderedDict[bytes, socket.socket] = OrderedDict()
        self._tags: weakref.WeakKeyDictionary[socket.socket, bytes] = \
            weakref.WeakKeyDictionary()

    def tag(self, sock: socket.socket, prelude: bytes) -> None:
        with self._lock:
            self._tags[sock] = prelude

    def tagged(self, sock: socket.socket) -> bool:
        return bool(self._tags) and sock in self._tags

    def untag(self, sock: socket.socket) -> bytes:
        with self._lock:
            return self._tags.pop(sock, b"")

    def take(self, prelude: bytes) -> socket.socket | None:
        with self._lock:
            sock = self._idle.pop(prelude, None)
        if sock is not None and not still_open(sock):
            sock.close()
            return None
        return sock

    def keep(self, sock: socket.socket, retired: bool) -> None:
        closing = []
        with self._lock:
            if retired:
                closing.append(sock)
            else:
                old = self._idle.pop(self._tags[sock], None)
                if old is not None:
                    closing.append(old)
                self._idle[self._tags[sock]] = sock
                while len(self._idle) > MAX_IDLE_PER_BACKEND:
                    closing.append(self._idle.popitem(last=False)[1])
        for each in closing:
            each.close()

    def close_all(self) -> None:
        with self._lock:
            closing = list(self._idle.values())
            self._idle.clear()
        for sock in closing:
            sock.close()


def open_connection(backend: Backend, connect_timeout: float, read_timeout: float,
                    tls: ssl.SSLContext | None = None, prelude: bytes = b"") -> socket.socket:
    """A new connection to a backend (IdleConnections and the health checks both use it);
    ConnectFailed says why not, in words fit for a log line or /status. `prelude` (a PROXY
    header) goes first, then the TLS handshake with `tls` for an https:// backend: both are
    part of connecting, so their failures are connect failures."""
    if backend.tls and tls is None:  # never plain text to an https:// backend
        raise ConnectFailed("no TLS context for an https backend (see the error log)",
                            timed_out=False)
    try:
        sock = socket.create_connection(backend.address, timeout=connect_timeout)
    except TimeoutError:
        raise ConnectFailed(f"connect timed out after {connect_timeout:g}s",
                            timed_out=True) from None
    except OSError as e:
        if e.errno in LOCAL_ERRNOS:
            raise LocalResourceError(e.errno, e.strerror) from None
        raise ConnectFailed(e.strerror or str(e), timed_out=False) from None
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if prelude or tls is not None:
        sock = _begin(sock, backend, connect_timeout, tls, prelude)
        if tls is not None:
            # A Python timeout, not the kernel's: on a blocking SSL socket an EAGAIN from
            # SO_RCVTIMEO makes the ssl module retry the read at once, for ever.
            sock.settimeout(read_timeout)
            return sock
    # A blocking socket whose kernel enforces the timeout (SO_RCVTIMEO, SO_SNDTIMEO), not a
    # Python socket timeout: with one, CPython poll()s before every send and recv, a system
    # call and a GIL hand-off more each (two per proxied request, measured with strace).
    # A wait past the timeout then fails with EAGAIN (BlockingIOError): see TIMED_OUT.
    sock.settimeout(None)
    seconds = int(read_timeout)
    timeval = struct.pack("ll", seconds, int((read_timeout - seconds) * 1_000_000))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
    return sock


def _begin(sock: socket.socket, backend: Backend, connect_timeout: float,
           tls: ssl.SSLContext | None, prelude: bytes) -> socket.socket:
    """The PROXY header (it precedes TLS on the wire), then the handshake; the socket is
    closed if either fails."""
    try:
        if prelude:
            sock.sendall(prelude)
        if tls is not None:
            return upstreamtls.handshake(sock, tls, backend.tls_name)
        return sock
    except ssl.SSLError as e:
        raise ConnectFailed(upstreamtls.failure_reason(e), timed_out=False) from None
    except TimeoutError:
        sock.close()
        raise ConnectFailed(f"TLS handshake timed out after {connect_timeout:g}s",
                            timed_out=True) from None
    except OSError as e:
        sock.close()
        raise ConnectFailed(e.strerror or str(e) or type(e).__name__, timed_out=False) from None


def still_open(sock: socket.socket) -> bool:
    """An idle upstream socket is reusable only if it has nothing to read (no EOF, no junk).

    poll() with a zero timeout, because recv() on a socket with a timeout waits first.
    """
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    if not poller.poll(0):
        return True
    return isinstance(sock, ssl.SSLSocket) and _only_tls_records(sock)


def tls_buffered(sock: socket.socket) -> bool:
    """A TLS socket holding decrypted bytes that poll() on its descriptor no longer shows."""
    return isinstance(sock, ssl.SSLSocket) and sock.pending() > 0


def _only_tls_records(sock: ssl.SSLSocket) -> bool:
    """A readable idle TLS socket may hold only records without application data (a TLS 1.3
    session ticket): still open if a non-blocking read finds nothing, not EOF nor junk."""
    timeout = sock.gettimeout()
    sock.setblocking(False)
    try:
        sock.recv(1)
    except ssl.SSLWantReadError:
        return True
    except OSError:
        return False
    finally:
        sock.settimeout(timeout)
    return False


def request_head(method: str, target: str, headers: dict[str, str]) -> bytes:
    """The request line and header section as one buffer, for one send.

    Every piece was validated before: method and field lines by gunicorn's parser (no CR,
    LF or NUL gets through it), the target by the proxy, and the values the proxy adds itself.
    """
    fields = "".join([f"{name}: {value}\r\n" for name, value in headers.items()])
    return f"{method} {target} HTTP/1.1\r\n{fields}\r\n".encode("latin-1")


class UpstreamResponse:
    """One backend answer: `read_head()` once, then `read_block()` until it returns b""."""

    __slots__ = ("sock", "method", "status", "reason", "headers", "complete", "keep_alive",
                 "_head_done", "_interim", "_until_eof", "_head_bytes", "_pending", "upgraded",
                 "continued", "leftover", "_parser")

    def __init__(self, sock: socket.socket, method: str) -> None:
        self.sock = sock
        self.method = method
        self.status = 0
        self.reason = ""
        self.headers: list[tuple[str, str]] = []
        self.complete = False  # the whole body has been parsed
        self.keep_alive = False  # the socket may carry another request once complete
        self._head_done = False
        self._interim = False
        self._until_eof = False  # no Content-Length, not chunked: the body ends at EOF
        self._head_bytes = 0
        self._pending: deque[bytes] = deque()
        self.upgraded = False  # a 101: what follows the head is the tunnel's, in `leftover`
        self.continued = False  # the backend sent `100 Continue`
        self.leftover = b""
        self._parser = httptools.HttpResponseParser(self)

    # llhttp callbacks -----------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._head_done:  # bytes after the answer: never reuse this socket
            self.keep_alive = False

    def on_status(self, status: bytes) -> None:
        self.reason = status.decode("latin-1")

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        code = self._parser.get_status_code()
        if 100 <= code < 200 and code != 101:  # interim (100 Continue, 103): not for relaying
            self._interim = True
            self.continued = self.continued or code == 100
            self.headers = []
            return
        self.status = code
        self._head_done = True
        self.keep_alive = self._parser.should_keep_alive()

    def on_body(self, body: bytes) -> None:
        self._pending.append(body)

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
        else:
            self.complete = True

    # reading --------------------------------------------------------------------------------

    def _feed(self, data: bytes) -> None:
        if self.upgraded:
            self.leftover += data
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as e:
            offset = e.args[0] if e.args and isinstance(e.args[0], int) else len(data)
            self.upgraded = True
            self.leftover = data[offset:]
            self.keep_alive = False
        except httptools.HttpParserError as e:
            self.keep_alive = False
            raise UpstreamProtocolError(f"invalid HTTP from backend: {e}") from None

    @property
    def head_done(self) -> bool:
        """The final status line and headers are in."""
        return self._head_done

    def _read_more(self) -> None:
        data = self.sock.recv(BLOCK)
        if not data:
            raise UpstreamClosed("backend closed the connection without answering")
        before = self._head_bytes
        self._feed(data)
        # Only head bytes count: the read that ends the head may carry body bytes behind it.
        if not self._head_done:
            size = self._head_bytes = before + len(data)
        elif before:  # the head came in several reads (one read cannot exceed the limit)
            size = before + len(data) - len(self.leftover) - sum(map(len, self._pending))
        else:
            return
        if size > MAX_HEAD:
            raise UpstreamProtocolError(f"response head larger than {MAX_HEAD} bytes")

    def await_continue(self, timeout: float) -> None:
        """After a head with `Expect: 100-continue`: wait up to `timeout` for the backend's
        `100 Continue` (then the body goes) or its final answer (then it never does)."""
        poller = select.poll()
        poller.register(self.sock, select.POLLIN)
        deadline = time.monotonic() + timeout
        while not self._head_done and not self.continued:
            left = deadline - time.monotonic()
            if left <= 0 or not (tls_buffered(self.sock) or poller.poll(left * 1000)):
                return  # silent: send the body anyway (RFC 9110 10.1.1), as curl does
            self._read_more()

    def read_head(self) -> None:
        """Read until the status line and headers are in (socket errors and timeouts propagate)."""
        while not self._head_done:
            self._read_more()
        if self.method == "HEAD" or self.status in (101, 204, 304):
            self.complete = True  # no body follows, whatever Content-Length says
            self._pending.clear()
        elif not self.complete and not any(
                name.lower() in ("content-length", "transfer-encoding")
                for name, _ in self.headers):
            self._until_eof = True
            self.keep_alive = False

    def release(self) -> None:
        """Drop the parser: it and this object refer to each other, and a reference cycle per
        request would leave every answer to the cyclic garbage collector (measured: a third
        of a worker's time under load went to collections)."""
        self._parser = None  # type: ignore[assignment]

    def take_body(self) -> bytes:
        """The whole body of a complete answer at once (then the parser is let go)."""
        pending = self._pending
        data = pending.popleft() if len(pending) == 1 else b"".join(pending)
        pending.clear()
        self.release()
        return data

    def read_block(self) -> bytes:
        """The next piece of the body, b"" after the last one; raises if the body breaks off."""
        while True:
            if self._pending:
                return self._pending.popleft()
            if self.complete:
                self.release()
                return b""
            data = self.sock.recv(BLOCK)
            if not data:
                if self._until_eof:
                    self.complete = True
                    return b""
                self.keep_alive = False
                raise UpstreamProtocolError("backend closed the connection before the body ended")
            self._feed(data)


def read_response_head(sock: socket.socket, method: str) -> UpstreamResponse:
    """A response whose status line and headers are read; its body is read on demand."""
    response = UpstreamResponse(sock, method)
    response.read_head()
    return response
