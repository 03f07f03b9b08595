"""The demo backend: a threaded HTTP/1.1 server with endpoints made for testing a proxy.

Standard library only, so it starts wherever the load balancer does. Choices that matter:

* one daemon thread per connection, so a slow or idle keep-alive client never blocks
  the others and never holds the process open at exit;
* TCP_NODELAY on every accepted socket: a response written in several pieces would
  otherwise wait ~40 ms on Nagle's algorithm and delayed ACKs;
* ``protocol_version = "HTTP/1.1"`` and a length (or chunked framing) on every response,
  so clients and the load balancer keep connections alive;
* request bodies are read as a stream (Content-Length or chunked), never held whole;
* TERM and INT stop it with exit status 0 and no traceback.

Endpoints are listed in :class:`BackendHandler`.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import re
import signal
import socket
import socketserver
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from io import BufferedIOBase
from types import FrameType
from typing import NoReturn
from urllib.parse import parse_qs, urlsplit

BLOCK_SIZE = 64 * 1024
"""Size of one write when streaming, and of one read of a request body."""
MAX_BYTES = 10 * 1024**3
"""Largest body `/bytes/N` sends (10 GiB): big enough to prove streaming, bounded."""
MAX_SLEEP = 300.0
"""Longest `/sleep/S`, in seconds."""
MAX_LINE = 8 * 1024
"""Longest chunk-size or trailer line accepted in a chunked request body."""
MAX_TRAILERS = 100
IDLE_TIMEOUT = 120.0
"""Seconds a connection may sit idle (or stall mid-transfer) before it is closed."""
PATTERN = bytes(range(256)) * (BLOCK_SIZE // 256)
"""What `/bytes/N` sends: the byte at offset i is ``i % 256``."""
TEXT = "text/plain; charset=utf-8"

_DIGITS = re.compile(r"[0-9]+")
_DECIMAL = re.compile(r"[0-9]+(?:\.[0-9]*)?|\.[0-9]+")
_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,16}")
_GET_ROUTES = {  # first path segment -> whether an argument segment follows
    "": False, "healthz": False, "response-headers": False, "drop": False, "garbage": False,
    "bytes": True, "sleep": True, "status": True,
}


class BadBody(Exception):
    """The request body's framing is broken or unsupported: answer `status` and close."""

    def __init__(self, message: str, status: int = HTTPStatus.BAD_REQUEST) -> None:
        super().__init__(message)
        self.status = status


class BadNumber(ValueError):
    """A number in the path is malformed or out of range: answered with 400."""


def _read_line(rfile: BufferedIOBase) -> bytes:
    """One CRLF- (or LF-) terminated line without its terminator; bounded in length."""
    line = rfile.readline(MAX_LINE + 1)
    if not line.endswith(b"\n"):
        raise BadBody("chunked body: line too long or body ended early")
    return line[:-2] if line.endswith(b"\r\n") else line[:-1]


def read_fixed(rfile: BufferedIOBase, length: int) -> Iterator[bytes]:
    """A Content-Length body, in pieces of at most BLOCK_SIZE bytes."""
    remaining = length
    while remaining:
        data = rfile.read(min(remaining, BLOCK_SIZE))
        if not data:
            raise BadBody("body shorter than its Content-Length")
        remaining -= len(data)
        yield data


def read_chunked(rfile: BufferedIOBase) -> Iterator[bytes]:
    """A chunked body (RFC 9112 section 7.1), decoded; extensions and trailers are skipped."""
    while True:
        size_field = _read_line(rfile).split(b";", 1)[0].strip()
        if not _CHUNK_SIZE.fullmatch(size_field):
            raise BadBody(f"chunked body: bad chunk size {size_field[:40]!r}")
        size = int(size_field, 16)
        if size == 0:
            break
        yield from read_fixed(rfile, size)
        if _read_line(rfile) != b"":
            raise BadBody("chunked body: chunk data not followed by CRLF")
    for _ in range(MAX_TRAILERS + 1):
        if _read_line(rfile) == b"":
            return
    raise BadBody("chunked body: too many trailer fields")


