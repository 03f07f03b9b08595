"""HTTP health checks on the LB's own upstream code, against real backends and raw sockets."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import requests

from gol7lb.backends import Backend, parse_backend_url
from gol7lb.config import HealthSettings
from gol7lb.health import http_check, run_check
from tests.conftest import FAST_HEALTH, backends_env
from tests.procs import free_port

Answer = Callable[[socket.socket, bytes, threading.Event], None]
SLACK = 1.0  # seconds a check may overrun its timeout on a busy machine


class RawServer:
    """A loopback listener in a thread: reads each request head, records it, and lets `answer`
    write whatever it likes (or nothing) on the connection."""

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.requests: list[bytes] = []
        self.stop = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=16)
        self.listener.settimeout(0.1)
        self.port = self.listener.getsockname()[1]
        self.backend = parse_backend_url(f"http://127.0.0.1:{self.port}")
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(5)
            head = b""
            try:
                while b"\r\n\r\n" not in head:
                    data = conn.recv(4096)
                    if not data:
                        return
                    head += data
                self.requests.append(head)
                self.answer(conn, head, self.stop)
            except OSError:
                pass

    def header(self, name: str, request: int = -1) -> str | None:
        for line in self.requests[request].decode("latin-1").split("\r\n")[1:]:
            key, _, value = line.partition(":")
            if key.strip().lower() == name.lower():
                return value.strip()
        return None

    def close(self) -> None:
        self.stop.set()
        self.listener.close()
        self.thread.join(timeout=5)


@pytest.fixture
def raw_server() -> Iterator[Callable[[Answer], RawServer]]:
    servers: list[RawServer] = []

    def start(answer: Answer) -> RawServer:
        server = RawServer(answer)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


def reply(raw: bytes) -> Answer:
    def answer(conn: socket.socket, head: bytes, stop: threading.Event) -> None:
        conn.sendall(raw)
    return answer


def ok_with(body: bytes, status: str = "200 OK") -> Answer:
    return reply(b"HTTP/1.1 %s\r\nContent-Length: %d\r\n\r\n%s" % (status.encode(), len(body),
                                                                   body))


def never(conn: socket.socket, head: bytes, stop: threading.Event) -> None:
    stop.wait(30)


def http(**kw: object) -> HealthSettings:
    kw.setdefault("timeout", 2.0)
    return HealthSettings(type="http", **kw)  # type: ignore[arg-type]


def demo(backend_factory) -> Backend:
    return parse_backend_url(f"http://127.0.0.1:{backend_factory().port}")


# -- against the demo backend -------------------------------------------------------------------

def test_healthy_backend_passes_with_its_status(backend_factory):
    result = http_check(demo(backend_factory), http())
    assert result.ok and result.detail == "HTTP 200"
    assert 0 <= result.duration < 2 and abs(result.at - time.time()) < 5


def test_status_outside_the_expected_ranges_fails_and_says_which(backend_factory):
    target = demo(backend_factory)
    result = http_check(target, http(path="/status/503"))
    assert not result.ok and result.detail == "HTTP 503 (expected 200-399)"
    assert http_check(target, http(path="/status/204", expect_status="200,204")).ok
    strict = http_check(target, http(path="/status/204", expect_status="200"))
    assert strict.detail == "HTTP 204 (expected 200)"


def test_expected_body_text(backend_factory):
    target = demo(backend_factory)
    assert http_check(target, http(expect_body="ok")).ok
    result = http_check(target, http(expect_body="ready"))
    assert not result.ok and result.detail == "body lacks 'ready'"


def test_host_header_defaults_to_the_backend_address_and_can_be_set(backend_factory):
    """/echo answers the request head as JSON: the header list shows the Host the check sent."""
    target = demo(backend_factory)
    own = f'["Host", "{target.netloc}"]'
    assert http_check(target, http(path="/echo", expect_body=own)).ok
    named = http(path="/echo", host="health.example", expect_body='["Host", "health.example"]')
    assert http_check(target, named).ok
    assert not http_check(target, http(path="/echo", host="other.example",
                                       expect_body='["Host", "health.example"]')).ok


def test_garbage_and_dropped_connections_fail(backend_factory):
    target = demo(backend_factory)
    garbage = http_check(target, http(path="/garbage"))
    assert not garbage.ok and garbage.detail.startswith("invalid HTTP from backend")
    dropped = http_check(target, http(path="/drop"))
    assert not dropped.ok and "closed the connection" in dropped.detail


def test_refused_connection_fails():
    result = http_check(parse_backend_url(f"http://127.0.0.1:{free_port()}"), http())
    assert not result.ok and result.detail == "Connection refused"


def test_run_check_picks_the_check_type(backend_factory):
    target = demo(backend_factory)
    assert run_check(target, http()).detail == "HTTP 200"
    assert run_check(target, HealthSettings(type="tcp")).detail == "connected"


# -- against raw sockets ------------------------------------------------------------------------

def test_request_is_a_plain_get_with_connection_close(raw_server):
    server = raw_server(ok_with(b"fine"))
    assert http_check(server.backend, http(path="/ready?probe=1")).ok
    request_line = server.requests[0].split(b"\r\n", 1)[0]
    assert request_line == b"GET /ready?probe=1 HTTP/1.1"
    assert server.header("Host") == f"127.0.0.1:{server.port}"
    assert server.header("Connection") == "close"
    http_check(server.backend, http(host="status.internal:8443"))
    assert server.header("Host") == "status.internal:8443"


def test_redirects_are_not_followed(raw_server):
    elsewhere = free_port()
    server = raw_server(reply(b"HTTP/1.1 302 Found\r\nLocation: http://127.0.0.1:%d/\r\n"
                              b"Content-Length: 0\r\n\r\n" % elsewhere))
    assert http_check(server.backend, http()).detail == "HTTP 302"  # 302 is in 200-399
    result = http_check(server.backend, http(expect_status="200"))
    assert not result.ok and result.detail == "HTTP 302 (expected 200)"
    assert len(server.requests) == 2


def test_server_that_never_answers_times_out_within_the_timeout(raw_server):
    server = raw_server(never)
    started = time.monotonic()
    result = http_check(server.backend, http(timeout=0.5))
    assert not result.ok and result.detail == "timed out after 0.5s"
    assert 0.45 <= result.duration < 0.5 + SLACK
    assert time.monotonic() - started < 0.5 + SLACK


def test_a_trickling_answer_cannot_stretch_the_check(raw_server):
    """One byte every 0.1 s: each recv succeeds, but the whole check is still bounded."""
    def trickle(conn: socket.socket, head: bytes, stop: threading.Event) -> None:
        for byte in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 200:
            if stop.wait(0.1):
                return
            conn.sendall(bytes([byte]))

    server = raw_server(trickle)
    result = http_check(server.backend, http(timeout=0.6))
    assert not result.ok and result.detail == "timed out after 0.6s"
    assert result.duration < 0.6 + SLACK


def test_a_slow_body_counts_against_the_same_timeout(raw_server):
    def slow_body(conn: socket.socket, head: bytes, stop: threading.Event) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nnot yet")
        stop.wait(30)

    server = raw_server(slow_body)
    result = http_check(server.backend, http(timeout=0.5, expect_body="ready"))
    assert not result.ok and result.detail == "timed out after 0.5s"
    # without expect_body the body is never read: the status decides
    assert http_check(server.backend, http(timeout=0.5)).ok


def test_garbage_bytes_fail_as_invalid_http(raw_server):
    server = raw_server(reply(b"\x16\x03\x01\x02\x00garbage\r\n\r\n"))
    result = http_check(server.backend, http())
    assert not result.ok and result.detail.startswith("invalid HTTP from backend")


def test_closing_without_an_answer_fails(raw_server):
    server = raw_server(reply(b""))
    result = http_check(server.backend, http())
    assert not result.ok and result.detail == "backend closed the connection without answering"


def test_body_is_found_in_chunked_and_close_delimited_bodies(raw_server):
    chunked = raw_server(reply(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                               b"3\r\nrea\r\n4\r\ndy!\n\r\n0\r\n\r\n"))
    assert http_check(chunked.backend, http(expect_body="ready")).ok
    until_close = raw_server(reply(b"HTTP/1.1 200 OK\r\n\r\nstatus: ready\n"))
    assert http_check(until_close.backend, http(expect_body="ready")).ok


def test_only_the_first_64_kib_of_the_body_is_searched(raw_server):
    early = raw_server(ok_with(b"x" * 60_000 + b"ready" + b"x" * 100_000))
    assert http_check(early.backend, http(expect_body="ready")).ok
    late = raw_server(ok_with(b"x" * 70_000 + b"ready"))
    result = http_check(late.backend, http(expect_body="ready"))
    assert not result.ok and result.detail == "body lacks 'ready'"


def test_a_status_mismatch_is_reported_before_the_body(raw_server):
    server = raw_server(ok_with(b"ready", status="503 Service Unavailable"))
    result = http_check(server.backend, http(expect_body="ready"))
    assert result.detail == "HTTP 503 (expected 200-399)"


def test_a_body_cut_short_fails(raw_server):
    server = raw_server(reply(b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\nnot re"))
    result = http_check(server.backend, http(expect_body="ready"))
    assert not result.ok and "before the body ended" in result.detail


# -- through a real LB --------------------------------------------------------------------------

@pytest.mark.slow
def test_lb_marks_a_backend_whose_http_check_fails_down(lb_factory, backend_factory,
                                                        raw_server):
    good = backend_factory()
    starting = raw_server(ok_with(b"starting\n"))  # 200, but not the expected body
    lb = lb_factory({"GOL7LB_BACKENDS": backends_env([good.port, starting.port]), **FAST_HEALTH,
                     "GOL7LB_HEALTH_TYPE": "http", "GOL7LB_HEALTH_PATH": "/healthz",
                     "GOL7LB_HEALTH_EXPECT_BODY": "ok"})
    good_id, bad_id = f"127.0.0.1:{good.port}", f"127.0.0.1:{starting.port}"
    deadline = time.monotonic() + 15
    while True:
        entries = {e["id"]: e for e in requests.get(lb.admin_url + "/status",
                                                    timeout=5).json()["backends"]}
        checked = all(entries[i]["last_check"] for i in (good_id, bad_id))
        if checked and entries[good_id]["alive"] and not entries[bad_id]["alive"]:
            break
        assert time.monotonic() < deadline, f"no verdict in /status: {entries}"
        time.sleep(0.1)
    bad, ok = entries[bad_id], entries[good_id]
    assert bad["state"] == "down"
    assert bad["last_check"]["ok"] is False
    assert bad["last_check"]["detail"] == "body lacks 'ok'"
    assert ok["state"] == "up" and ok["last_check"]["ok"] is True
    assert ok["last_check"]["detail"] == "HTTP 200"
    assert set(ok["last_check"]) >= {"ok", "detail", "duration", "at"}
    assert all(head.startswith(b"GET /healthz HTTP/1.1\r\n") for head in starting.requests)
    for _ in range(6):  # traffic goes only to the backend that passes
        assert requests.get(lb.url + "/", timeout=5).text == f"backend {good.port}\n"
