"""The PROXY protocol through a real LB (issue 16 item 5): accepted from proxy_protocol_from
only (v1 and v2, real sockets), its address the client's everywhere; refused when missing,
malformed, slow or from elsewhere; sent to backends with send_proxy_protocol."""

from __future__ import annotations

import json
import socket
import ssl
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests
import trustme

from gol7lb.backends import parse_backend_url
from gol7lb.config import ConfigError, load_settings
from gol7lb.proxyproto import SIGNATURE, build, build_local
from gol7lb.upstream import IdleConnections, request_head
from tests import procs
from tests.conftest import FAST_HEALTH, _stop_and_check
from tests.edgebackend import EdgeBackend
from tests.helpers import config, split_response
from tests.procs import LB, lb_status, wait_until

GET = b"GET /where HTTP/1.1\r\nHost: site.example\r\nConnection: close\r\n\r\n"




def exchange(lb: LB, *pieces: bytes, pause: float = 0.0, timeout: float = 10.0) -> bytes:
    """Send the pieces (pausing between them), then read until the LB closes."""
    with socket.create_connection(("127.0.0.1", lb.port), timeout=timeout) as s:
        for piece in pieces:
            s.sendall(piece)
            if pause:
                time.sleep(pause)
        chunks = []
        try:
            while chunk := s.recv(65536):
                chunks.append(chunk)
        except ConnectionResetError:
            pass
    return b"".join(chunks)


def seen_by_backend(raw: bytes) -> dict[str, object]:
    status, _, body = split_response(raw)
    assert status == 200, raw
    return json.loads(body)


# inbound -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def inbound_lb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LB, EdgeBackend]]:
    """One LB for the inbound cases (each closes its own connection)."""
    if procs.WORKER_CLASS != "lean":
        pytest.skip("the PROXY header stage is gol7lb's own worker's")
    backend = EdgeBackend()
    lb = LB({"GOL7LB_BACKENDS": f"http://127.0.0.1:{backend.port}",
             "GOL7LB_PROXY_PROXY_PROTOCOL": "true",
             "GOL7LB_PROXY_PROXY_PROTOCOL_FROM": "127.0.0.0/8",
             "GOL7LB_PROXY_FORWARDED": "both",
             "GOL7LB_PROXY_CLIENT_HEADER_TIMEOUT": "2", **FAST_HEALTH},
            log=tmp_path_factory.mktemp("proxyproto") / "lb.log")
    try:
        yield lb.wait_ready(), backend
    finally:
        _stop_and_check([lb])
        backend.close()


@pytest.mark.lean_worker
def test_v1_v2_and_local_headers_set_the_client_address(inbound_lb: tuple[LB, EdgeBackend]
                                                        ) -> None:
    lb, _ = inbound_lb
    v1 = seen_by_backend(exchange(lb, build("v1", ("203.0.113.7", 40000),
                                            ("198.51.100.1", 8443)) + GET))
    request = v1["request"]
    assert request["x-forwarded-for"] == "203.0.113.7"  # type: ignore[index]
    assert request["x-forwarded-port"] == "8443"  # type: ignore[index]
    assert "for=203.0.113.7" in request["forwarded"]  # type: ignore[index]

    v2 = seen_by_backend(exchange(lb, build("v2", ("2001:db8::7", 1), ("2001:db8::1", 443))
                                  + GET))
    assert v2["request"]["x-forwarded-for"] == "2001:db8::7"  # type: ignore[index]
    assert 'for="[2001:db8::7]"' in v2["request"]["forwarded"]  # type: ignore[index]

    local = seen_by_backend(exchange(lb, build_local("v2") + GET))  # the LB's own connection
    assert local["request"]["x-forwarded-for"] == "127.0.0.1"  # type: ignore[index]
    unknown = seen_by_backend(exchange(lb, b"PROXY UNKNOWN\r\n" + GET))
    assert unknown["request"]["x-forwarded-for"] == "127.0.0.1"  # type: ignore[index]

    # the access log says the header's address
    wait_until(lambda: "203.0.113.7" in lb.output() and "2001:db8::7" in lb.output(),
               timeout=10)


@pytest.mark.lean_worker
def test_header_in_pieces_and_v2_with_tlvs(inbound_lb: tuple[LB, EdgeBackend]) -> None:
    lb, _ = inbound_lb
    header = build("v1", ("192.0.2.44", 5), ("192.0.2.1", 80))
    pieces = [header[i:i + 7] for i in range(0, len(header), 7)]
    seen = seen_by_backend(exchange(lb, *pieces, GET, pause=0.02))
    assert seen["request"]["x-forwarded-for"] == "192.0.2.44"  # type: ignore[index]

    block = bytes([192, 0, 2, 55, 192, 0, 2, 1]) + struct.pack("!HH", 6, 80)
    tlvs = b"\x02\x00\x0bexample.com" + b"\x04" + struct.pack("!H", 600) + bytes(600)
    v2 = SIGNATURE + b"\x21\x11" + struct.pack("!H", len(block + tlvs)) + block + tlvs
    seen = seen_by_backend(exchange(lb, v2[:20], v2[20:] + GET, pause=0.05))
    assert seen["request"]["x-forwarded-for"] == "192.0.2.55"  # type: ignore[index]