def parse_count(text: str, limit: int) -> int:
    """A non-negative decimal integer no larger than `limit`."""
    if not _DIGITS.fullmatch(text) or int(text) > limit:
        raise BadNumber(f"expected an integer from 0 to {limit}, got {text!r}")
    return int(text)


def parse_seconds(text: str) -> float:
    """A plain decimal number of seconds from 0 to MAX_SLEEP (no nan, inf or exponents)."""
    if not _DECIMAL.fullmatch(text) or float(text) > MAX_SLEEP:
        raise BadNumber(f"expected seconds from 0 to {MAX_SLEEP:g}, got {text!r}")
    return float(text)


def parse_status(text: str) -> int:
    """A final status code: 200 to 599 (1xx are interim and cannot end a response)."""
    if not _DIGITS.fullmatch(text) or not 200 <= int(text) <= 599:
        raise BadNumber(f"expected a status from 200 to 599, got {text!r}")
    return int(text)


class BackendHandler(BaseHTTPRequestHandler):
    """Endpoints (every response carries ``X-Backend-Port``):

    * ``GET /`` -> ``backend <port>``; ``GET /healthz`` -> ``ok``
    * ``/echo...`` (any method) -> JSON describing the request as received
    * ``GET /bytes/N[?chunked=1]`` -> N pattern bytes, streamed
    * ``GET /sleep/S`` -> waits S seconds; ``GET /status/N`` -> status N
    * ``GET /response-headers`` -> repeated and hop-by-hop response headers
    * ``GET /drop`` -> closes without answering; ``GET /garbage`` -> a non-HTTP answer
    * anything else -> 404; GET-only endpoints answer other methods with 405
    """

    server: BackendServer
    protocol_version = "HTTP/1.1"
    server_version = "gol7lb-demo-backend"
    sys_version = ""
    timeout = IDLE_TIMEOUT
    # Buffered writes: a small response leaves in one segment; streams flush explicitly.
    wbufsize = -1

    _close_sent = False

    def version_string(self) -> str:
        return self.server_version

    def __getattr__(self, name: str) -> Callable[[], None]:
        """Every method, known or invented, goes to the router (http.server wants do_X)."""
        if name.startswith("do_"):
            return self.route
        raise AttributeError(name)

    # -- plumbing -------------------------------------------------------------------------

    def log_message(self, format: str, *args: object) -> None:
        """Quiet unless started with --log: logging every request costs time under load."""
        if self.server.log_requests:
            super().log_message(format, *args)

    def send_response(self, code: int, message: str | None = None) -> None:
        """Every final response names this backend and says when the connection will close."""
        super().send_response(code, message)
        self._close_sent = False
        self.send_header("X-Backend-Port", str(self.server.port))
        if self.close_connection:
            self.send_header("Connection", "close")

    def send_header(self, keyword: str, value: str) -> None:
        """As the base class, but `Connection: close` is sent at most once per response."""
        if keyword.lower() == "connection" and value.lower() == "close":
            if self._close_sent:
                return
            self._close_sent = True
        super().send_header(keyword, value)

    def handle_expect_100(self) -> bool:
        """Send `100 Continue` at once: the buffered writer would otherwise hold it back."""
        result = super().handle_expect_100()
        self.wfile.flush()
        return result

    def raw_target(self) -> str:
        """The request target exactly as on the request line (`self.path` folds leading //)."""
        words = self.requestline.split()
        return words[1] if len(words) >= 2 else self.path

    def body(self) -> Iterator[bytes]:
        """The request body as a stream of pieces; raises BadBody for framing it cannot trust."""
        encodings = self.headers.get_all("Transfer-Encoding")
        if encodings:
            codings = [c.strip().lower() for v in encodings for c in v.split(",") if c.strip()]
            if codings != ["chunked"]:
                raise BadBody(f"unsupported transfer coding {codings}", HTTPStatus.NOT_IMPLEMENTED)
            if self.headers.get("Content-Length") is not None:
                self.close_connection = True  # both framings present: answer, then close
            return read_chunked(self.rfile)
        lengths = self.headers.get_all("Content-Length")
        if not lengths:
            return iter(())
        values = {v.strip() for v in ",".join(lengths).split(",")}
        value = values.pop()
        if values or not _DIGITS.fullmatch(value):
            raise BadBody(f"bad Content-Length {lengths}")
        return read_fixed(self.rfile, int(value))

    def respond(self, status: int, body: bytes | None, content_type: str = TEXT,
                headers: Sequence[tuple[str, str]] = ()) -> None:
        """A whole response; `body=None` sends no body and no length (204, 304)."""
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        if body is not None:
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body and self.command != "HEAD":
            self.wfile.write(body)

    # -- routing --------------------------------------------------------------------------

    def route(self) -> None:
        """Dispatch on the path of the raw target (origin or absolute form)."""
        target = self.raw_target()
        path, _, query = target.partition("?")
        if not path.startswith("/"):
            parts = urlsplit(target)
            path, query = parts.path, parts.query
        try:
            if path.startswith("/echo"):
                self.echo(target)
                return
            # Nothing else looks at the body; read it off so the next request starts in step.
            for _ in self.body():
                pass
        except BadBody as exc:
            self.close_connection = True
            self.respond(exc.status, f"{exc}\n".encode())
            return
        try:
            self.dispatch_get(path, query)
        except BadNumber as exc:
            self.respond(HTTPStatus.BAD_REQUEST, f"{exc}\n".encode())

    def dispatch_get(self, path: str, query: str) -> None:
        """The GET (and HEAD) endpoints; other methods on them get 405."""
        name, slash, arg = path[1:].partition("/")
        if _GET_ROUTES.get(name) != bool(slash):
            self.respond(HTTPStatus.NOT_FOUND, b"not found\n")
            return
        if self.command not in ("GET", "HEAD"):
            self.respond(HTTPStatus.METHOD_NOT_ALLOWED, b"method not allowed\n",
                         headers=[("Allow", "GET, HEAD")])
            return
        if name == "":
            self.respond(HTTPStatus.OK, f"backend {self.server.port}\n".encode())
        elif name == "healthz":
            self.respond(HTTPStatus.OK, b"ok\n")
        elif name == "bytes":
            chunked = parse_qs(query).get("chunked", [""])[-1].lower() in ("1", "true", "yes")
            self.send_bytes(parse_count(arg, MAX_BYTES), chunked)
        elif name == "sleep":
            self.sleep(arg)
        elif name == "status":
            self.status(parse_status(arg))
        elif name == "response-headers":
            self.response_headers()
        elif name == "drop":
            self.close_connection = True  # and send nothing at all
        elif name == "garbage":
            self.close_connection = True
            self.wfile.write(b"this is not http\r\n\r\n")

    # -- endpoints ------------------------------------------------------------------------

    def echo(self, target: str) -> None:
        """Describe the request as received; the body is hashed as it streams in."""
        digest = hashlib.sha256()
        length = 0
        for piece in self.body():
            digest.update(piece)
            length += len(piece)
        doc = {
            "method": self.command,
            "target": target,
            "version": self.request_version,
            "headers": [[name, value] for name, value in self.headers.items()],
            "body_length": length,
            "body_sha256": digest.hexdigest(),
            "port": self.server.port,
        }
        self.respond(HTTPStatus.OK, (json.dumps(doc) + "\n").encode(), "application/json")

    def send_bytes(self, count: int, chunked: bool) -> None:
        """Stream `count` pattern bytes in BLOCK_SIZE writes, each sent as soon as written."""
        chunked = chunked and self.request_version != "HTTP/1.0"  # 1.0 has no chunked framing
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "application/octet-stream")
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Content-Length", str(count))
        self.end_headers()
        if self.command == "HEAD":
            return
        self.wfile.flush()  # headers first, as a server producing its body over time would
        block = memoryview(PATTERN)
        remaining = count
        while remaining:
            size = min(remaining, BLOCK_SIZE)
            if chunked:
                self.wfile.write(b"%x\r\n" % size + block[:size] + b"\r\n")
            else:
                self.wfile.write(block[:size])
            self.wfile.flush()
            remaining -= size
        if chunked:
            self.wfile.write(b"0\r\n\r\n")

    def sleep(self, arg: str) -> None:
        """Answer after `arg` seconds: for timeouts and in-flight requests at shutdown."""
        time.sleep(parse_seconds(arg))
        self.respond(HTTPStatus.OK, f"slept {arg}\n".encode())

    def status(self, code: int) -> None:
        """Answer with `code`; 204 and 304 have no body, 205 an empty one."""
        if code in (HTTPStatus.NO_CONTENT, HTTPStatus.NOT_MODIFIED):
            self.respond(code, None)
        elif code == HTTPStatus.RESET_CONTENT:
            self.respond(code, b"")
        else:
            self.respond(code, f"status {code}\n".encode())

    def response_headers(self) -> None:
        """Repeated and hop-by-hop headers, for testing what a proxy keeps and removes."""
        self.respond(HTTPStatus.OK, b"headers\n", headers=[
            ("Set-Cookie", "a=1; Path=/"),
            ("Set-Cookie", "b=2; Path=/"),
            ("Connection", "X-Hop-Test"),
            ("X-Hop-Test", "1"),
            ("Keep-Alive", "timeout=5"),
            ("Proxy-Authenticate", "Basic"),
            ("Upgrade", "h2c"),
            ("X-End-To-End", "kept"),
        ])


