"""The client edge of gol7lb's own worker, through a real LB: limits, malformed and smuggled
requests, timeouts, HTTP/1.0, Expect: 100-continue, pipelining."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator

import pytest

from tests.conftest import FAST_HEALTH, _stop_and_check, backends_env
from tests.helpers import raw_request, read_exactly, read_head, split_response
from tests.procs import LB, free_port, start_backend
from tests.recorder import Recorder
from tests.smuggling import CASES

pytestmark = pytest.mark.lean_worker

HEADER_TIMEOUT = 1.0
IDLE_TIMEOUT = 2.0
EDGE_ENV = {"GOL7LB_PROXY_CLIENT_HEADER_TIMEOUT": str(HEADER_TIMEOUT),
            "GOL7LB_PROXY_CLIENT_IDLE_TIMEOUT": str(IDLE_TIMEOUT),
            "GOL7LB_PROXY_MAX_HEADER_BYTES": "4096", "GOL7LB_PROXY_MAX_HEADERS": "20",
            **FAST_HEALTH}


@pytest.fixture(scope="module")
def recorder() -> Iterator[Recorder]:
    rec = Recorder()
    yield rec
    rec.close()


@pytest.fixture(scope="module")
def trap_lb(recorder: Recorder, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LB]:
    """An LB whose only backend records every byte it gets. HTTP/2 off: the corpus is for
    the HTTP/1.1 path (its h2-preface case gets 400 then; with HTTP/2 on, that preface starts
    an h2c connection instead: tests/test_http2.py)."""
    tmp = tmp_path_factory.mktemp("trap")
    lb = LB({"GOL7LB_BACKENDS": f"http://127.0.0.1:{recorder.port}", **EDGE_ENV,
             "GOL7LB_HTTP2_ENABLED": "false"}, log=tmp / "lb.log")
    try:
        yield lb.wait_ready()
    finally:
        _stop_and_check([lb])


@pytest.fixture(scope="module")
def echo_lb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LB]:
    tmp = tmp_path_factory.mktemp("echo")
    backend = start_backend(free_port(), tmp)
    lb = LB({"GOL7LB_BACKENDS": backends_env([backend.port]), **EDGE_ENV}, log=tmp / "lb.log")
    try:
        yield lb.wait_ready()
    finally:
        _stop_and_check([lb, backend])


def exchange(port: int, data: bytes, timeout: float = 10.0) -> tuple[bytes, float]:
    """Send, read until the LB closes; (everything read, seconds until the close)."""
    started = time.monotonic()
    return raw_request(port, data, timeout), time.monotonic() - started


@pytest.mark.parametrize("name, raw, status", CASES, ids=[c[0] for c in CASES])
def test_smuggling_corpus_is_refused_and_reaches_no_backend(trap_lb, recorder, name, raw,
                                                            status):
    recorder.clear()
    answer, took = exchange(trap_lb.port, raw)
    assert split_response(answer)[0] == status, answer
    assert len(split_answers(answer)) == 1  # one answer, then the connection is closed
    assert took < HEADER_TIMEOUT  # refused at once, not after a timeout
    time.sleep(0.05)
    assert recorder.data() == b""


@pytest.mark.parametrize("space", [b"\t", b" ", b"\xa0", b"\xff"])
def test_a_transfer_encoding_lookalike_inside_a_value_is_only_a_value(echo_lb, space):
    """smuggler's xprespace mutations: llhttp (and RFC 9110) read `X: X<space>Transfer-Encoding:
    chunked` as one header X; the request goes on framed by its Content-Length alone."""
    answer, _ = exchange(echo_lb.port, b"POST /echo HTTP/1.1\r\nHost: x\r\nX: X" + space
                         + b"Transfer-Encoding: chunked\r\nContent-Length: 6\r\n"
                         b"Connection: close\r\n\r\n0\r\n\r\nX")
    status, _, body = split_response(answer)
    assert status == 200
    doc = json.loads(body)
    names = [name.lower() for name, _ in doc["headers"]]
    assert doc["body_length"] == 6
    assert names.count("content-length") == 1 and "transfer-encoding" not in names


def test_a_valid_request_does_reach_the_trap(trap_lb, recorder):
    recorder.clear()
    answer, _ = exchange(trap_lb.port, b"GET /x HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
    assert split_response(answer)[0] == 200
    assert recorder.data().startswith(b"GET /x HTTP/1.1\r\n")


def test_request_line_over_8_kib_is_414(echo_lb):
    answer, _ = exchange(echo_lb.port, b"GET /" + b"a" * 8200 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    assert split_response(answer)[0] == 414


def test_head_over_max_header_bytes_is_431(echo_lb):
    answer, _ = exchange(echo_lb.port, b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: "
                         + b"a" * 5000 + b"\r\n\r\n")
    assert split_response(answer)[0] == 431


def test_too_many_headers_is_431(echo_lb):
    lines = b"".join(b"X-H%d: v\r\n" % i for i in range(21))
    answer, _ = exchange(echo_lb.port, b"GET / HTTP/1.1\r\nHost: x\r\n" + lines + b"\r\n")
    assert split_response(answer)[0] == 431


def test_http11_without_host_is_400_and_never_forwarded(trap_lb, recorder):
    recorder.clear()
    answer, _ = exchange(trap_lb.port, b"GET / HTTP/1.1\r\n\r\n")
    assert split_response(answer)[0] == 400
    assert recorder.data() == b""


def test_http10_gets_an_answer_and_a_close(echo_lb):
    answer, _ = exchange(echo_lb.port, b"GET /echo HTTP/1.0\r\n\r\n")
    status, headers, body = split_response(answer)
    assert status == 200 and json.loads(body)["method"] == "GET"
    assert headers["connection"] == ["close"]


def test_http10_gets_a_chunked_answer_unchunked_until_the_close(echo_lb):
    answer, _ = exchange(echo_lb.port, b"GET /bytes/70000?chunked=1 HTTP/1.0\r\n\r\n")
    status, headers, body = split_response(answer)
    assert status == 200 and len(body) == 70000 and body[:256] == bytes(range(256))
    assert "transfer-encoding" not in headers and headers["connection"] == ["close"]


def test_http10_keep_alive_is_honoured(echo_lb):
    with socket.create_connection(("127.0.0.1", echo_lb.port), timeout=10) as s:
        for _ in range(2):
            s.sendall(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            head = read_head(s)
            assert b" 200 " in head.split(b"\r\n")[0] and b"Connection: keep-alive" in head
            length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
            read_exactly(s, length)


def test_expect_100_continue(echo_lb):
    body = b"x" * 1000
    with socket.create_connection(("127.0.0.1", echo_lb.port), timeout=10) as s:
        s.sendall(b"PUT /echo HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                  b"Content-Length: 1000\r\nConnection: close\r\n\r\n")
        interim = read_head(s)
        assert interim.startswith(b"HTTP/1.1 100 Continue")
        s.sendall(body)
        rest = b""
        while chunk := s.recv(65536):
            rest += chunk
    status, _, doc = split_response(rest)
    assert status == 200 and json.loads(doc)["body_length"] == 1000


def test_expect_100_continue_waits_for_the_backend_and_an_early_answer_spares_the_body(
        trap_lb, recorder):
    """The backend (the recorder) answers as soon as it has the head: the client gets that
    final answer and never a `100 Continue`, the body is never asked for (nor sent on), and
    the connection closes, since the body it announced was not read."""
    recorder.clear()
    with socket.create_connection(("127.0.0.1", trap_lb.port), timeout=10) as s:
        s.sendall(b"PUT /upload HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                  b"Content-Length: 1000\r\n\r\n")
        head = read_head(s)
        assert head.startswith(b"HTTP/1.1 200 ")
        assert b"Connection: close" in head
        assert read_exactly(s, 3) == b"ok\n"
        assert s.recv(100) == b""  # closed: the announced body was never read
    sent = recorder.data()
    assert sent.startswith(b"PUT /upload HTTP/1.1\r\n")
    assert b"\r\nExpect: 100-continue\r\n" in sent
    assert sent.endswith(b"\r\n\r\n")  # the head alone: no body bytes reached the backend


def test_http10_with_expect_gets_no_interim_answer(echo_lb):
    answer, _ = exchange(echo_lb.port, b"PUT /echo HTTP/1.0\r\nExpect: 100-continue\r\n"
                         b"Content-Length: 5\r\n\r\nhello")
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert json.loads(split_response(answer)[2])["body_length"] == 5


def test_pipelined_requests_are_answered_in_order(echo_lb):
    answer, _ = exchange(echo_lb.port, b"GET /echo/1 HTTP/1.1\r\nHost: x\r\n\r\n"
                         b"POST /echo/2 HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi"
                         b"GET /echo/3 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    targets = [json.loads(part.partition(b"\r\n\r\n")[2])["target"]
               for part in split_answers(answer)]
    assert targets == ["/echo/1", "/echo/2", "/echo/3"]


def test_slow_head_gets_408_after_the_header_timeout(echo_lb):
    with socket.create_connection(("127.0.0.1", echo_lb.port), timeout=10) as s:
        started = time.monotonic()
        s.sendall(b"GET / HTTP/1.1\r\nHo")
        answer = read_all(s)
        took = time.monotonic() - started
    assert split_response(answer)[0] == 408
    assert HEADER_TIMEOUT - 0.1 < took < HEADER_TIMEOUT + 1.5


def test_a_connection_that_sends_nothing_is_closed_after_the_header_timeout(echo_lb):
    with socket.create_connection(("127.0.0.1", echo_lb.port), timeout=10) as s:
        started = time.monotonic()
        answer = read_all(s)
        took = time.monotonic() - started
    assert answer == b"" or split_response(answer)[0] == 408
    assert HEADER_TIMEOUT - 0.1 < took < HEADER_TIMEOUT + 1.5


def test_idle_keep_alive_is_closed_after_the_idle_timeout_quietly(echo_lb):
    with socket.create_connection(("127.0.0.1", echo_lb.port), timeout=10) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        head = read_head(s)
        read_exactly(s, int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0]))
        started = time.monotonic()
        rest = read_all(s)
        took = time.monotonic() - started
    assert rest == b""  # no 408 on an idle connection: a client may have sent a request
    assert IDLE_TIMEOUT - 0.1 < took < IDLE_TIMEOUT + 1.5


def test_head_timeout_on_a_kept_alive_connection_counts_from_the_last_response(echo_lb):
    with socket.create_connection(("127.0.0.1", echo_lb.port), timeout=10) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        head = read_head(s)
        read_exactly(s, int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0]))
        started = time.monotonic()
        s.sendall(b"GET / HT")
        answer = read_all(s)
        took = time.monotonic() - started
    assert split_response(answer)[0] == 408
    assert took < HEADER_TIMEOUT + 1.5


def test_a_body_the_client_never_finishes_is_cut_and_no_thread_is_kept(echo_lb):
    with socket.create_connection(("127.0.0.1", echo_lb.port), timeout=10) as s:
        s.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")
        s.shutdown(socket.SHUT_WR)
        answer = read_all(s)
    assert split_response(answer)[0] == 400


# helpers -------------------------------------------------------------------------------------

def read_all(s: socket.socket) -> bytes:
    data = b""
    try:
        while chunk := s.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def split_answers(raw: bytes) -> list[bytes]:
    """Responses with Content-Length, one after the other."""
    answers = []
    while raw:
        head, _, rest = raw.partition(b"\r\n\r\n")
        length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
        answers.append(head + b"\r\n\r\n" + rest[:length])
        raw = rest[length:]
    return answers


