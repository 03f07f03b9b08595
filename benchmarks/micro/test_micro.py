"""Micro-benchmarks of the pure hot-path pieces (pytest-benchmark).

Kept out of the default test run (pytest's testpaths is tests/). Run:
    pip install -e '.[bench]' && python -m pytest benchmarks/micro --benchmark-only
"""

from __future__ import annotations

import pytest

from gol7lb.backends import parse_backend_url
from gol7lb.balancer import ALGORITHMS, PickContext, make_policy
from gol7lb.counters import SharedCounters
from gol7lb.headers import client_response_headers, request_id, upstream_request_headers

BACKENDS = [parse_backend_url(f"http://127.0.0.1:{9000 + i}", 1 + i % 3) for i in range(8)]
ENVIRON = {
    "REQUEST_METHOD": "GET", "RAW_URI": "/api/items?id=42", "REMOTE_ADDR": "127.0.0.1",
    "wsgi.url_scheme": "http", "HTTP_HOST": "shop.example:8080", "HTTP_USER_AGENT": "wrk",
    "HTTP_ACCEPT": "*/*", "HTTP_ACCEPT_ENCODING": "gzip", "HTTP_COOKIE": "session=abc",
    "HTTP_X_FORWARDED_FOR": "203.0.113.7", "HTTP_CONNECTION": "keep-alive",
    "SERVER_PORT": "8080", "SERVER_NAME": "shop.example", "PATH_INFO": "/api/items",
    "QUERY_STRING": "id=42", "SCRIPT_NAME": "", "wsgi.input": None, "wsgi.errors": None,
}
UPSTREAM = [("Content-Type", "text/html"), ("Content-Length", "1234"), ("Set-Cookie", "a=1"),
            ("Set-Cookie", "b=2"), ("Cache-Control", "no-cache"), ("Date", "x"),
            ("Server", "nginx"), ("Connection", "keep-alive"), ("ETag", '"abc"')]


IDS = {b.id for b in BACKENDS}


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_policy_order(benchmark, algorithm):
    policy = make_policy(algorithm, BACKENDS, IDS)
    counters = SharedCounters()
    benchmark(lambda: policy.order(PickContext(counters.take_ticket(), lambda _id: 0, b"k")))


def test_build_round_robin_policy(benchmark):
    benchmark(make_policy, "round_robin", BACKENDS, IDS)


def test_upstream_request_headers(benchmark):
    benchmark(upstream_request_headers, ENVIRON, "shop.example:8080", "8080", "rid")


def test_client_response_headers(benchmark):
    benchmark(client_response_headers, UPSTREAM, "rid")


def test_request_id_generated(benchmark):
    benchmark(request_id, {})