class BackendServer(ThreadingHTTPServer):
    """ThreadingHTTPServer tuned for being load-tested behind a proxy."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024  # the default 5 drops connections under a burst

    def __init__(self, host: str, port: int, *, log_requests: bool = False) -> None:
        family, _, _, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        if isinstance(address[0], int):  # (family, raw bytes): a Python built without IPv6
            raise OSError(f"cannot bind {host!r}: this Python has no support for its family")
        self.address_family = family
        self.log_requests = log_requests
        super().__init__(address, BackendHandler)

    @property
    def port(self) -> int:
        return self.server_address[1]

    def server_bind(self) -> None:
        """Bind without HTTPServer's getfqdn(), which can wait on DNS for 0.0.0.0."""
        socketserver.TCPServer.server_bind(self)
        self.server_name = str(self.server_address[0])
        self.server_port = self.server_address[1]

    def get_request(self) -> tuple[socket.socket, object]:
        """Accept, then turn Nagle off so multi-write responses do not wait for ACKs."""
        conn, address = super().get_request()
        with contextlib.suppress(OSError):  # the peer already left; the handler will see
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn, address

    def handle_error(self, request: object, client_address: object) -> None:
        """A client that went away is normal; anything else gets one line, not a traceback."""
        exc = sys.exception()
        if isinstance(exc, (ConnectionError, TimeoutError)):
            return
        print(f"backend {self.port}: error serving {client_address}: {exc!r}",
              file=sys.stderr, flush=True)


