"""HTTP/2 to clients on the worker's event loop: `h2` by ALPN on TLS, h2c by prior knowledge.

The `h2` library does the framing, HPACK and the protocol's state (sans-I/O); this module
moves bytes and hands streams over, never parsing a frame itself.

* A `Session` is one connection. The worker's loop reads its socket (level-triggered epoll,
  never a thread per connection) and feeds h2; the events open, fill and end `Stream`s. A
  stream whose request is in (or whose body outgrew `proxy.retry_buffer`, or that expects
  `100 Continue`) goes on the worker's queue as a job: a pool thread runs the same WSGI app
  (ProxyApp) as for HTTP/1.1, so routing, rules, balancing, limits, retries, the access log
  and the metrics are the same. Streams are independent: a slow one holds its own thread.
* One lock per session guards h2's state and the socket (OpenSSL allows one reader or
  writer at a time); a pool thread writes its stream's answer itself under it. Each stream
  waits on its own condition (the session's lock): a sender for flow-control window or room
  in the session's outgoing buffer (at most OUT_HIGH unsent bytes: a slow client's download
  is paced with flat memory), a body reader for data. The loop wakes them on WINDOW_UPDATE,
  DATA, resets and a drained buffer.
* Received data is acknowledged (`acknowledge_received_data`) when it is buffered before the
  stream has a thread (up to `proxy.retry_buffer`, as the HTTP/1.1 loop buffers), and after
  that when the app reads it, so a stalled upload holds at most one window.
* Limits: `max_concurrent_streams` counts a stream until its thread is done (a reset does not
  free the slot early, so resets cannot pile up work: CVE-2023-44487); one beyond it is
  refused alone (REFUSED_STREAM). Client resets and refusals beyond
  `max_resets_per_second` end the connection with GOAWAY ENHANCE_YOUR_CALM. A header list
  over `max_header_list` gets `431` on its stream; over twice that (an HPACK bomb) and any
  protocol error (h2's ProtocolError) close only this connection. A connection without
  streams is closed after `proxy.client_header_timeout` (first request) or
  `proxy.client_idle_timeout`; a body that stalls before its thread took it gets `408`.

The hand-off is a job with `serve(app, extra, seat)`: the WSGI app is one consumer of a
stream. A later native relay (HTTP/2 to backends with trailers, gRPC) can take a stream
instead, with the same flow control (`Stream.send`, `Stream.read`).
"""

from __future__ import annotations

import contextlib
import logging
import select
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    RemoteSettingsChanged,
    RequestReceived,
    StreamEnded,
    StreamReset,
    WindowUpdated,
)
from h2.exceptions import H2Error, ProtocolError
from h2.settings import SettingCodes, Settings

from gol7lb.config import Http2Settings
from gol7lb.http1 import Request
from gol7lb.serve import (
    EMPTY_BODY,
    WOULD_BLOCK,
    BodyStalled,
    ClientGone,
    Conn,
    RequestBody,
    build_environ,
    date_header,
)

if TYPE_CHECKING:
    from gol7lb.worker import Limits, Seat

log = logging.getLogger("gol7lb.http2")

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
RECV = 65536
FEED = 16384  # bytes given to h2 at a time: bounds the streams one read opens before refusals
OUT_HIGH = 256 * 1024  # unsent bytes past which senders wait and the loop stops reading
CONNECTION_WINDOWS = 4  # the connection's receive window, in stream windows
BOMB_FACTOR = 2  # a header list over this many max_header_list: the connection closes
_IN, _OUT = select.EPOLLIN, select.EPOLLOUT
_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "transfer-encoding",
                  "upgrade", "te"})


def is_preface(data: bytes) -> bool:
    """The first bytes of a plain connection start HTTP/2 by prior knowledge (h2 checks the
    rest of the preface). Fewer than four bytes stay HTTP/1.1 ("P" may be a POST)."""
    return data[:4] == b"PRI "


class _ServerConnection(H2Connection):
    """h2's connection with one change: h2 would end the whole connection (PROTOCOL_ERROR)
    when a client opens a stream beyond MAX_CONCURRENT_STREAMS; RFC 9113 5.1.2 lets the
    server refuse that stream alone (REFUSED_STREAM, retryable), which Session does."""

    @property
    def open_inbound_streams(self) -> int:
        super().open_inbound_streams  # noqa: B018 -- h2 forgets closed streams while counting
        return 0


