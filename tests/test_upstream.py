"""The backend side of an exchange, over real socket pairs: framing, interim answers, errors."""

from __future__ import annotations

import gc
import socket
import threading
import types

import pytest

from gol7lb.backends import Backend
from gol7lb.bodies import FinishedBody, UpstreamBody
from gol7lb.config import load_settings
from gol7lb.control import Snapshot
from gol7lb.counters import SharedCounters
from gol7lb.hosts import HostTable
from gol7lb.pooltable import build_table
from gol7lb.proxy import ProxyApp
from gol7lb.upstream import (
    MAX_HEAD,
    IdleConnections,
    UpstreamProtocolError,
    UpstreamResponse,
    request_head,
    still_open,
)
from tests.conftest import backends_env
from tests.helpers import RawBackend


def answer(raw: bytes, method: str = "GET", close: bool = True) -> tuple[UpstreamResponse, bytes]:
    """Feed raw bytes from a 'backend' socket; return the parsed response and its whole body."""
    ours, theirs = socket.socketpair()
    ours.settimeout(5)
    theirs.sendall(raw)
    if close:
        theirs.close()
    response = UpstreamResponse(ours, method)
    response.read_head()
    body = b""
    while block := response.read_block():
        body += block
    ours.close()
    if not close:
        theirs.close()
    return response, body


def test_content_length_body_and_repeated_headers():
    response, body = answer(b"HTTP/1.1 201 Created\r\nContent-Length: 5\r\nSet-Cookie: a=1\r\n"
                            b"Set-Cookie: b=2\r\n\r\nhello", close=False)
    assert (response.status, response.reason, body) == (201, "Created", b"hello")
    assert response.headers == [("Content-Length", "5"), ("Set-Cookie", "a=1"),
                                ("Set-Cookie", "b=2")]
    assert response.complete and response.keep_alive


def test_chunked_body_is_decoded():
    response, body = answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                            b"3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\nX-Trailer: t\r\n\r\n", close=False)
    assert body == b"abcde" and response.keep_alive


def test_body_until_eof_when_unframed():
    response, body = answer(b"HTTP/1.0 200 OK\r\n\r\nuntil the end")
    assert body == b"until the end" and not response.keep_alive


@pytest.mark.parametrize("status", [204, 304])
def test_no_body_statuses(status):
    response, body = answer(f"HTTP/1.1 {status} X\r\nContent-Length: 10\r\n\r\n".encode(),
                            close=False)
    assert body == b"" and response.complete


def test_head_answer_has_no_body_whatever_content_length_says():
    response, body = answer(b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n", "HEAD",
                            close=False)
    assert body == b"" and response.keep_alive


def test_interim_100_continue_is_skipped():
    response, body = answer(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n"
                            b"Content-Length: 2\r\nX-Final: 1\r\n\r\nok", close=False)
    assert response.status == 200 and body == b"ok"
    assert response.headers == [("Content-Length", "2"), ("X-Final", "1")]


def test_connection_close_means_no_reuse():
    response, _ = answer(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
    assert not response.keep_alive


@pytest.mark.parametrize("raw, message", [
    (b"this is not http\r\n\r\n", "invalid HTTP"),
    (b"", "without answering"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", "before the body ended"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nxx", "invalid HTTP"),
])
def test_broken_answers_raise(raw, message):
    with pytest.raises(UpstreamProtocolError, match=message):
        answer(raw)


def test_request_head_is_one_buffer_in_order():
    head = request_head("GET", "/a%2Fb?x=%41", {"Host": "h", "X-A": "1"})
    assert head == b"GET /a%2Fb?x=%41 HTTP/1.1\r\nHost: h\r\nX-A: 1\r\n\r\n"


def test_still_open_sees_eof_and_junk():
    ours, theirs = socket.socketpair()
    ours.settimeout(5)
    assert still_open(ours)
    theirs.sendall(b"junk")
    assert not still_open(ours)
    ours.close()
    ours, theirs = socket.socketpair()
    theirs.close()
    assert not still_open(ours)
    ours.close()


def test_a_complete_answer_hands_over_its_whole_body_at_once():
    ours, theirs = socket.socketpair()
    ours.settimeout(5)
    theirs.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                   b"2\r\nok\r\n3\r\nabc\r\n0\r\n\r\n")
    response = UpstreamResponse(ours, "GET")
    response.read_head()
    assert response.complete and response.keep_alive
    assert response.take_body() == b"okabc"
    assert response.read_block() == b""  # nothing left, and no read from the socket
    ours.close()
    theirs.close()


