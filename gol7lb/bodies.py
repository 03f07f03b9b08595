"""Body adapters: the client's request body as attempts send it, and a backend's response
body as the WSGI iterable the server writes (streamed, or already whole)."""

from __future__ import annotations

import contextlib
import errno
import logging
import socket
from collections.abc import Iterator
from typing import Any

from gol7lb.exchange import Exchange
from gol7lb.upstream import (
    BLOCK,
    TIMED_OUT,
    IdleConnections,
    UpstreamProtocolError,
    UpstreamResponse,
)

log = logging.getLogger("gol7lb.proxy")  # the request path's logger (logfmt.LOGGERS)


class ClientBodyError(Exception):
    """The client's request body broke off or was malformed: not the backend's fault."""



class UpstreamBody:
    """The response body as a WSGI iterable: streamed block by block, never held whole."""

    def __init__(self, response: UpstreamResponse, sock: socket.socket,
                 connections: IdleConnections, client_sock: socket.socket | None,
                 exchange: Exchange) -> None:
        self.response = response
        self.sock = sock
        self.connections = connections
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
            self.connections.release(self.sock)
        else:
            self.sock.close()
        self.exchange.finish(self.sent)
        raise StopIteration

    def _abort(self, error: BaseException) -> None:
        """The backend failed mid-answer: the status is already sent, so cut the client off.

        Ending the iteration normally would tell the client the body was complete (a silent
        wrong answer); raising EPIPE makes gunicorn drop the connection without a traceback.
        """
        timed_out = isinstance(error, TIMED_OUT)
        reason = "timed out" if timed_out else str(error) or type(error).__name__
        self.exchange.flag("UT" if timed_out else "UC")
        log.error("backend %s failed mid-response (request %s): %s",
                  self.connections.backend.id, self.exchange.rid, reason)
        self._close(failed=True)
        if self.client_sock is not None:
            with contextlib.suppress(OSError):
                self.client_sock.shutdown(socket.SHUT_RDWR)
        raise BrokenPipeError(errno.EPIPE, "backend failed mid-response")

    def _close(self, failed: bool) -> None:
        self.response.release()
        if not self.done:
            self.done = True
            self.sock.close()  # unread bytes would poison the next request on this connection
            self.exchange.finish(self.sent, failed)

    def close(self) -> None:
        """Called by the server when the body was sent, or the client went away before (DC).
        Safe to call twice."""
        if not self.done:
            self.exchange.flag("DC")
        self._close(failed=False)


class FinishedBody(list[bytes]):
    """An answer whose body the backend already sent whole (most small ones come with their
    head): a plain list to the server, and the backend socket goes back to its backend's idle
    connections, and the request is counted and logged, when the server closes it after
    writing."""

    __slots__ = ("sock", "keep", "connections", "exchange", "sent")

    def __init__(self, data: bytes, sock: socket.socket, keep: bool, connections: IdleConnections,
                 exchange: Exchange) -> None:
        super().__init__((data,) if data else ())
        self.sock: socket.socket | None = sock
        self.keep = keep
        self.connections = connections
        self.exchange = exchange
        self.sent = len(data)

    def close(self) -> None:
        """Once only: a second call would keep the same backend socket twice (two requests
        would then share it) and count the request again."""
        sock = self.sock
        if sock is None:
            return
        self.sock = None
        if self.keep:
            self.connections.release(sock)
        else:
            sock.close()
        self.exchange.finish(self.sent)


class RequestBody:
    """The client's body as attempts send it. A body up to `proxy.retry_buffer` is read whole
    before the first attempt, so any attempt can send it again; a larger one is streamed
    once, and the request is never sent twice after that.

    With `Expect: 100-continue` (`deferred`) nothing is read before a backend has the head:
    the first read is what sends the client its `100 Continue`, and a backend that answers
    at once (a 401, a 413) spares the client sending the body at all.
    """

    def __init__(self, source: Any, length: int, chunked: bool, limit: int,
                 deferred: bool = False) -> None:
        self.source = source
        self.length = length
        self.chunked = chunked
        self.present = chunked or length > 0
        self.kept: bytes | None = None if self.present else b""
        self.deferred = deferred and self.present
        self._started = False  # some of the body was read from the client
        self._prefix = b""
        if self.deferred:
            return
        if chunked:
            data = self._read_up_to(limit + 1)
            if len(data) <= limit:
                self.kept = data
            else:
                self._prefix = data
        elif 0 < length <= limit:
            self.kept = self._read_up_to(length)
            if len(self.kept) < length:
                raise ClientBodyError(f"client sent {len(self.kept)} of {length} body bytes")

    @property
    def replayable(self) -> bool:
        return self.kept is not None or (self.deferred and not self._started)

    def _read_up_to(self, limit: int) -> bytes:
        parts = []
        got = 0
        while got < limit:
            try:
                block = self.source.read(min(BLOCK, limit - got))
            except Exception as e:  # gunicorn's body parser errors and client socket errors
                raise ClientBodyError(str(e) or type(e).__name__) from e
            if not block:
                break
            parts.append(block)
            got += len(block)
        return b"".join(parts)

    def framing(self, headers: dict[str, str]) -> None:
        """Content-Length for a kept body (a small chunked body goes out with a length)."""
        if self.kept is not None:
            if self.present:
                headers["Content-Length"] = str(len(self.kept))
        elif self.chunked:
            headers["Transfer-Encoding"] = "chunked"
        else:
            headers["Content-Length"] = str(self.length)

    def send(self, sock: socket.socket) -> None:
        if self.kept is not None:
            if self.kept:
                sock.sendall(self.kept)
            return
        self._started = True
        sent = 0
        block = self._prefix
        self._prefix = b""
        while True:
            if not block:
                try:
                    block = self.source.read(BLOCK)
                except Exception as e:
                    raise ClientBodyError(str(e) or type(e).__name__) from e
                if not block:
                    break
            sent += len(block)
            sock.sendall(b"%x\r\n%b\r\n" % (len(block), block) if self.chunked else block)
            block = b""
        if self.chunked:
            sock.sendall(b"0\r\n\r\n")
        elif sent < self.length:
            raise ClientBodyError(f"client sent {sent} of {self.length} body bytes")



NO_BODY = RequestBody(None, 0, False, 0)  # shared: a request without a body changes nothing in it