class Session:
    """One HTTP/2 client connection (see the module's docstring)."""

    def __init__(self, conn: Conn, settings: Http2Settings, limits: Limits, epoll: Any,
                 dispatch: Callable[[Stream], None], close: Callable[[Conn], None]) -> None:
        self.conn = conn
        self.settings = settings
        self.limits = limits
        self.epoll = epoll
        self.dispatch = dispatch
        self.close_conn = close
        self.lock = threading.Lock()
        self.streams: dict[int, Stream] = {}
        self.out = bytearray()
        self.registered = 0
        self.closed = False
        self.draining = False
        self.resets = 0
        self.resets_since = time.monotonic()
        self.deadline = conn.deadline  # while no stream is open (head, then idle timeout)
        h2 = self.h2 = _ServerConnection(H2Configuration(client_side=False, header_encoding=None))
        h2.local_settings = Settings(client=False, initial_values={
            SettingCodes.MAX_CONCURRENT_STREAMS: settings.max_concurrent_streams,
            SettingCodes.INITIAL_WINDOW_SIZE: settings.initial_window,
            SettingCodes.MAX_HEADER_LIST_SIZE: settings.max_header_list,
        })
        h2.decoder.max_header_list_size = settings.max_header_list * BOMB_FACTOR
        h2.initiate_connection()
        window = min(settings.initial_window * CONNECTION_WINDOWS, 2**31 - 1)
        h2.increment_flow_control_window(window - 65535)

    # the loop's side ------------------------------------------------------------------------

    def start(self, data: bytes) -> None:
        """Take over the connection (its first bytes already read, for h2c)."""
        conn = self.conn
        conn.session = self
        conn.waiting = False  # the HTTP/1.1 sweeps and drains leave it to this session
        ready: list[Stream] = []
        with self.lock:
            self._interest()
            if data:
                self._receive(data, ready)
            self._flush()
        self._hand_over(ready)
        if conn.tls:  # bytes that came with the handshake's last flight wait inside OpenSSL,
            self.on_ready()  # where epoll cannot see them

    def on_ready(self) -> None:
        """The socket is readable or writable (level-triggered): write what waits, read."""
        ready: list[Stream] = []
        with self.lock:
            if self.closed:
                return
            self._flush()
            if self.closed or len(self.out) > OUT_HIGH:
                return  # the client is not reading: neither do we (pings cannot pile up)
            sock: Any = self.conn.sock
            try:
                data = sock.recv(RECV)
                if self.conn.tls:  # a TLS read returns one record: take what is decrypted
                    while data and sock.pending():
                        data += sock.recv(RECV)
            except WOULD_BLOCK:
                return
            except OSError:
                self._close()
                return
            if not data:
                self._close()
                return
            self._receive(data, ready)
            self._flush()
        self._hand_over(ready)

    def sweep(self, now: float) -> None:
        """Four times a second: a body that stalled before its thread gets 408; a connection
        without streams past its deadline is closed (GOAWAY first)."""
        try:
            self._sweep(now)
        except Exception:  # one connection's trouble never ends the worker's loop
            log.exception("error sweeping an HTTP/2 connection")
            with self.lock:
                self._close()

    def _sweep(self, now: float) -> None:
        with self.lock:
            if self.closed:
                return
            if not self.streams:
                if now >= self.deadline or self.draining:
                    self._goaway(ErrorCodes.NO_ERROR)
                return
            for stream in list(self.streams.values()):
                if not stream.dispatched and stream.deadline <= now:
                    self._answer(stream.id, 408, "request body not received in time")
                    self._forget(stream)
            self._flush()

    def drain(self) -> bool:
        """The worker stops: finish the streams in progress, refuse new ones, then GOAWAY and
        close; True while some are in progress."""
        with self.lock:
            if self.closed:
                return False
            # The streams in progress finish first, and new ones are refused (REFUSED_STREAM,
            # retryable); the GOAWAY comes once they are done (_forget): h2, on either side,
            # neither sends nor takes a stream's frames after a GOAWAY.
            self.draining = True
            if not self.streams:
                self._goaway(ErrorCodes.NO_ERROR)
                return False
            return True

    # events -----------------------------------------------------------------------------------

    def _receive(self, data: bytes, ready: list[Stream]) -> None:
        h2 = self.h2
        for start in range(0, len(data), FEED):
            try:
                events = h2.receive_data(data[start:start + FEED])
            except ProtocolError as e:  # h2 has queued its GOAWAY: send it, close
                log.debug("HTTP/2 protocol error from %s: %s", self.conn.peer[0], e)
                self._flush()
                self._close()
                return
            for event in events:
                if isinstance(event, DataReceived):
                    self._data(event)
                elif isinstance(event, RequestReceived):
                    self._request(event, ready)
                elif isinstance(event, StreamEnded):
                    stream = self.streams.get(event.stream_id)
                    if stream is not None:
                        stream.complete = True
                        stream.cond.notify_all()
                        if not stream.dispatched and stream not in ready:
                            ready.append(stream)
                elif isinstance(event, StreamReset):
                    self._reset(event)
                elif isinstance(event, WindowUpdated | RemoteSettingsChanged):
                    stream = self.streams.get(getattr(event, "stream_id", 0) or 0)
                    if stream is not None:
                        stream.cond.notify_all()
                    else:
                        self._wake_all()
                elif isinstance(event, ConnectionTerminated):
                    # h2 sends nothing after the client's GOAWAY (its state machine is
                    # closed), so streams still in progress cannot be answered: close.
                    self._flush()
                    self._close()
            if self.closed:
                return

    def _request(self, event: RequestReceived, ready: list[Stream]) -> None:
        stream_id = event.stream_id
        assert stream_id is not None
        headers = event.headers or []
        if self.draining:
            self._refuse(stream_id)
            return
        if len(self.streams) >= self.settings.max_concurrent_streams:
            self._refuse(stream_id)
            self._count_reset()
            return
        size = sum(len(name) + len(value) + 32 for name, value in headers)
        if size > self.settings.max_header_list:
            self._answer(stream_id, 431, "request header list too large")
            return
        stream = Stream(self, stream_id, headers, event.stream_ended is not None)
        self.streams[stream_id] = stream
        if stream.complete or stream.request.expect_continue:
            ready.append(stream)

    def _data(self, event: DataReceived) -> None:
        stream_id = event.stream_id
        assert stream_id is not None
        size = event.flow_controlled_length or 0
        stream = self.streams.get(stream_id)
        data = event.data or b""
        if stream is None or stream.reset or stream.answered:
            self._ack(size, stream_id)  # nobody reads it: the connection's window comes back
            return
        stream.received += len(data)
        if not stream.dispatched:
            self._ack(size, stream_id)  # the loop buffers up to retry_buffer, as for HTTP/1.1
            stream.body.append((data, 0))
            stream.deadline = time.monotonic() + self.limits.body_timeout
            if stream.received > self.limits.body_buffer:
                stream.dispatched = True  # a thread takes the rest as it comes
                self.dispatch(stream)
            return
        stream.body.append((data, size))  # acknowledged when the app reads it
        stream.cond.notify_all()

    def _reset(self, event: StreamReset) -> None:
        stream = self.streams.get(event.stream_id or 0)
        if event.remote_reset:
            self._count_reset()
        if stream is None:
            return
        stream.reset = True
        stream.cond.notify_all()
        if not stream.dispatched:
            self._forget(stream)  # a dispatched one is forgotten when its thread ends

    def _count_reset(self) -> None:
        """Rapid Reset: more resets (or refusals) in a second than allowed ends the
        connection."""
        now = time.monotonic()
        if now - self.resets_since >= 1.0:
            self.resets_since, self.resets = now, 0
        self.resets += 1
        if self.resets > self.settings.max_resets_per_second and not self.closed:
            log.info("HTTP/2 client %s reset more than %d streams a second: GOAWAY",
                     self.conn.peer[0], self.settings.max_resets_per_second)
            self._goaway(ErrorCodes.ENHANCE_YOUR_CALM)

    def _hand_over(self, ready: list[Stream]) -> None:
        for stream in ready:
            if stream.reset or stream.dispatched or self.closed:
                continue  # reset in the same read: never started (Rapid Reset costs nothing)
            stream.dispatched = True
            self.dispatch(stream)

    # helpers (the lock held) ------------------------------------------------------------------

    def _refuse(self, stream_id: int) -> None:
        with contextlib.suppress(H2Error):
            self.h2.reset_stream(stream_id, ErrorCodes.REFUSED_STREAM)

    def _answer(self, stream_id: int, status: int, reason: str) -> None:
        """The LB's own short answer on a stream that never reaches the app."""
        body = f"{status} {HTTPStatus(status).phrase}: {reason}\n".encode()
        try:
            self.h2.send_headers(stream_id, [
                (b":status", str(status).encode()),
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"content-length", str(len(body)).encode())])
            self.h2.send_data(stream_id, body, end_stream=True)
        except H2Error:
            self._refuse(stream_id)
        with contextlib.suppress(H2Error):  # stop a body still coming
            if self.h2.streams.get(stream_id) is not None and self.h2.streams[stream_id].open:
                self.h2.reset_stream(stream_id, ErrorCodes.NO_ERROR)

    def _ack(self, size: int, stream_id: int) -> None:
        if size:
            with contextlib.suppress(H2Error):
                self.h2.acknowledge_received_data(size, stream_id)

    def _forget(self, stream: Stream) -> None:
        """The stream is done here: its unread data's window comes back, its slot is free."""
        if self.streams.get(stream.id) is stream:
            del self.streams[stream.id]
        for _data, size in stream.body:
            self._ack(size, stream.id)
        stream.body.clear()
        if not stream.complete and not stream.reset:  # the answer ended before the body
            with contextlib.suppress(H2Error):
                self.h2.reset_stream(stream.id, ErrorCodes.NO_ERROR)
        stream.reset = True
        if not self.streams:
            self.deadline = time.monotonic() + self.limits.idle_timeout
            if self.draining:
                self._goaway(ErrorCodes.NO_ERROR)

    def _goaway(self, code: ErrorCodes) -> None:
        with contextlib.suppress(H2Error):
            self.h2.close_connection(code)
        self._flush()
        self._close()

    def _wake_all(self) -> None:
        for stream in self.streams.values():
            stream.cond.notify_all()

    def _flush(self) -> None:
        """Write what h2 produced, as far as the socket takes it; the rest waits for EPOLLOUT.
        A TLS retry sends the same bytes from the buffer's start (it only grows until then)."""
        data = self.h2.data_to_send()
        if data:
            self.out += data
        out = self.out
        before = len(out)
        sock = self.conn.sock
        while out and not self.closed:
            # released at once, even when send raises: a live view would forbid resizing `out`
            with memoryview(out) as view, view[:RECV] as piece:
                try:
                    sent = sock.send(piece)
                except WOULD_BLOCK:
                    break
                except OSError:
                    sent = -1
            if sent < 0:
                self._close()
                return
            del out[:sent]
        if len(out) < before and before > OUT_HIGH // 2:
            self._wake_all()  # senders waiting for room
        self._interest()

    def _interest(self) -> None:
        if self.closed:
            return
        want = (_IN if len(self.out) <= OUT_HIGH else 0) | (_OUT if self.out else 0)
        if want != self.registered:
            try:
                self.epoll.modify(self.conn.fd, want)
                self.registered = want
            except (OSError, ValueError):
                self._close()

    def _close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.out = bytearray()
        for stream in self.streams.values():
            stream.reset = True
            stream.cond.notify_all()
        self.close_conn(self.conn)

    # the pool threads' side -------------------------------------------------------------------

    def stream_done(self, stream: Stream) -> None:
        with self.lock:
            if not self.closed:
                self._forget(stream)
                self._flush()
            elif self.streams.get(stream.id) is stream:
                del self.streams[stream.id]


