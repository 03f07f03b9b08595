"""One request on a worker thread (serve.py), over a socketpair: framing of the answer,
keep-alive decisions, the request body as wsgi.input, 100-continue, errors."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from gol7lb.http1 import Http1Parser
from gol7lb.serve import Conn, serve_request


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    server, client = socket.socketpair()
    server.setblocking(False)
    client.settimeout(5)
    yield server, client
    server.close()
    client.close()


def run(pair: tuple[socket.socket, socket.socket], raw: bytes, app: Callable[..., Any],
        body_after: bytes = b"") -> tuple[bool, bytes, dict[str, Any]]:
    server, client = pair
    parser = Http1Parser()
    parser.feed(raw)
    conn = Conn(server, ("127.0.0.9", "5555"), ("127.0.0.1", "8080"), parser, 0.0)
    seen: dict[str, Any] = {}

    def wrapped(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        seen.update(environ)
        return app(environ, start_response)

    if body_after:
        client.sendall(body_after)
    keep = serve_request(wrapped, conn, parser.ready.popleft(), 5.0, True)
    client.setblocking(False)
    out = b""
    try:
        while chunk := client.recv(65536):
            out += chunk
    except BlockingIOError:
        pass
    return keep, out, seen


def answer(status: str, headers: list[tuple[str, str]], chunks: list[bytes]) -> Callable:
    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        start_response(status, headers)
        return chunks
    return app


GET = b"GET /a%20b?q=1 HTTP/1.1\r\nHost: h\r\nX-A: 1\r\nX-A: 2\r\nX_Spoof: 1\r\n\r\n"


def test_content_length_answer_keeps_the_connection(pair):
    keep, out, env = run(pair, GET, answer("200 OK", [("Content-Length", "2")], [b"ok"]))
    head, _, body = out.partition(b"\r\n\r\n")
    assert keep and body == b"ok"
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and b"Connection: keep-alive" in head
    assert b"Date: " in head and b"Content-Length: 2" in head
    assert env["PATH_INFO"] == "/a b" and env["RAW_URI"] == "/a%20b?q=1"
    assert env["QUERY_STRING"] == "q=1" and env["HTTP_X_A"] == "1, 2"
    assert "HTTP_X_SPOOF" not in env  # names with `_` are dropped, as gunicorn does
    assert env["REMOTE_ADDR"] == "127.0.0.9" and env["SERVER_PORT"] == "8080"


def test_no_length_on_http11_is_chunked(pair):
    keep, out, _ = run(pair, GET, answer("200 OK", [], [b"ab", b"", b"c"]))
    assert keep
    assert out.endswith(b"\r\n\r\n2\r\nab\r\n1\r\nc\r\n0\r\n\r\n")
    assert b"Transfer-Encoding: chunked" in out


def test_no_length_on_http10_ends_with_the_close(pair):
    keep, out, _ = run(pair, b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
                       answer("200 OK", [], [b"abc"]))
    assert not keep and out.endswith(b"\r\n\r\nabc") and b"Connection: close" in out


def test_head_keeps_the_length_and_sends_no_body(pair):
    keep, out, _ = run(pair, b"HEAD / HTTP/1.1\r\nHost: h\r\n\r\n",
                       answer("200 OK", [("Content-Length", "5")], [b"hello"]))
    assert keep and out.endswith(b"\r\n\r\n") and b"Content-Length: 5\r\n" in out


def test_an_answer_shorter_than_its_length_is_never_reused(pair):
    keep, _, _ = run(pair, GET, answer("200 OK", [("Content-Length", "5")], [b"abc"]))
    assert not keep


def test_connection_close_from_the_app_closes(pair):
    keep, out, _ = run(pair, GET, answer("400 Bad Request", [("Content-Length", "0"),
                                                             ("Connection", "close")], []))
    assert not keep and out.count(b"Connection:") == 1 and b"Connection: close" in out


def test_an_app_error_before_the_head_is_a_500(pair):
    def app(environ, start_response):
        raise RuntimeError("boom")
    keep, out, _ = run(pair, GET, app)
    assert not keep and out.startswith(b"HTTP/1.1 500 ") and b"Traceback" not in out


def test_body_and_100_continue(pair):
    def app(environ, start_response):
        data = environ["wsgi.input"].read()
        start_response("200 OK", [("Content-Length", str(len(data)))])
        return [data]
    keep, out, _ = run(pair, b"PUT / HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\n"
                       b"Content-Length: 5\r\n\r\n", app, body_after=b"hello")
    assert out.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n")
    assert out.endswith(b"hello") and keep


def test_an_unread_body_closes_the_connection(pair):
    keep, _, _ = run(pair, b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 100\r\n\r\nabc",
                     answer("200 OK", [("Content-Length", "0")], []))
    assert not keep


def test_readline_and_iteration_of_the_input(pair):
    lines: list[bytes] = []

    def app(environ, start_response):
        lines.extend(environ["wsgi.input"])
        start_response("204 No Content", [])
        return []
    run(pair, b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 8\r\n\r\na\nbb\nccc", app)
    assert lines == [b"a\n", b"bb\n", b"ccc"]


def test_the_proxy_sees_the_same_upstream_headers_from_the_field_list(pair):
    """build_environ lists the HTTP_* keys it set; header rewriting reads only those, and
    must come to what a scan of the whole environ gives."""
    from gol7lb.headers import ForwardedPolicy, upstream_request_headers
    raw = (b"GET / HTTP/1.1\r\nHost: h\r\nX-A: 1\r\nX-A: 2\r\nCookie: a=1\r\nCookie: b=2\r\n"
           b"Connection: keep-alive, X-Drop\r\nX-Drop: gone\r\nX-Forwarded-For: 10.0.0.1\r\n"
           b"Content-Type: text/plain\r\nContent-Length: 0\r\nX-Request-ID: abc\r\n\r\n")
    _keep, _out, seen = run(pair, raw, answer("200 OK", [("Content-Length", "0")], []))
    assert seen["gol7lb.fields"] == ["HTTP_HOST", "HTTP_X_A", "HTTP_COOKIE", "HTTP_CONNECTION",
                                     "HTTP_X_DROP", "HTTP_X_FORWARDED_FOR", "HTTP_X_REQUEST_ID"]
    scanned = {k: v for k, v in seen.items() if k != "gol7lb.fields"}
    for policy in (ForwardedPolicy(), ForwardedPolicy("both", ["127.0.0.0/8"])):
        listed = upstream_request_headers(seen, "h", "8080", "rid", policy)
        scan = upstream_request_headers(scanned, "h", "8080", "rid", policy)
        assert list(listed.items()) == list(scan.items())
    assert listed["X-A"] == "1, 2" and listed["Cookie"] == "a=1; b=2"
    assert "X-Drop" not in listed and listed["Content-Type"] == "text/plain"


def test_a_body_that_stalls_gets_408_and_the_apps_own_answer_is_dropped(pair):
    """proxy.client_body_timeout on a thread: the read gives up, the client gets 408 and a
    close, and the error page the app writes after that never reaches the client."""
    def app(environ, start_response):
        try:
            environ["wsgi.input"].read()
        except Exception:
            start_response("400 Bad Request", [("Content-Length", "3")])
            return [b"bad"]
        raise AssertionError("the read should have failed")
    lent: list[bool] = []
    server, client = pair
    parser = Http1Parser()
    parser.feed(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\nabc")
    conn = Conn(server, ("127.0.0.9", "5555"), ("127.0.0.1", "8080"), parser, 0.0)
    keep = serve_request(app, conn, parser.ready.popleft(), 5.0, True, body_timeout=0.2,
                         lend=lambda: lent.append(True))
    out = client.recv(65536)
    assert not keep and lent == [True]  # it lent itself out before it waited
    assert out.startswith(b"HTTP/1.1 408 ") and b"Connection: close" in out
    assert b"bad" not in out and out.count(b"HTTP/1.1") == 1