class _Stop(BaseException):
    """Raised by the TERM/INT handler; a BaseException so socketserver's `except Exception`
    blocks let it through to `main`."""


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """One line on stderr and exit 2 (argparse would also print the usage)."""
        self.exit(2, f"{self.prog}: error: {message}\n")


def _port(text: str) -> int:
    if not _DIGITS.fullmatch(text) or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"must be an integer from 1 to 65535, not {text!r}")
    return int(text)


def _host(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = _ArgumentParser(prog="backend", description="GoL7-LB demo backend")
    parser.add_argument("port", type=_port, metavar="PORT", help="TCP port to listen on")
    parser.add_argument("--host", type=_host, default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--log", action="store_true", help="log every request on stderr")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Serve until TERM or INT; 0 on a signal, 2 on bad arguments or an unusable address."""
    args = parse_args(argv)
    stopping = False

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        if not stopping:  # a second signal during cleanup must not interrupt it
            stopping = True
            raise _Stop(signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server: BackendServer | None = None
    try:
        try:
            server = BackendServer(args.host, args.port, log_requests=args.log)
        except OSError as exc:  # includes socket.gaierror for an unknown host
            reason = exc.strerror or str(exc)
            print(f"backend: error: cannot listen on {args.host}:{args.port}: {reason}",
                  file=sys.stderr, flush=True)
            return 2
        print(f"backend listening on {args.host}:{server.port}", file=sys.stderr, flush=True)
        server.serve_forever(poll_interval=0.5)
    except _Stop:
        pass
    finally:
        if server is not None:
            server.server_close()
    return 0
