"""Client-side HTTP/1.1 request parsing on httptools (llhttp), with the limits and framing rules
an edge proxy must enforce before anything reaches a backend.

Pure: bytes in, request heads and body pieces out, `RequestError` (status, reason) for whatever
must be refused. No sockets here, so every rule is unit-testable. llhttp is strict by default
(CL+TE, duplicate or invalid Content-Length, obs-fold, control characters, bare CR/LF are
errors); on top of it this module refuses what llhttp lets through: transfer codings other
than exactly one `chunked`, Transfer-Encoding in HTTP/1.0, HTTP/1.1 without Host, versions
other than 1.x, and heads over the size limits.
"""

from __future__ import annotations

import re
from collections import deque

import httptools

from gol7lb.target import valid_authority

MAX_REQUEST_LINE = 8192  # a request line longer than this: 414 (nginx's large buffer size)
_BAD_VALUE = frozenset(range(0x20)) - {0x09} | {0x7F}
# llhttp's request parser also speaks RTSP and ICE; a request line in those is not HTTP.
_OTHER_PROTOCOL = re.compile(rb"(?m)^[!-~]+ [!-~]+ (?:RTSP|ICE)/")


class RequestError(Exception):
    """A request that is refused with `status` and the connection closed."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class Request:
    """One request head as parsed; its body pieces arrive in `body` until `complete`."""

    __slots__ = ("method", "target", "version", "headers", "keep_alive", "upgrade", "chunked",
                 "length", "expect_continue", "body", "received", "complete", "host_count")

    def __init__(self) -> None:
        self.method = ""
        self.target = ""
        self.version = "1.1"
        self.headers: list[tuple[str, str]] = []
        self.keep_alive = True
        self.upgrade = False
        self.chunked = False
        self.length: int | None = None
        self.expect_continue = False
        self.body: deque[bytes] = deque()
        self.received = 0  # body bytes parsed so far (the event loop buffers up to a limit)
        self.complete = False
        self.host_count = 0


class Http1Parser:
    """One client connection's parser: `feed()` bytes, take complete heads from `ready`.

    The request whose body is being received is `receiving`; a pipelined request's head may be
    ready while an earlier one is still served (they are answered in order). After an upgrade
    request (`Connection: upgrade`, or CONNECT) the parser stops: what followed the head is in
    `leftover` and belongs to the tunnel.
    """

    def __init__(self, max_header_bytes: int = 16384, max_headers: int = 100) -> None:
        self.max_header_bytes = max_header_bytes
        self.max_headers = max_headers
        self.ready: deque[Request] = deque()
        self.receiving: Request | None = None
        self.in_head = False  # a message has begun and its head is not complete
        self.upgraded = False
        self.leftover = b""
        self._parser = httptools.HttpRequestParser(self)
        self._req = Request()
        self._url: list[bytes] = []
        self._url_bytes = 0
        self._method_len = 0
        self._counted = 0  # head bytes seen through callbacks (request line + header lines)
        self._raw = 0  # raw bytes fed since the message began (bounds llhttp's own buffering)
        self._begun_in_feed = False
        self._headers_done = False
        self._te: list[str] = []
        self._cl_seen = False
        self._head_buf = b""  # a head's raw bytes, while it comes in several pieces
        self._data = b""

    # feeding ----------------------------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        """Parse more bytes; raises RequestError for anything that must be refused."""
        if self.upgraded:
            self.leftover += data
            return
        self._begun_in_feed = False
        if self.in_head:
            self._head_buf += data
        self._data = data
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as e:
            offset = e.args[0] if e.args and isinstance(e.args[0], int) else len(data)
            self.upgraded = True
            self.leftover = data[offset:]
            return
        except httptools.HttpParserCallbackError as e:  # one of ours, raised in a callback
            cause = e.__context__ if isinstance(e.__context__, RequestError) else None
            raise cause or RequestError(400, "malformed request") from None
        except httptools.HttpParserInvalidMethodError:
            raise RequestError(400, "invalid method") from None
        except httptools.HttpParserError as e:
            raise RequestError(400, _reason(e)) from None
        if self.in_head:
            if self._begun_in_feed:
                self._head_buf = data
            self._raw = self._counted if self._begun_in_feed else self._raw + len(data)
            if self._raw > self.max_header_bytes:
                raise RequestError(431, "request header section too large")

    def release(self) -> None:
        """Break the reference cycle with the httptools parser once the connection is done."""
        self._parser = None  # type: ignore[assignment]

    @property
    def started(self) -> bool:
        """Some bytes of a request head are in (a slow client, not an idle one)."""
        return self.in_head

    # llhttp callbacks -------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._req = Request()
        self._url = []
        self._url_bytes = 0
        self._counted = 0
        self._raw = 0
        self._begun_in_feed = True
        self._headers_done = False
        self._te = []
        self._cl_seen = False
        self.in_head = True

    def on_url(self, url: bytes) -> None:
        if not self._url:  # the request line's other bytes: "METHOD " and " HTTP/1.1\r\n"
            self._method_len = len(self._parser.get_method())
            self._counted += self._method_len + 12
        self._url.append(url)
        self._counted += len(url)
        self._url_bytes += len(url)
        # the whole line: method, space, target, " HTTP/1.1" (the method is parsed by now)
        line = self._method_len + 1 + self._url_bytes + 9
        if line > MAX_REQUEST_LINE:
            raise RequestError(414, "request line too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        req = self._req
        self._counted += len(name) + len(value) + 4
        if self._headers_done:
            # A trailer field of a chunked body. It is dropped: it must never join the header
            # section (RFC 9110 6.5.1; a `Host` trailer would change the request after its
            # route was chosen), and the body goes on with its own framing.
            if self._counted > self.max_header_bytes:
                raise RequestError(431, "request trailer section too large")
            return
        if len(req.headers) >= self.max_headers:
            raise RequestError(431, "too many header fields")
        if self._counted > self.max_header_bytes:
            raise RequestError(431, "request header section too large")
        if not _BAD_VALUE.isdisjoint(value):  # llhttp refuses most; never pass one on
            raise RequestError(400, "control character in a header value")
        text_name = name.decode("latin-1")
        text_value = value.decode("latin-1")
        lower = text_name.lower()
        if lower == "host":
            req.host_count += 1
        elif lower == "transfer-encoding":
            self._te.extend(t.strip().lower() for t in text_value.split(","))
        elif lower == "content-length":
            self._cl_seen = True
        elif lower == "expect":
            req.expect_continue = text_value.strip().lower() == "100-continue"
        req.headers.append((text_name, text_value))

    def on_headers_complete(self) -> None:
        req = self._req
        parser = self._parser
        self._headers_done = True
        self.in_head = False
        self._counted += 2  # the empty line that ends the head
        if self._counted > self.max_header_bytes:
            raise RequestError(431, "request header section too large")
        raw = (self._head_buf + self._data) if self._head_buf else self._data
        self._head_buf = b""
        if (b"TSP/" in raw or b"ICE/" in raw) and _OTHER_PROTOCOL.search(
                raw.partition(b"\r\n\r\n")[0]):
            raise RequestError(400, "not an HTTP request")  # llhttp also speaks RTSP and ICE
        req.version = parser.get_http_version()
        if req.version not in ("1.1", "1.0"):
            raise RequestError(505 if req.version.startswith("2") else 400,
                               "HTTP version not supported")
        if req.version == "1.0":
            req.expect_continue = False  # never a 1xx to an HTTP/1.0 client (RFC 9110 15.2)
        req.method = parser.get_method().decode("ascii", "replace")
        req.target = b"".join(self._url).decode("latin-1")
        req.keep_alive = parser.should_keep_alive()
        req.upgrade = parser.should_upgrade()
        if req.version == "1.1" and req.host_count != 1:
            raise RequestError(400, "HTTP/1.1 request without exactly one Host header")
        if req.host_count > 1:
            raise RequestError(400, "more than one Host header")
        if req.host_count and not valid_authority(_host(req.headers)):
            raise RequestError(400, "Host header is not a valid host[:port]")
        if self._te:
            if req.version == "1.0":
                raise RequestError(400, "Transfer-Encoding in an HTTP/1.0 request")
            if self._te != ["chunked"]:
                if all(t == "chunked" for t in self._te):
                    raise RequestError(400, "repeated transfer coding")
                raise RequestError(501, "transfer coding not supported")
            req.chunked = True
        elif self._cl_seen:
            for name, value in req.headers:
                if name.lower() == "content-length":
                    req.length = int(value.strip())  # llhttp checked it is one decimal number
        else:
            req.length = 0
        self.receiving = req
        self.ready.append(req)

    def on_body(self, body: bytes) -> None:
        req = self.receiving
        if req is not None:
            req.body.append(body)
            req.received += len(body)

    def on_message_complete(self) -> None:
        if self.receiving is not None:
            self.receiving.complete = True
            self.receiving = None


def _host(headers: list[tuple[str, str]]) -> str:
    """The one Host value (usually the first field, so this loop is short)."""
    return next(value for name, value in headers if len(name) == 4 and name.lower() == "host")


def _reason(error: Exception) -> str:
    text = str(error)
    return text if text.isprintable() and len(text) < 120 else "malformed request"
