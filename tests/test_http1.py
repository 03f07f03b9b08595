"""The client-side request parser on its own: framing, limits, smuggling corpus, pipelining."""

from __future__ import annotations

import pytest

from gol7lb.http1 import MAX_REQUEST_LINE, Http1Parser, RequestError
from tests.smuggling import CASES


def parse(data: bytes, step: int = 0, **limits: int) -> Http1Parser:
    parser = Http1Parser(**limits)
    if step:
        for i in range(0, len(data), step):
            parser.feed(data[i:i + step])
    else:
        parser.feed(data)
    return parser


def refused(data: bytes, step: int = 0, **limits: int) -> int:
    with pytest.raises(RequestError) as caught:
        parse(data, step, **limits)
    return caught.value.status


@pytest.mark.parametrize("name, raw, status", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("step", [0, 1, 7])
def test_smuggling_corpus_is_refused_whole_or_byte_by_byte(name, raw, status, step):
    assert refused(raw, step) == status


def test_a_plain_request_head_and_body():
    parser = parse(b"POST /a?b=1 HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello", 3)
    req = parser.ready.popleft()
    assert (req.method, req.target, req.version, req.length, req.complete) == \
        ("POST", "/a?b=1", "1.1", 5, True)
    assert b"".join(req.body) == b"hello"
    assert ("Host", "x") in req.headers


def test_chunked_body_is_decoded_and_pipelined_requests_queue_in_order():
    parser = parse(b"POST /1 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                   b"5\r\nhello\r\n0\r\n\r\nGET /2 HTTP/1.1\r\nHost: x\r\n\r\n")
    first, second = parser.ready
    assert first.chunked and b"".join(first.body) == b"hello" and first.complete
    assert second.target == "/2" and second.length == 0


def test_http10_and_keep_alive_flags():
    req = parse(b"GET / HTTP/1.0\r\n\r\n").ready[0]
    assert req.version == "1.0" and not req.keep_alive
    req = parse(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").ready[0]
    assert req.keep_alive
    req = parse(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").ready[0]
    assert not req.keep_alive


def test_expect_continue_is_noticed():
    req = parse(b"PUT / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                b"Content-Length: 3\r\n\r\n").ready[0]
    assert req.expect_continue and not req.complete


@pytest.mark.parametrize("step", [0, 100])
def test_request_line_over_8_kib_is_414(step):
    target = b"/" + b"a" * MAX_REQUEST_LINE
    assert refused(b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n\r\n", step) == 414


@pytest.mark.parametrize("method", [b"GET", b"DELETE"])
def test_the_request_line_limit_counts_the_whole_line(method):
    """8 KiB is the request line (method, target, version), not the target alone."""
    room = MAX_REQUEST_LINE - len(method) - len(b"  HTTP/1.1")
    fits = method + b" /" + b"a" * (room - 1) + b" HTTP/1.1"
    assert len(fits) == MAX_REQUEST_LINE
    assert parse(fits + b"\r\nHost: x\r\n\r\n").ready
    over = method + b" /" + b"a" * room + b" HTTP/1.1"
    assert refused(over + b"\r\nHost: x\r\n\r\n") == 414


@pytest.mark.parametrize("step", [0, 1])
def test_trailer_fields_never_join_the_header_section(step):
    """A trailer after a chunked body is dropped: a `Host` or `X-Request-ID` trailer must not
    change the request the route was chosen for."""
    parser = parse(b"POST /echo HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
                   b"5\r\nhello\r\n0\r\nHost: evil.example\r\nX-Request-ID: injected\r\n"
                   b"Authorization: Bearer x\r\n\r\nGET /next HTTP/1.1\r\nHost: h\r\n\r\n", step)
    first, second = parser.ready
    assert first.headers == [("Host", "h"), ("Transfer-Encoding", "chunked")]
    assert b"".join(first.body) == b"hello" and first.complete
    assert second.target == "/next" and second.headers == [("Host", "h")]


def test_a_trailer_section_over_max_header_bytes_is_431():
    head = b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n0\r\n"
    assert refused(head + b"X-T: " + b"a" * 5000 + b"\r\n\r\n", max_header_bytes=4096) == 431


@pytest.mark.parametrize("step", [0, 1000])
def test_head_over_max_header_bytes_is_431(step):
    head = b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X-Big: " + b"a" * 5000 + b"\r\n"
    assert refused(head + b"\r\n", step, max_header_bytes=4096) == 431
    assert parse(head + b"\r\n", step, max_header_bytes=8192).ready


def test_a_never_ending_header_is_431_before_it_completes():
    parser = Http1Parser(max_header_bytes=4096)
    parser.feed(b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: ")
    with pytest.raises(RequestError) as caught:
        for _ in range(10):
            parser.feed(b"a" * 1000)
    assert caught.value.status == 431


def test_too_many_header_lines_is_431():
    lines = b"".join(b"X-%d: y\r\n" % i for i in range(11))
    assert refused(b"GET / HTTP/1.1\r\nHost: x\r\n" + lines + b"\r\n", max_headers=10) == 431
    assert parse(b"GET / HTTP/1.1\r\nHost: x\r\n" + lines + b"\r\n", max_headers=12).ready


def test_upgrade_stops_parsing_and_keeps_what_followed():
    parser = parse(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                   b"\r\n\x81\x05hello")
    assert parser.upgraded and parser.ready[0].upgrade
    assert parser.leftover == b"\x81\x05hello"
    parser.feed(b"more")
    assert parser.leftover.endswith(b"more")


def test_in_head_tells_a_slow_client_from_an_idle_one():
    parser = Http1Parser()
    assert not parser.in_head
    parser.feed(b"GE")
    assert parser.in_head
    parser.feed(b"T / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert not parser.in_head and parser.ready


@pytest.mark.parametrize("step", [0, 1, 1000])
def test_max_header_bytes_is_the_whole_head_to_the_byte(step):
    """Request line, header lines and the empty line: exactly the limit passes, one more is
    431."""
    base = b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: \r\n\r\n"

    def head(total: int) -> bytes:
        return base.replace(b"X-Big: ", b"X-Big: " + b"a" * (total - len(base)))

    assert parse(head(4096), step, max_header_bytes=4096).ready
    assert refused(head(4097), step, max_header_bytes=4096) == 431


def test_received_counts_the_body_bytes_parsed_so_far():
    """The worker's loop buffers a body until it is complete or past proxy.retry_buffer."""
    parser = Http1Parser()
    parser.feed(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")
    req = parser.ready[0]
    assert (req.received, req.complete) == (3, False)
    parser.feed(b"defg")
    req.body.popleft()  # a reader took some: the count stays what was parsed
    assert req.received == 7
    parser.feed(b"hij")
    assert (req.received, req.complete) == (10, True)