class Stream:
    """One request on a session: its head, its body as it arrives, its answer's sending.
    A job for a pool thread (`serve`)."""

    __slots__ = ("session", "id", "request", "cond", "body", "received", "complete",
                 "dispatched", "reset", "answered", "deadline", "has_length")

    def __init__(self, session: Session, stream_id: int,
                 headers: Iterable[tuple[bytes, bytes]], complete: bool) -> None:
        self.session = session
        self.id = stream_id
        self.cond = threading.Condition(session.lock)
        self.body: deque[tuple[bytes, int]] = deque()  # (data, bytes to acknowledge once read)
        self.received = 0
        self.complete = complete
        self.dispatched = False
        self.reset = False  # reset by the client, or the connection closed
        self.answered = False  # the answer ended (data still coming is dropped)
        self.deadline = time.monotonic() + session.limits.body_timeout
        self.has_length = False
        self.request = self._request(headers)

    def _request(self, headers: Iterable[tuple[bytes, bytes]]) -> Request:
        req = Request()
        req.version = "2"
        fields: list[tuple[str, str]] = []
        authority = host = ""
        for raw_name, raw_value in headers:
            name, value = raw_name.decode("latin-1"), raw_value.decode("latin-1")
            if name[0] == ":":
                if name == ":method":
                    req.method = value
                elif name == ":path":
                    req.target = value
                elif name == ":authority":
                    authority = value
                continue
            if name == "host":
                host = value
                continue
            if name == "content-length":
                self.has_length = True
            elif name == "expect" and value.lower() == "100-continue" and not self.complete:
                req.expect_continue = True
            fields.append((name, value))
        req.headers = [("host", authority or host)] + fields
        req.complete = self.complete
        return req

    # sending (a pool thread) ------------------------------------------------------------------

    def send(self, data: bytes, end: bool,
             head: list[tuple[bytes, bytes]] | None = None, timeout: float = 60.0) -> None:
        """Send the head (once), then data as the flow-control windows and the session's
        buffer allow, waiting on this stream's condition; ClientGone when the stream or the
        connection went away, TimeoutError when nothing moved for `timeout` seconds."""
        try:
            self._send(data, end, head, timeout)
        except H2Error as e:  # the stream or the connection closed under us (a GOAWAY)
            raise ClientGone(str(e) or type(e).__name__) from None

    def _send(self, data: bytes, end: bool, head: list[tuple[bytes, bytes]] | None,
              timeout: float) -> None:
        session = self.session
        h2 = session.h2
        with session.lock:
            self._check()
            if head is not None:
                h2.send_headers(self.id, head, end_stream=end and not data)
                if end and not data:
                    session._flush()
                    return
            view = memoryview(data)
            deadline = time.monotonic() + timeout
            while view:
                self._check()
                try:
                    window = h2.local_flow_control_window(self.id)
                except H2Error:
                    raise ClientGone("stream closed") from None
                if window <= 0 or len(session.out) > OUT_HIGH:
                    session._flush()
                    if len(session.out) > OUT_HIGH or window <= 0:
                        left = deadline - time.monotonic()
                        if left <= 0:
                            self._cancel()
                            raise TimeoutError("client stopped reading")
                        self.cond.wait(left)
                        continue
                size = min(len(view), window, h2.max_outbound_frame_size)
                last = size == len(view)
                h2.send_data(self.id, view[:size].tobytes(), end_stream=end and last)
                view = view[size:]
                deadline = time.monotonic() + timeout  # progress: the client reads
                session._flush()
            if end and not data:
                h2.end_stream(self.id)
            session._flush()

    def _check(self) -> None:
        if self.reset or self.session.closed:
            raise ClientGone("stream reset or connection closed")

    def _cancel(self) -> None:
        with contextlib.suppress(H2Error):
            self.session.h2.reset_stream(self.id, ErrorCodes.CANCEL)
        self.reset = True
        self.session._flush()

    def abort(self) -> None:
        """The answer cannot be completed (a backend broke off mid-body): reset the stream so
        the client never takes a cut body for a whole one."""
        session = self.session
        with session.lock:
            if not self.reset and not session.closed:
                with contextlib.suppress(H2Error):
                    session.h2.reset_stream(self.id, ErrorCodes.INTERNAL_ERROR)
                self.reset = True
                session._flush()

    # receiving (a pool thread) ----------------------------------------------------------------

    def read_piece(self, timeout: float, lend: Callable[[], None] | None,
                   want_continue: bool) -> bytes | None:
        """The next body piece (None at the body's end), acknowledged as read; BodyStalled
        after `timeout` silent seconds."""
        session = self.session
        with session.lock:
            if want_continue and not self.body and not self.complete:
                with contextlib.suppress(H2Error):
                    session.h2.send_headers(self.id, [(b":status", b"100")])
                session._flush()
            deadline = time.monotonic() + timeout
            lent = False
            while not self.body:
                if self.complete:
                    return None
                self._check()
                if not lent and lend is not None:
                    lent = True
                    lend()
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BodyStalled(f"no request body bytes for {timeout:g}s")
                self.cond.wait(left)
            data, size = self.body.popleft()
            if size:
                session._ack(size, self.id)
                session._flush()
            return data

    # the WSGI app on a pool thread ------------------------------------------------------------

    def serve(self, app: Callable[..., Iterable[bytes]], extra: dict[str, Any],
              seat: Seat) -> None:
        session = self.session
        limits = session.limits
        req = self.request
        if not self.has_length:  # the body's framing for the app (and the backend)
            if not self.complete:
                req.headers.append(("transfer-encoding", "chunked"))
            elif self.received:
                req.headers.append(("content-length", str(self.received)))
        body: H2Body | Any = EMPTY_BODY if self.complete and not self.body else \
            H2Body(self, limits.body_timeout, seat.lend)
        environ = build_environ(session.conn, req, body)
        environ.update(extra)
        environ["gunicorn.socket"] = None  # the socket is the session's: never the app's
        response = H2Response(self, limits.idle_timeout)
        result: Iterable[bytes] | None = None
        try:
            result = app(environ, response.start_response)
            for block in result:
                if block:
                    response.write(block)
            response.finish()
        except (ClientGone, TimeoutError):
            pass
        except OSError:  # the backend broke off mid-answer (bodies.py): a cut stream
            self.abort()
        except Exception:
            log.exception("error handling %s %s over HTTP/2", req.method, req.target)
            if not response.head_sent:
                with contextlib.suppress(OSError):
                    response.start_response("500 Internal Server Error",
                                            [("Content-Type", "text/plain")])
                    self.send(b"500 Internal Server Error\n", True, response.head(), 1.0)
            else:
                self.abort()
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                try:
                    close()
                except Exception:
                    log.exception("error closing the response of %s %s", req.method,
                                  req.target)
            seat.request_ended()
            session.stream_done(self)


