"""Response compression (`[compression]`, `compress = true`) through real gunicorn workers:
real decoders on the client side (zlib for gzip, brotli, zstandard), streamed answers that
reach the client piece by piece before the backend has finished, and every case where the
answer must go as it is."""

from __future__ import annotations

import gzip
import socket
import threading
import time
import zlib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import brotli
import pytest
import requests
import zstandard

from gol7lb.compress import Compression, choose
from gol7lb.config import CompressionSettings
from tests.helpers import per_label, read_head
from tests.procs import LB, lb_status, wait_until

TEXT = b"".join(b"line %d of a compressible answer, repeated a lot\n" % i for i in range(400))
SMALL = b"tiny\n"
BIG = TEXT * 20  # 400 kB: several blocks of 64 KiB


def decode(encoding: str, data: bytes) -> bytes:
    if encoding == "gzip":
        return gzip.decompress(data)
    if encoding == "br":
        return brotli.decompress(data)
    if encoding == "zstd":
        return zstandard.ZstdDecompressor().decompressobj().decompress(data)
    assert encoding == "", encoding
    return data


class Backend(BaseHTTPRequestHandler):
    """Answers by path; /stream sends a chunk, waits for the test's go, sends another."""

    protocol_version = "HTTP/1.1"
    go = threading.Event()
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _answer(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        """Head and body in one write: the LB gets the answer whole (FinishedBody)."""
        lines = [f"HTTP/1.1 {status} X", *(f"{k}: {v}" for k, v in headers.items())]
        if status not in (204, 304):
            lines.append(f"Content-Length: {len(body)}")
        raw = ("\r\n".join(lines) + "\r\n\r\n").encode()
        if self.command != "HEAD" and status not in (204, 304):
            raw += body
        self.wfile.write(raw)

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        path = self.path.split("?")[0]
        text = {"Content-Type": "text/plain; charset=utf-8", "ETag": '"v1"'}
        if path in ("/text", "/plain/text"):
            self._answer(200, TEXT, text)
        elif path == "/json":
            self._answer(200, TEXT, {"Content-Type": "application/json", "Vary": "Cookie"})
        elif path == "/png":
            self._answer(200, TEXT, {"Content-Type": "image/png"})
        elif path == "/small":
            self._answer(200, SMALL, text)
        elif path == "/encoded":
            self._answer(200, gzip.compress(TEXT), {**text, "Content-Encoding": "gzip"})
        elif path == "/no-transform":
            self._answer(200, TEXT, {**text, "Cache-Control": "no-transform"})
        elif path == "/204":
            self._answer(204, b"", text)
        elif path == "/304":
            self._answer(304, b"", text)
        elif path == "/range":
            self._answer(206, TEXT[:2000], {**text, "Content-Range":
                                           f"bytes 0-1999/{len(TEXT)}"})
        elif path == "/404":
            self._answer(404, TEXT, text)
        elif path == "/pieces":  # a long chunked answer, streamed through the LB
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i in range(0, len(BIG), 7000):
                piece = BIG[i:i + 7000]
                self.wfile.write(b"%x\r\n%b\r\n" % (len(piece), piece))
            self.wfile.write(b"0\r\n\r\n")
        elif path == "/stream":
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            first = b"first piece of a stream\n" * 20
            self.wfile.write(b"%x\r\n%b\r\n" % (len(first), first))
            self.wfile.flush()
            Backend.go.wait(20)
            second = b"second piece\n" * 20 if Backend.go.is_set() else b"TIMED OUT\n"
            self.wfile.write(b"%x\r\n%b\r\n0\r\n\r\n" % (len(second), second))
        else:
            self._answer(404, b"no\n", {"Content-Type": "text/plain"})


@pytest.fixture(scope="module")
def backend() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Backend)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def lb(backend: int, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LB]:
    tmp = tmp_path_factory.mktemp("compress")
    path = tmp / "lb.toml"
    path.write_text(f"""
[pools.app]
backends = [{{ url = "http://127.0.0.1:{backend}" }}]

[[routes]]
path_prefix = "/plain/"
pool = "app"

[[routes]]
path_prefix = "/"
pool = "app"
compress = true

[compression]
min_bytes = 100
encodings = ["zstd", "br", "gzip"]
""")
    proc = LB({"GOL7LB_CONFIG": str(path)}, log=Path(tmp / "lb.log"))
    proc.config = path  # type: ignore[attr-defined]
    try:
        yield proc.wait_ready()
    finally:
        proc.stop()


def get(lb: LB, path: str, accept: str | None = "gzip", method: str = "GET",
        **headers: str) -> requests.Response:
    sent = {"Accept-Encoding": accept or "", **{k.replace("_", "-"): v
                                                for k, v in headers.items()}}
    answer = requests.request(method, lb.url + path, headers=sent, stream=True, timeout=10)
    answer.raw.decode_content = False
    answer._content = answer.raw.read()
    return answer