def test_a_head_in_two_reads_with_a_large_body_behind_it_is_not_refused():
    """Real networks split a head; the body bytes that come with its second part are not head
    bytes and must not count against MAX_HEAD."""
    ours, theirs = socket.socketpair()
    ours.settimeout(5)
    body = b"b" * 100_000
    theirs.sendall(b"HTTP/1.1 200 OK\r\nContent-Le")
    response = UpstreamResponse(ours, "GET")
    response._read_more()  # the first part, alone
    writer = threading.Thread(target=theirs.sendall,
                              args=(b"ngth: 100000\r\n\r\n" + body,), daemon=True)
    writer.start()
    response.read_head()
    got = b""
    while block := response.read_block():
        got += block
    writer.join(5)
    assert response.status == 200 and got == body
    ours.close()
    theirs.close()


def test_a_head_larger_than_the_limit_is_still_refused():
    ours, theirs = socket.socketpair()
    ours.settimeout(5)
    writer = threading.Thread(target=theirs.sendall, args=(
        b"HTTP/1.1 200 OK\r\n" + b"X-Big: " + b"x" * (MAX_HEAD + 10) + b"\r\n\r\n",),
        daemon=True)
    writer.start()
    with pytest.raises(UpstreamProtocolError, match="larger than"):
        UpstreamResponse(ours, "GET").read_head()
    ours.close()
    writer.join(5)
    theirs.close()


class Finishes:
    """What a response body tells when it ends (Exchange.finish), counted."""

    rid = "r"

    def __init__(self) -> None:
        self.calls: list[tuple[int, bool]] = []

    def finish(self, sent: int, failed: bool = False) -> None:
        self.calls.append((sent, failed))

    def flag(self, code: str) -> None:
        self.calls.append((-1, code == "DC"))


def test_a_finished_body_closed_twice_pools_its_socket_once_and_counts_once():
    ours, theirs = socket.socketpair()
    connections = IdleConnections(Backend("http://127.0.0.1:1", "127.0.0.1", 1), 1.0, 1.0)
    exchange = Finishes()
    body = FinishedBody(b"ok", ours, True, connections, exchange)  # type: ignore[arg-type]
    body.close()
    body.close()
    assert list(connections._idle) == [ours]
    assert exchange.calls == [(2, False)]
    ours.close()
    theirs.close()


def test_a_streamed_body_closed_twice_is_counted_once():
    ours, theirs = socket.socketpair()
    ours.settimeout(5)
    theirs.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    response = UpstreamResponse(ours, "GET")
    response.read_head()
    connections = IdleConnections(Backend("http://127.0.0.1:1", "127.0.0.1", 1), 1.0, 1.0)
    exchange = Finishes()
    body = UpstreamBody(response, ours, connections, None, exchange)  # type: ignore[arg-type]
    assert next(body) == b"abc"
    body.close()
    body.close()
    assert exchange.calls == [(-1, True), (3, False)] and not connections._idle  # DC: cut short
    assert ours.fileno() == -1  # closed: the unread rest must not reach another request
    theirs.close()


def test_a_response_retried_for_its_status_is_released(monkeypatch):
    """A backend's 503 that goes to another backend (retry_on) is let go at once: its parser
    cycle dropped, so it is freed without the cyclic garbage collector. Driven in-process
    through ProxyApp with real sockets to two raw backends (one always 503)."""

    def refuse(conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.1 503 Busy\r\nContent-Length: 0\r\n\r\n")

    def serve(conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    busy, fine = RawBackend(refuse), RawBackend(serve)
    try:
        settings = load_settings({"GOL7LB_BACKENDS": backends_env([busy.port, fine.port]),
                                  "GOL7LB_PROXY_RETRY_ON": "503", "GOL7LB_LOG_ACCESS": "false"})
        ids = {b.id for pool in settings.pools.values() for b in pool.backends}
        table = build_table(Snapshot(0, 0, 0.0, None, settings, settings.pools,
                                     dict.fromkeys(ids, "config"), {}, {}), None)
        view = types.SimpleNamespace(current=lambda: table)
        app = ProxyApp(view, SharedCounters(), HostTable(1, 8).for_worker(None))  # type: ignore[arg-type]
        gc.collect()
        gc.disable()
        try:
            statuses: list[str] = []
            for _ in range(2):  # one of the two meets the busy backend first
                statuses.clear()
                answer = app({"REQUEST_METHOD": "GET", "RAW_URI": "/", "HTTP_HOST": "x",
                              "REMOTE_ADDR": "127.0.0.1", "SERVER_PORT": "80",
                              "wsgi.url_scheme": "http"},
                             lambda status, headers, *_: statuses.append(status))
                assert b"".join(answer) == b"ok" and statuses == ["200 OK"]
                answer.close()  # type: ignore[attr-defined]
            left = [o for o in gc.get_objects() if isinstance(o, UpstreamResponse)]
        finally:
            gc.enable()
        assert busy.requests >= 1
        assert left == []
    finally:
        busy.close()
        fine.close()