@pytest.mark.lean_worker
@pytest.mark.parametrize("data", [
    GET,  # no header at all
    b"PROXY TCP4 203.0.113.7 198.51.100.1 99999 443\r\n" + GET,  # bad port
    b"PROXY TCP4 nonsense\r\n" + GET,
    SIGNATURE + b"\x21\x11\x00\x04" + bytes(4) + GET,  # address block too short
    b"\x16\x03\x01\x00\x05hello",  # TLS without a header
])
def test_missing_or_malformed_header_closes(inbound_lb: tuple[LB, EdgeBackend],
                                            data: bytes) -> None:
    lb, backend = inbound_lb
    before = len(backend.proxied())
    assert exchange(lb, data) == b""  # closed, not a word of HTTP
    assert len(backend.proxied()) == before


@pytest.mark.lean_worker
def test_slow_header_is_closed_at_the_head_deadline(inbound_lb: tuple[LB, EdgeBackend]) -> None:
    lb, backend = inbound_lb
    started = time.monotonic()
    assert exchange(lb, b"PROXY TCP4 203.0.113.7 ", timeout=15) == b""
    took = time.monotonic() - started
    assert 1.5 <= took < 10, took  # client_header_timeout = 2
    # while it waited, other clients were served
    seen = seen_by_backend(exchange(lb, build("v1", ("203.0.113.8", 1), ("127.0.0.1", 80))
                                    + GET))
    assert seen["request"]["x-forwarded-for"] == "203.0.113.8"  # type: ignore[index]


@pytest.mark.lean_worker
def test_peers_outside_proxy_protocol_from_are_closed(lb_factory: Callable[..., LB],
                                                      edge: Callable[..., EdgeBackend]) -> None:
    backend = edge()
    lb = lb_factory({"GOL7LB_BACKENDS": f"http://127.0.0.1:{backend.port}",
                     "GOL7LB_PROXY_PROXY_PROTOCOL": "true",
                     "GOL7LB_PROXY_PROXY_PROTOCOL_FROM": "10.0.0.0/8, 192.168.0.0/16",
                     **FAST_HEALTH})
    assert exchange(lb, build("v1", ("203.0.113.7", 1), ("127.0.0.1", 80)) + GET) == b""
    assert not backend.proxied()


@pytest.mark.lean_worker
def test_consistent_hash_uses_the_header_address(lb_factory: Callable[..., LB],
                                                 edge: Callable[..., EdgeBackend]) -> None:
    backends = [edge(), edge()]
    lb = lb_factory({"GOL7LB_BACKENDS": ", ".join(f"http://127.0.0.1:{b.port}"
                                                  for b in backends),
                     "GOL7LB_ALGORITHM": "consistent_hash",
                     "GOL7LB_PROXY_PROXY_PROTOCOL": "true",
                     "GOL7LB_PROXY_PROXY_PROTOCOL_FROM": "127.0.0.1/32", **FAST_HEALTH})
    for i in range(24):
        for _ in range(2):  # the same address twice: the same backend
            exchange(lb, build("v1", (f"198.51.100.{i}", 1000 + i), ("127.0.0.1", 80)) + GET)
    # from 127.0.0.1 alone all would hash to one backend; the header's addresses spread
    counts = [len(b.proxied()) for b in backends]
    assert all(counts), counts
    for b in backends:
        seen = [r["x-forwarded-for"] for c in b.proxied() for r in c.requests]
        for address in set(seen):
            assert seen.count(address) == 2