@pytest.mark.parametrize("encoding", ["gzip", "br", "zstd"])
def test_each_encoding_decodes_to_the_backend_body(lb, encoding):
    answer = get(lb, "/text", accept=encoding)
    assert answer.status_code == 200
    assert answer.headers["Content-Encoding"] == encoding
    assert answer.headers["Vary"] == "Accept-Encoding"
    assert answer.headers["ETag"] == 'W/"v1"'
    assert "Content-Length" not in answer.headers
    assert answer.headers["Transfer-Encoding"] == "chunked"
    assert len(answer.content) < len(TEXT) / 4
    assert decode(encoding, answer.content) == TEXT


@pytest.mark.parametrize("encoding", ["gzip", "br", "zstd"])
def test_a_long_streamed_answer_decodes_whole(lb, encoding):
    answer = get(lb, "/pieces", accept=encoding)
    assert answer.headers["Content-Encoding"] == encoding
    assert decode(encoding, answer.content) == BIG
    assert len(answer.content) < len(BIG) / 4


def test_requests_decodes_what_it_asks_for(lb):
    """A real client's own decoders (urllib3: gzip, and br with brotli installed)."""
    answer = requests.get(lb.url + "/json", timeout=10)
    assert answer.headers["Content-Encoding"] in ("br", "gzip")
    assert answer.content == TEXT
    assert answer.headers["Vary"] == "Cookie, Accept-Encoding"


@pytest.mark.parametrize(("accept", "expected"), [
    ("gzip, br, zstd", "zstd"),                       # equal q: the server's order
    ("gzip;q=1.0, br;q=0.5, zstd;q=0.1", "gzip"),     # the client's q first
    ("br;q=0.9, gzip;q=0.9", "br"),
    ("zstd;q=0, gzip", "gzip"),                       # q=0 excludes
    ("*", "zstd"),
    ("*;q=0.5, gzip;q=0", "zstd"),
    ("gzip;q=0.5, identity", ""),                     # identity ranked higher
    ("identity", ""),
    ("deflate, compress", ""),
    ("", ""),
    ("GZIP", "gzip"),
    ("gzip;q=abc", ""),
])
def test_q_values_and_server_preference(lb, accept, expected):
    answer = get(lb, "/text", accept=accept)
    assert answer.headers.get("Content-Encoding", "") == expected
    assert answer.headers["Vary"] == "Accept-Encoding"
    assert decode(expected, answer.content) == TEXT
    if not expected:
        assert answer.headers["Content-Length"] == str(len(TEXT))
        assert answer.headers["ETag"] == '"v1"'


@pytest.mark.parametrize(("path", "method", "headers", "status"), [
    ("/text", "HEAD", {}, 200),
    ("/text", "GET", {"Range": "bytes=0-99"}, 200),   # the backend ignores it; still identity
    ("/range", "GET", {}, 206),
    ("/204", "GET", {}, 204),
    ("/304", "GET", {}, 304),
    ("/png", "GET", {}, 200),                         # not a listed type
    ("/small", "GET", {}, 200),                       # under min_bytes
    ("/encoded", "GET", {}, 200),                     # already encoded
    ("/no-transform", "GET", {}, 200),
    ("/plain/text", "GET", {}, 200),                  # a route without compress
])
def test_never_compressed(lb, path, method, headers, status):
    answer = get(lb, path, accept="gzip, br, zstd", method=method, **headers)
    assert answer.status_code == status
    encoding = answer.headers.get("Content-Encoding", "")
    if path == "/encoded":
        assert encoding == "gzip" and gzip.decompress(answer.content) == TEXT
    else:
        assert encoding == ""
    assert answer.headers.get("ETag") in ('"v1"', None)
    if method == "HEAD" or status in (204, 304):
        assert answer.content == b""
    elif path not in ("/encoded", "/range", "/small"):
        assert answer.content == TEXT


def test_error_pages_are_compressed_too(lb):
    answer = get(lb, "/404", accept="gzip")
    assert answer.status_code == 404 and answer.headers["Content-Encoding"] == "gzip"
    assert gzip.decompress(answer.content) == TEXT


