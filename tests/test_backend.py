"""The demo backend as a real process: every endpoint, keep-alive, TCP_NODELAY, signals, errors.

The proxy's tests lean on these endpoints, so their exact behaviour is pinned here.
"""

from __future__ import annotations

import hashlib
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import psutil
import pytest
import requests

from tests.procs import ROOT, Proc, free_port, port_closed, start_backend, wait_for_port

GiB = 1024**3


def pattern(n: int) -> bytes:
    """What /bytes/N sends: the byte at offset i is i % 256."""
    return (bytes(range(256)) * (n // 256 + 1))[:n]


class Backend:
    """A started backend: its port, its process and a base URL."""

    def __init__(self, port: int, proc: Proc) -> None:
        self.port = port
        self.proc = proc
        self.url = f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Backend]:
    """One backend for the whole module: starting a process per test would be slow."""
    port = free_port()
    proc = start_backend(port, tmp_path_factory.mktemp("backend"))
    yield Backend(port, proc)
    status = proc.stop()
    assert status == 0, proc.output()
    assert proc.leftovers() == []
    assert "Traceback" not in proc.output()


# -- a minimal raw HTTP/1.1 client, for what requests would normalise away -------------------

def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def read_response(rfile: BinaryIO) -> tuple[int, list[tuple[str, str]], bytes, bool]:
    """One response from `rfile`: status, headers in order, decoded body, whether chunked."""
    status_line = rfile.readline()
    assert status_line.startswith(b"HTTP/1.1 "), status_line
    status = int(status_line.split()[1])
    headers: list[tuple[str, str]] = []
    while (line := rfile.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers.append((name, value.strip()))
    fields = {name.lower(): value for name, value in headers}
    chunked = fields.get("transfer-encoding", "").lower() == "chunked"
    if chunked:
        body = bytearray()
        while (size := int(rfile.readline().split(b";")[0], 16)) > 0:
            body += rfile.read(size)
            assert rfile.read(2) == b"\r\n"
        while rfile.readline() not in (b"\r\n", b""):
            pass
        return status, headers, bytes(body), True
    if "content-length" in fields:
        return status, headers, rfile.read(int(fields["content-length"])), False
    assert status in (204, 304), f"{status} has neither Content-Length nor chunked framing"
    return status, headers, b"", False


def exchange(port: int, raw: bytes) -> tuple[int, list[tuple[str, str]], bytes, bool]:
    """Send `raw` on a fresh connection and read one response."""
    with connect(port) as sock, sock.makefile("rb") as rfile:
        sock.sendall(raw)
        return read_response(rfile)


def header(headers: list[tuple[str, str]], name: str) -> list[str]:
    return [value for key, value in headers if key.lower() == name.lower()]


# -- endpoints ---------------------------------------------------------------------------------

def test_root_names_the_port(backend: Backend) -> None:
    r = requests.get(backend.url + "/", timeout=10)
    assert r.status_code == 200
    assert r.content == f"backend {backend.port}\n".encode()
    assert r.headers["Content-Type"].startswith("text/plain")
    assert r.headers["X-Backend-Port"] == str(backend.port)


def test_healthz(backend: Backend) -> None:
    r = requests.get(backend.url + "/healthz", timeout=10)
    assert (r.status_code, r.content) == (200, b"ok\n")
    assert r.headers["X-Backend-Port"] == str(backend.port)


def test_head_has_length_but_no_body(backend: Backend) -> None:
    with connect(backend.port) as sock, sock.makefile("rb") as rfile:
        sock.sendall(b"HEAD / HTTP/1.1\r\nHost: t\r\n\r\nGET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        status_line = rfile.readline()
        head = []
        while (line := rfile.readline()) != b"\r\n":
            head.append(line)
        assert status_line.startswith(b"HTTP/1.1 200")
        assert f"Content-Length: {len(f'backend {backend.port}')+1}\r\n".encode() in head
        # The next bytes are the second response: HEAD sent no body.
        assert read_response(rfile)[2] == b"ok\n"


def test_echo_reports_raw_target_method_version_and_headers(backend: Backend) -> None:
    raw = (b"GET /echo/%2f?a=%41&b HTTP/1.1\r\n"
           b"Host: example.test\r\n"
           b"X-Dup: one\r\n"
           b"x-other: 2\r\n"
           b"X-Dup: two\r\n"
           b"\r\n")
    status, headers, body, _ = exchange(backend.port, raw)
    assert status == 200
    assert header(headers, "Content-Type") == ["application/json"]
    doc = json.loads(body)
    assert doc["method"] == "GET"
    assert doc["target"] == "/echo/%2f?a=%41&b"
    assert doc["version"] == "HTTP/1.1"
    assert doc["headers"] == [["Host", "example.test"], ["X-Dup", "one"], ["x-other", "2"],
                              ["X-Dup", "two"]]
    assert doc["body_length"] == 0
    assert doc["body_sha256"] == hashlib.sha256(b"").hexdigest()
    assert doc["port"] == backend.port


@pytest.mark.parametrize("target", [
    "/echo//double//slashes/../x?q=%20%2F&&",
    "/echo?",
    "/echoes/are/echo/too",
    "/echo/%E2%82%AC;param",
])
def test_echo_target_is_byte_for_byte(backend: Backend, target: str) -> None:
    raw = f"GET {target} HTTP/1.1\r\nHost: t\r\n\r\n".encode()
    assert json.loads(exchange(backend.port, raw)[2])["target"] == target


def test_echo_absolute_form_target(backend: Backend) -> None:
    raw = b"GET http://elsewhere.test/echo/x?y HTTP/1.1\r\nHost: t\r\n\r\n"
    assert json.loads(exchange(backend.port, raw)[2])["target"] == "http://elsewhere.test/echo/x?y"


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE", "OPTIONS", "PURGE"])
def test_echo_any_method_with_content_length_body(backend: Backend, method: str) -> None:
    payload = bytes(range(256)) * 1000 + b"tail"
    r = requests.request(method, backend.url + "/echo/m", data=payload, timeout=10)
    doc = r.json()
    assert (r.status_code, doc["method"]) == (200, method)
    assert doc["body_length"] == len(payload)
    assert doc["body_sha256"] == hashlib.sha256(payload).hexdigest()


def test_echo_chunked_upload_with_extensions_and_trailers(backend: Backend) -> None:
    raw = (b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
           b"5;name=value\r\nhello\r\n"
           b"1 ; quoted=\"a;b\"\r\n \r\n"
           b"A\r\n0123456789\r\n"
           b"0\r\nX-Trailer: yes\r\nX-Other: 1\r\n\r\n"
           # a second request on the same connection proves the trailers were consumed
           b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
    with connect(backend.port) as sock, sock.makefile("rb") as rfile:
        sock.sendall(raw)
        status, _, body, _ = read_response(rfile)
        assert status == 200
        doc = json.loads(body)
        assert doc["body_length"] == 16
        assert doc["body_sha256"] == hashlib.sha256(b"hello 0123456789").hexdigest()
        assert ["Transfer-Encoding", "chunked"] in doc["headers"]
        assert read_response(rfile)[:3:2] == (200, b"ok\n")


def test_echo_streams_a_large_chunked_upload(backend: Backend) -> None:
    """64 MiB sent by requests as chunks of a generator: hashed as it arrives, RSS stays small."""
    piece = bytes(range(256)) * 4096  # 1 MiB
    count = 64

    def gen() -> Iterator[bytes]:
        yield from (piece for _ in range(count))

    r = requests.post(backend.url + "/echo/upload", data=gen(), timeout=60)
    doc = r.json()
    assert doc["body_length"] == count * len(piece)
    expected = hashlib.sha256()
    for _ in range(count):
        expected.update(piece)
    assert doc["body_sha256"] == expected.hexdigest()
    assert psutil.Process(backend.proc.pid).memory_info().rss < 60 * 1024**2


@pytest.mark.parametrize("body", [
    b"zz\r\nhello\r\n0\r\n\r\n",            # size is not hex
    b"5\r\nhelloXX0\r\n\r\n",              # chunk data not followed by CRLF
    b"5\r\nhel",                           # body ends inside a chunk
])
def test_echo_bad_chunked_body_is_400_and_closes(backend: Backend, body: bytes) -> None:
    raw = b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n" + body
    with connect(backend.port) as sock, sock.makefile("rb") as rfile:
        sock.sendall(raw)
        if body.endswith(b"hel"):
            sock.shutdown(socket.SHUT_WR)
        status, headers, _, _ = read_response(rfile)
        assert status == 400
        assert header(headers, "Connection") == ["close"]
        assert rfile.read() == b""


def test_unknown_transfer_coding_is_501(backend: Backend) -> None:
    raw = b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip\r\n\r\n"
    assert exchange(backend.port, raw)[0] == 501


def test_bytes_with_content_length(backend: Backend) -> None:
    n = 200_001
    status, headers, body, chunked = exchange(backend.port, f"GET /bytes/{n} HTTP/1.1\r\n"
                                                            "Host: t\r\n\r\n".encode())
    assert (status, chunked) == (200, False)
    assert header(headers, "Content-Length") == [str(n)]
    assert body == pattern(n)


def test_bytes_chunked(backend: Backend) -> None:
    n = 150_000
    raw = f"GET /bytes/{n}?chunked=1 HTTP/1.1\r\nHost: t\r\n\r\n".encode()
    status, headers, body, chunked = exchange(backend.port, raw)
    assert (status, chunked) == (200, True)
    assert header(headers, "Content-Length") == []
    assert body == pattern(n)
    r = requests.get(f"{backend.url}/bytes/{n}?chunked=1", timeout=10)
    assert r.content == pattern(n)


@pytest.mark.parametrize("query", ["", "?chunked=1"])
def test_bytes_zero(backend: Backend, query: str) -> None:
    r = requests.get(f"{backend.url}/bytes/0{query}", timeout=10)
    assert (r.status_code, r.content) == (200, b"")


def test_bytes_ten_gib_is_streamed(backend: Backend) -> None:
    """The largest body starts at once and the backend's memory stays small while it flows."""
    with requests.get(f"{backend.url}/bytes/{10 * GiB}", stream=True, timeout=10) as r:
        assert r.headers["Content-Length"] == str(10 * GiB)
        got = 0
        for block in r.iter_content(1024 * 1024):
            if got == 0:
                assert block[:512] == pattern(512)
            got += len(block)
            if got >= 32 * 1024**2:
                break
        assert psutil.Process(backend.proc.pid).memory_info().rss < 60 * 1024**2


def test_sleep(backend: Backend) -> None:
    start = time.monotonic()
    r = requests.get(backend.url + "/sleep/0.3", timeout=10)
    assert time.monotonic() - start >= 0.3
    assert (r.status_code, r.content) == (200, b"slept 0.3\n")
    assert requests.get(backend.url + "/sleep/0", timeout=10).content == b"slept 0\n"


def test_slow_request_does_not_block_others(backend: Backend) -> None:
    slow = threading.Thread(target=requests.get, args=(backend.url + "/sleep/2",),
                            kwargs={"timeout": 10})
    slow.start()
    try:
        start = time.monotonic()
        assert requests.get(backend.url + "/healthz", timeout=10).status_code == 200
        assert time.monotonic() - start < 1
    finally:
        slow.join()


@pytest.mark.parametrize("code", [200, 201, 202, 205, 301, 302, 400, 404, 418, 500, 502, 503,
                                  599])
def test_status_with_body(backend: Backend, code: int) -> None:
    raw = f"GET /status/{code} HTTP/1.1\r\nHost: t\r\n\r\n".encode()
    status, headers, body, _ = exchange(backend.port, raw)
    assert status == code
    assert header(headers, "X-Backend-Port") == [str(backend.port)]
    assert body == (b"" if code == 205 else f"status {code}\n".encode())


@pytest.mark.parametrize("code", [204, 304])
def test_status_without_body(backend: Backend, code: int) -> None:
    with connect(backend.port) as sock, sock.makefile("rb") as rfile:
        sock.sendall(f"GET /status/{code} HTTP/1.1\r\nHost: t\r\n\r\n"
                     "GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n".encode())
        status, headers, body, _ = read_response(rfile)
        assert (status, body) == (code, b"")
        assert header(headers, "Content-Length") == []
        assert header(headers, "X-Backend-Port") == [str(backend.port)]
        assert read_response(rfile)[2] == b"ok\n"  # nothing stray between the two


def test_response_headers(backend: Backend) -> None:
    status, headers, body, _ = exchange(backend.port,
                                        b"GET /response-headers HTTP/1.1\r\nHost: t\r\n\r\n")
    assert (status, body) == (200, b"headers\n")
    assert header(headers, "Set-Cookie") == ["a=1; Path=/", "b=2; Path=/"]
    assert header(headers, "Connection") == ["X-Hop-Test"]
    assert header(headers, "X-Hop-Test") == ["1"]
    assert header(headers, "Keep-Alive") == ["timeout=5"]
    assert header(headers, "Proxy-Authenticate") == ["Basic"]
    assert header(headers, "Upgrade") == ["h2c"]
    assert header(headers, "X-End-To-End") == ["kept"]


def test_drop_closes_without_a_byte(backend: Backend) -> None:
    with connect(backend.port) as sock:
        sock.sendall(b"GET /drop HTTP/1.1\r\nHost: t\r\n\r\n")
        assert sock.recv(1024) == b""
    with pytest.raises(requests.ConnectionError):
        requests.get(backend.url + "/drop", timeout=10)


def test_garbage_is_not_http(backend: Backend) -> None:
    with connect(backend.port) as sock, sock.makefile("rb") as rfile:
        sock.sendall(b"GET /garbage HTTP/1.1\r\nHost: t\r\n\r\n")
        assert rfile.read() == b"this is not http\r\n\r\n"


@pytest.mark.parametrize("path", ["/nope", "/healthz/x", "/bytes", "/status", "/sleep",
                                  "/drop/1", "//", "/index.html"])
def test_unknown_paths_are_404(backend: Backend, path: str) -> None:
    r = requests.get(backend.url + path, timeout=10)
    assert r.status_code == 404
    assert r.headers["X-Backend-Port"] == str(backend.port)


def test_other_methods_on_get_endpoints_are_405_and_body_is_drained(backend: Backend) -> None:
    with connect(backend.port) as sock, sock.makefile("rb") as rfile:
        sock.sendall(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello"
                     b"DELETE /healthz HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"3\r\nabc\r\n0\r\n\r\n"
                     b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        for _ in range(2):
            status, headers, _, _ = read_response(rfile)
            assert status == 405
            assert header(headers, "Allow") == ["GET, HEAD"]
        assert read_response(rfile)[:3:2] == (200, b"ok\n")


@pytest.mark.parametrize("path", [
    "/bytes/abc", "/bytes/-1", "/bytes/1.5", f"/bytes/{10 * GiB + 1}", "/bytes/1e3",
    "/bytes/99999999999999999999999999", "/bytes/", "/sleep/abc", "/sleep/-1", "/sleep/300.5",
    "/sleep/nan", "/sleep/inf", "/sleep/1e1", "/sleep/", "/status/abc", "/status/99",
    "/status/100", "/status/199", "/status/600", "/status/2OO", "/status/",
])
def test_bad_numbers_are_400(backend: Backend, path: str) -> None:
    r = requests.get(backend.url + path, timeout=10)
    assert r.status_code == 400
    assert "Traceback" not in r.text
    assert r.headers["X-Backend-Port"] == str(backend.port)


@pytest.mark.parametrize("path", ["/", "/healthz", "/echo", "/bytes/10", "/bytes/10?chunked=1",
                                  "/sleep/0", "/status/200", "/status/204", "/response-headers",
                                  "/nope", "/bytes/x"])
def test_every_response_is_framed_and_names_the_port(backend: Backend, path: str) -> None:
    status, headers, _, chunked = exchange(backend.port,
                                           f"GET {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
    assert chunked or header(headers, "Content-Length") or status in (204, 304)
    assert header(headers, "X-Backend-Port") == [str(backend.port)]


# -- connections -------------------------------------------------------------------------------

def test_keep_alive_reuses_one_connection(backend: Backend) -> None:
    with connect(backend.port) as sock, sock.makefile("rb") as rfile:
        local = sock.getsockname()
        requests_in_order = [
            (b"GET / HTTP/1.1\r\nHost: t\r\n\r\n", f"backend {backend.port}\n".encode()),
            (b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n", b"ok\n"),
            (b"GET /bytes/70000?chunked=1 HTTP/1.1\r\nHost: t\r\n\r\n", pattern(70000)),
            (b"GET /bytes/70000 HTTP/1.1\r\nHost: t\r\n\r\n", pattern(70000)),
            (b"GET /status/404 HTTP/1.1\r\nHost: t\r\n\r\n", b"status 404\n"),
            (b"GET /sleep/0.01 HTTP/1.1\r\nHost: t\r\n\r\n", b"slept 0.01\n"),
        ]
        for raw, expected in requests_in_order:
            sock.sendall(raw)
            status, headers, body, _ = read_response(rfile)
            assert body == expected
            assert header(headers, "Connection") == []
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\nabc")
        assert json.loads(read_response(rfile)[2])["body_length"] == 3
        assert sock.getsockname() == local
        # The client may end it: Connection: close is honoured and echoed.
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        status, headers, body, _ = read_response(rfile)
        assert header(headers, "Connection") == ["close"]
        assert rfile.read() == b""


def test_keep_alive_with_requests_session(backend: Backend) -> None:
    with requests.Session() as session:
        ports = set()
        for _ in range(6):
            r = session.get(backend.url + "/echo", stream=True, timeout=10)
            ports.add(r.raw.connection.sock.getsockname()[1])
            assert r.json()["port"] == backend.port  # reading it returns the connection
        assert len(ports) == 1


def test_http10_client_gets_a_closed_connection(backend: Backend) -> None:
    with connect(backend.port) as sock, sock.makefile("rb") as rfile:
        sock.sendall(b"GET /bytes/100?chunked=1 HTTP/1.0\r\n\r\n")
        status_line = rfile.readline()
        assert status_line.split()[1] == b"200"
        rest = rfile.read()  # the server closes after one response
        assert b"Content-Length: 100\r\n" in rest  # 1.0 has no chunked framing
        assert rest.endswith(pattern(100))


def test_tcp_nodelay_keep_alive_round_trip(backend: Backend) -> None:
    """/bytes/10 writes its headers then its body: two small segments. Without TCP_NODELAY
    the second waits for the client's delayed ACK, ~40 ms every time; with it, ~0.1 ms.
    So ten keep-alive round trips must fit in 50 ms (best of three tries, for a busy CI)."""
    with connect(backend.port) as sock, sock.makefile("rb") as rfile:
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            for path in [b"/bytes/10", b"/bytes/10?chunked=1"] * 5:
                sock.sendall(b"GET " + path + b" HTTP/1.1\r\nHost: t\r\n\r\n")
                assert read_response(rfile)[2] == pattern(10)
            best = min(best, time.perf_counter() - start)
        assert best < 0.050, f"10 keep-alive round trips took {best * 1000:.1f} ms"


def test_many_concurrent_connections(backend: Backend) -> None:
    socks = [connect(backend.port) for _ in range(50)]
    try:
        for s in socks:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        for s in socks:
            with s.makefile("rb") as rfile:
                assert read_response(rfile)[2] == b"ok\n"
    finally:
        for s in socks:
            s.close()


def test_request_log_is_off_by_default(backend: Backend) -> None:
    requests.get(backend.url + "/healthz?marker=quiet", timeout=10)
    time.sleep(0.1)
    assert "marker=quiet" not in backend.proc.output()


# -- process lifecycle -------------------------------------------------------------------------

@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_cleanly(tmp_path: Path, sig: signal.Signals) -> None:
    """Exit 0, no traceback, port closed, no process left; even with busy and idle clients."""
    port = free_port()
    proc = start_backend(port, tmp_path)
    idle = connect(port)
    busy = connect(port)
    try:
        idle.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        with idle.makefile("rb") as rfile:
            assert read_response(rfile)[2] == b"ok\n"  # now idle in keep-alive
        busy.sendall(b"GET /sleep/60 HTTP/1.1\r\nHost: t\r\n\r\n")
        time.sleep(0.2)
        start = time.monotonic()
        proc.signal(sig)
        assert proc.wait(timeout=10) == 0
        assert time.monotonic() - start < 5
        assert proc.leftovers() == []
        assert port_closed(port)
        output = proc.output()
        assert "Traceback" not in output
        assert "KeyboardInterrupt" not in output
    finally:
        idle.close()
        busy.close()
        proc.stop()


def test_log_flag_logs_requests(tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "backend.log"
    proc = Proc([sys.executable, "-m", "backend", str(port), "--log"], log=log)
    try:
        wait_for_port(port)
        requests.get(f"http://127.0.0.1:{port}/healthz?marker=loud", timeout=10)
        assert proc.stop() == 0
        assert "GET /healthz?marker=loud HTTP/1.1" in proc.output()
    finally:
        proc.stop()
    assert proc.leftovers() == []


def run_backend(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "backend", *args], cwd=ROOT, text=True,
                          capture_output=True, stdin=subprocess.DEVNULL, timeout=30)


@pytest.mark.parametrize("args", [
    ["abc"], ["0"], ["65536"], ["70000"], ["-1"], ["8.5"], [""], [],
    ["8081", "--host", ""], ["8081", "--host", "no-such-host.invalid"],
    ["8081", "--host", "256.1.1.1"], ["8081", "extra"],
])
def test_bad_arguments_exit_2_with_one_line(args: list[str]) -> None:
    result = run_backend(*args)
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("backend: error:")
    assert "Traceback" not in result.stderr


def test_port_in_use_exits_2_with_one_line() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = run_backend(str(taken.getsockname()[1]))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot listen" in lines[0], result.stderr