def test_proxy_protocol_needs_its_allow_list(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as refused:
        load_settings({"GOL7LB_PROXY_PROXY_PROTOCOL": "true"})
    assert "proxy.proxy_protocol_from" in str(refused.value)
    assert "\n" not in str(refused.value)
    with pytest.raises(ConfigError, match="pools.api.send_proxy_protocol"):
        load_settings(config(tmp_path, '[pools.api]\nsend_proxy_protocol = "v3"\n'
                                       '[[pools.api.backends]]\nurl = "http://127.0.0.1:1"\n'))
    with pytest.raises(ConfigError, match="proxy.send_proxy_protocol"):
        load_settings({"GOL7LB_PROXY_SEND_PROXY_PROTOCOL": "yes"})


# outbound ------------------------------------------------------------------------------------

def test_send_v1_with_reuse_per_client_connection(lb_factory: Callable[..., LB],
                                                  edge: Callable[..., EdgeBackend]) -> None:
    """Each backend connection starts with a header naming its client; a kept-alive one
    is reused only for the same client connection (same address and port); health checks
    send a LOCAL (v1: UNKNOWN) header."""
    backend = edge(expect_proxy=True)
    lb = lb_factory({"GOL7LB_BACKENDS": f"http://127.0.0.1:{backend.port}",
                     "GOL7LB_PROXY_SEND_PROXY_PROTOCOL": "v1", **FAST_HEALTH,
                     "GOL7LB_HEALTH_TYPE": "http"})
    wait_until(lambda: lb_status(lb)["backends"][0]["last_check"], timeout=30)
    assert lb_status(lb)["backends"][0]["last_check"]["detail"] == "HTTP 200"
    checks = [c for c in backend.connections if c.requests and not backend.proxied().count(c)]
    assert checks and all(c.proxy_raw == b"PROXY UNKNOWN\r\n" for c in checks)

    sessions = [requests.Session(), requests.Session()]
    ports = []
    for session in sessions:
        for _ in range(5):
            answer = session.get(f"{lb.url}/", timeout=10)
            assert answer.status_code == 200
        ports.append(session.get(f"{lb.url}/", timeout=10).json()["proxy"])
        session.close()
    proxied = backend.proxied()
    headers = {c.proxy_raw for c in proxied}
    assert all(h.startswith(b"PROXY TCP4 127.0.0.1 127.0.0.1 ") for h in headers), headers
    assert all(h.endswith(f" {lb.port}\r\n".encode()) for h in headers), headers
    # two client connections: two headers with their own source ports, each at most one
    # backend connection per worker that served it (never shared between the clients)
    assert len(headers) == 2
    assert len(proxied) <= 4
    for c in proxied:
        assert len({r.get("x-forwarded-for") for r in c.requests}) == 1


@pytest.mark.lean_worker
def test_inbound_address_goes_out_in_v2_over_tls(lb_factory: Callable[..., LB],
                                                 edge: Callable[..., EdgeBackend],
                                                 tmp_path: Path) -> None:
    """A named pool's send_proxy_protocol = "v2" to an https backend: the header (with the
    client address from the inbound PROXY header) precedes the TLS handshake."""
    ca = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    backend = edge(context, expect_proxy=True)
    lb = lb_factory({**config(tmp_path, f"""
[proxy]
proxy_protocol = true
proxy_protocol_from = ["127.0.0.1"]
upstream_ca = "{ca_file}"

[pools.api]
send_proxy_protocol = "v2"
[[pools.api.backends]]
url = "https://127.0.0.1:{backend.port}"

[[routes]]
pool = "api"
"""), **FAST_HEALTH})
    seen = seen_by_backend(exchange(lb, build("v1", ("203.0.113.70", 4321),
                                              ("192.0.2.1", 443)) + GET))
    assert seen["source"] == ["203.0.113.70", 4321]
    assert seen["request"]["x-forwarded-for"] == "203.0.113.70"  # type: ignore[index]
    [connection] = backend.proxied()
    assert connection.proxy is not None and connection.proxy.version == 2
    assert connection.proxy.destination == ("192.0.2.1", 443)


def test_only_our_worker_reads_proxy_headers(lb_factory: Callable[..., LB]) -> None:
    lb = lb_factory({"GOL7LB_PROXY_PROXY_PROTOCOL": "true",
                     "GOL7LB_PROXY_PROXY_PROTOCOL_FROM": "127.0.0.1"}, ready=False,
                    extra_args=("--worker-class", "gol7lb.gthread.ThreadProxyWorker"))
    assert lb.wait(60) == 2
    assert "proxy.proxy_protocol" in lb.output() and "ProxyWorker" in lb.output()


def test_a_connection_with_a_header_is_reused_only_for_the_same_header(
        edge: Callable[..., EdgeBackend]) -> None:
    backend = edge(expect_proxy=True)
    pool = IdleConnections(parse_backend_url(f"http://127.0.0.1:{backend.port}"), 2, 5)
    first = build("v2", ("192.0.2.1", 1000), ("127.0.0.1", 80))
    second = build("v2", ("192.0.2.1", 1001), ("127.0.0.1", 80))
    for prelude, expected_reused in ((first, False), (second, False), (first, True),
                                     (second, True)):
        sock, reused = pool.acquire(prelude)
        assert reused == expected_reused
        sock.sendall(request_head("GET", "/", {"Host": "x"}))
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        pool.release(sock)
    assert [c.proxy_raw for c in backend.connections] == [first, second]
    plain, reused = pool.acquire()  # a plain request never takes a socket with a header
    assert not reused
    plain.close()