@pytest.mark.parametrize("encoding", ["gzip", "br", "zstd"])
def test_a_stream_reaches_the_client_piece_by_piece(lb, encoding):
    """The backend sends a piece and waits for the test: the client must be able to decode
    the first piece while the backend still holds the second (nothing buffered whole)."""
    Backend.go.clear()
    decoders = {"gzip": lambda: zlib.decompressobj(31),
                "br": brotli.Decompressor,
                "zstd": lambda: zstandard.ZstdDecompressor().decompressobj()}
    decoder = decoders[encoding]()
    step = decoder.process if encoding == "br" else decoder.decompress
    with socket.create_connection(("127.0.0.1", lb.port), timeout=10) as s:
        s.sendall(b"GET /stream HTTP/1.1\r\nHost: t\r\nAccept-Encoding: " + encoding.encode()
                  + b"\r\n\r\n")
        head = read_head(s).decode("latin-1").lower()
        assert f"content-encoding: {encoding}" in head and "transfer-encoding: chunked" in head
        got = b""
        raw = b""
        deadline = time.monotonic() + 10
        while b"first piece of a stream\n" * 20 not in got:
            assert time.monotonic() < deadline, "first piece not delivered on its own"
            raw += s.recv(65536)
            while b"\r\n" in raw:  # de-chunk what is complete
                size_line, _, rest = raw.partition(b"\r\n")
                size = int(size_line, 16)
                if len(rest) < size + 2:
                    break
                got += step(rest[:size])
                raw = rest[size + 2:]
        assert not Backend.go.is_set()
        Backend.go.set()  # only now does the backend send the rest
        while not raw.endswith(b"0\r\n\r\n"):
            chunk = s.recv(65536)
            assert chunk
            raw += chunk
        while raw and not raw.startswith(b"0\r\n"):
            size_line, _, rest = raw.partition(b"\r\n")
            size = int(size_line, 16)
            got += step(rest[:size])
            raw = rest[size + 2:]
    assert got == b"first piece of a stream\n" * 20 + b"second piece\n" * 20


def test_http10_client_gets_a_close_delimited_compressed_answer(lb):
    with socket.create_connection(("127.0.0.1", lb.port), timeout=10) as s:
        s.sendall(b"GET /text HTTP/1.0\r\nHost: t\r\nAccept-Encoding: gzip\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert b"Content-Encoding: gzip" in head and b"Content-Length" not in head
    assert gzip.decompress(body) == TEXT


def test_a_reload_changes_the_settings_and_a_bad_one_is_refused(lb):
    """Last of the LB's tests: it changes the configuration."""
    config = lb.config
    good = config.read_text()
    config.write_text(good.replace('encodings = ["zstd", "br", "gzip"]',
                                   'encodings = ["gzip"]\nlevel = "default"'))
    wait_until(lambda: get(lb, "/text", accept="zstd, br, gzip").headers.get(
        "Content-Encoding") == "gzip", timeout=10)
    assert get(lb, "/text", accept="zstd, br").headers.get("Content-Encoding") is None
    config.write_text(good.replace('encodings = ["zstd", "br", "gzip"]',
                                   'encodings = ["zstd", "lz4"]'))
    error = wait_until(lambda: lb_status(lb)["config"]["last_error"], timeout=10)
    assert "compression.encodings" in error and "\n" not in error
    assert get(lb, "/text", accept="zstd, gzip").headers.get("Content-Encoding") == "gzip"


def test_top_level_compress_and_mirror_cover_requests_that_match_no_route(lb, backend):
    """After the reload test: a configuration with a default pool, whose unrouted requests
    are compressed and mirrored by the top-level keys, while a route's are not."""
    before = per_label(lb, "gol7lb_mirror_requests_total", "result").get("ok", 0)
    lb.config.write_text(f"""
compress = true
mirror = {{ pool = "app", percent = 100 }}
[[backends]]
url = "http://127.0.0.1:{backend}"
[pools.app]
backends = [{{ url = "http://127.0.0.1:{backend}" }}]
[[routes]]
path_prefix = "/plain/"
pool = "app"
[compression]
min_bytes = 100
""")
    unmatched = wait_until(lambda: (lambda u: u if u["compress"] else None)(
        lb_status(lb)["unmatched"]), timeout=10)
    assert unmatched["mirror"] == {"pool": "app", "percent": 100.0}
    wait_until(lambda: get(lb, "/text").headers.get("Content-Encoding") == "gzip", timeout=10)
    assert decode("gzip", get(lb, "/text").content) == TEXT
    assert get(lb, "/plain/text").headers.get("Content-Encoding") is None
    wait_until(lambda: per_label(lb, "gol7lb_mirror_requests_total", "result").get("ok", 0)
               >= before + 2, timeout=10)


def test_choice_unit():
    assert choose("br;q=0.2, gzip;q=0.2, zstd;q=0.1", ("zstd", "br", "gzip")) == "br"
    assert choose("gzip", ()) is None
    compression = Compression(CompressionSettings(types=("text/*",), min_bytes=10))
    assert compression.compressible(200, [("Content-Type", "TEXT/HTML; charset=x")], 10)
    assert not compression.compressible(200, [("Content-Type", "text/html")], 9)
    assert not compression.compressible(101, [("Content-Type", "text/html")])
    assert not compression.compressible(200, [("Content-Type", "application/json")])
    assert compression.negotiate({"HTTP_RANGE": "bytes=1-"}, "GET") is None
    assert compression.negotiate({}, "HEAD") is None