class H2Body(RequestBody):
    """wsgi.input of a stream: serve.RequestBody's reads over the stream's data."""

    def __init__(self, stream: Stream, timeout: float,
                 lend: Callable[[], None] | None) -> None:
        self.stream = stream
        self.timeout = timeout
        self.lend = lend
        self.buffer = b""
        self.want_continue = stream.request.expect_continue

    def _more(self) -> bool:
        piece = self.stream.read_piece(self.timeout, self.lend, self.want_continue)
        self.want_continue = False
        if piece is None:
            return False
        self.buffer = self.buffer + piece if self.buffer else piece
        return True


class H2Response:
    """start_response and the body writer of one stream: the head goes with the first data."""

    __slots__ = ("stream", "timeout", "status", "headers", "head_sent", "no_body",
                 "remaining", "code")

    def __init__(self, stream: Stream, timeout: float) -> None:
        self.stream = stream
        self.timeout = timeout
        self.status = ""
        self.headers: list[tuple[str, str]] = []
        self.head_sent = False
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

    def head(self) -> list[tuple[bytes, bytes]]:
        code = self.code = int(self.status[:3])
        sts = self.stream.session.conn.sts
        fields = [(b":status", str(code).encode())]
        length: int | None = None
        for name, value in self.headers:
            lower = name.lower()
            if lower in _HOP or (sts and lower == "strict-transport-security"):
                continue
            if lower == "content-length":
                length = int(value)
            fields.append((lower.encode("latin-1"), value.encode("latin-1")))
        if sts:  # tls.hsts: "Strict-Transport-Security: max-age=N\r\n"
            fields.append((b"strict-transport-security",
                           sts.partition(b":")[2].strip()))
        fields.append((b"date", date_header()[6:-2]))
        if self.stream.request.method == "HEAD" or code in (204, 304):
            self.no_body = True
        elif length is not None:
            self.remaining = length
        return fields

    def write(self, data: bytes) -> None:
        head = None
        if not self.head_sent:
            head = self.head()
            self.head_sent = True
        if self.no_body:
            data = b""
        elif self.remaining is not None:
            data = data[:self.remaining]
            self.remaining -= len(data)
        if head is not None or data:
            self.stream.send(data, False, head, self.timeout)

    def finish(self) -> None:
        head = None
        if not self.head_sent:
            head = self.head()
            self.head_sent = True
        if self.remaining:  # the app sent less than it announced: never a silent cut
            self.stream.abort()
            return
        self.stream.send(b"", True, head, self.timeout)
        self.stream.answered = True


def tls_wants_h2(sock: Any) -> bool:
    """A finished TLS handshake chose h2 by ALPN."""
    return isinstance(sock, ssl.SSLSocket) and sock.selected_alpn_protocol() == "h2"
