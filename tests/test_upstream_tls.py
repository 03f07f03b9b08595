"""https:// backends (issue 16 item 4): verified TLS to backends through a real LB, keep-alive,
SNI, health checks over TLS, verification failures as connect failures, mTLS, WebSocket."""

from __future__ import annotations

import logging
import ssl
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests
import trustme
from websockets.sync.client import connect
from websockets.sync.server import ServerConnection, serve

from gol7lb import upstreamtls
from gol7lb.backends import parse_backend_url
from gol7lb.config import ConfigError, ProxySettings, load_settings
from gol7lb.discovery import make_resolver, resolve
from gol7lb.outcomes import classify_error
from gol7lb.upstream import ConnectFailed, IdleConnections, request_head, still_open
from tests.conftest import FAST_HEALTH
from tests.dnsserver import TestDNS
from tests.edgebackend import EdgeBackend
from tests.helpers import RawBackend
from tests.procs import LB, backend_entry, lb_status, wait_until

SLOW_HEALTH = {"GOL7LB_HEALTH_INTERVAL": "60", "GOL7LB_HEALTH_TIMEOUT": "2"}


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def ca_file(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


def server_context(ca: trustme.CA, *names: str, client_ca: bool = False) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert(*names).configure_cert(context)
    if client_ca:
        ca.configure_trust(context)
        context.verify_mode = ssl.CERT_REQUIRED
    return context




def entry(lb: LB, backend_id: str) -> dict[str, Any]:
    return next(b for b in lb_status(lb)["backends"] if b["id"] == backend_id)


def proxy(**values: object) -> ProxySettings:
    return ProxySettings(**values)  # type: ignore[arg-type]


# the context and the connection, in process ----------------------------------------------------

def test_context_is_built_once_per_configuration(ca_file: str) -> None:
    settings = proxy(upstream_ca=ca_file)
    first = upstreamtls.context(settings)
    assert upstreamtls.context(proxy(upstream_ca=ca_file)) is first
    assert upstreamtls.context(proxy(upstream_ca=ca_file, upstream_verify=False)) is not first


def test_pool_reuses_a_verified_tls_connection(ca: trustme.CA, ca_file: str,
                                               edge: Callable[..., EdgeBackend]) -> None:
    backend = edge(server_context(ca, "localhost"))
    pool = IdleConnections(parse_backend_url(f"https://localhost:{backend.port}"), 2, 5,
                        upstreamtls.build_context(proxy(upstream_ca=ca_file)))
    for expected_reused in (False, True, True):
        sock, reused = pool.acquire()
        assert reused == expected_reused
        sock.sendall(request_head("GET", "/", {"Host": "x"}))
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        pool.release(sock)
    assert len(backend.connections) == 1 and backend.connections[0].sni == "localhost"


def test_idle_tls_socket_closed_by_backend_is_not_reused(ca: trustme.CA, ca_file: str,
                                                         edge: Callable[..., EdgeBackend]) -> None:
    backend = edge(server_context(ca, "127.0.0.1"), close_each=True)
    pool = IdleConnections(parse_backend_url(f"https://127.0.0.1:{backend.port}"), 2, 5,
                        upstreamtls.build_context(proxy(upstream_ca=ca_file)))
    sock, _ = pool.acquire()
    sock.sendall(request_head("GET", "/", {"Host": "x"}))
    assert sock.recv(65536).startswith(b"HTTP/1.1 200")
    wait_until(lambda: not still_open(sock), timeout=5)
    sock.close()


def test_verification_failure_is_a_connect_failure(ca: trustme.CA, ca_file: str,
                                                   edge: Callable[..., EdgeBackend]) -> None:
    backend = edge(server_context(ca, "other.example"))
    pool = IdleConnections(parse_backend_url(f"https://localhost:{backend.port}"), 2, 5,
                        upstreamtls.build_context(proxy(upstream_ca=ca_file)))
    with pytest.raises(ConnectFailed) as failed:
        pool.acquire()
    assert "certificate verify failed" in str(failed.value)
    assert "localhost" in str(failed.value)
    assert classify_error(failed.value).kind == "connect-failure"


def test_untrusted_ca_fails_and_verify_false_connects(edge: Callable[..., EdgeBackend],
                                                     ca_file: str) -> None:
    stranger = trustme.CA()
    backend = edge(server_context(stranger, "localhost"))
    url = parse_backend_url(f"https://localhost:{backend.port}")
    with pytest.raises(ConnectFailed, match="certificate verify failed"):
        IdleConnections(url, 2, 5, upstreamtls.build_context(proxy(upstream_ca=ca_file))).acquire()
    lab = upstreamtls.build_context(proxy(upstream_verify=False))
    sock, _ = IdleConnections(url, 2, 5, lab).acquire()
    sock.close()


def test_plain_backend_behind_an_https_url_fails_to_connect(
        ca_file: str) -> None:
    backend = RawBackend(lambda conn: conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n"))
    pool = IdleConnections(parse_backend_url(f"https://127.0.0.1:{backend.port}"), 2, 5,
                        upstreamtls.build_context(proxy(upstream_ca=ca_file)))
    try:
        with pytest.raises(ConnectFailed, match="TLS handshake failed: wrong version number"):
            pool.acquire()
    finally:
        backend.close()


def test_a_discovered_address_is_verified_against_the_name(
        ca: trustme.CA, ca_file: str, edge: Callable[..., EdgeBackend], tmp_path: Path) -> None:
    """discover = "dns" with https://: each address found gets the name for SNI and
    verification (the certificate names the service, not the address)."""
    dns = TestDNS(tmp_path)
    try:
        backend = edge(server_context(ca, "api.test"))
        dns.set_a("api.test", ["127.0.0.1"])
        settings = load_settings(write(tmp_path, f'''
[[backends]]
url = "https://api.test:{backend.port}"
discover = "dns"
[proxy]
upstream_ca = "{ca_file}"
'''))
        [spec] = settings.discover
        [found], _ttl = resolve(spec, make_resolver([dns.address]))
        assert (found.url, found.tls_name) == (f"https://127.0.0.1:{backend.port}", "api.test")
        context = upstreamtls.build_context(settings.proxy)
        sock, _ = IdleConnections(found, 2, 5, context).acquire()
        sock.close()  # the backend's thread records the handshake a moment later
        wait_until(lambda: backend.connections and backend.connections[0].sni, timeout=5)
        assert backend.connections[0].sni == "api.test"
        stranger = parse_backend_url(f"https://127.0.0.1:{backend.port}")  # no name: refused
        with pytest.raises(ConnectFailed, match="certificate verify failed"):
            IdleConnections(stranger, 2, 5, context).acquire()
    finally:
        dns.stop()


def test_https_backend_without_context_never_goes_plain(edge: Callable[..., EdgeBackend]) -> None:
    backend = edge()
    with pytest.raises(ConnectFailed, match="no TLS context"):
        IdleConnections(parse_backend_url(f"https://127.0.0.1:{backend.port}"), 2, 5).acquire()
    assert not backend.connections


# configuration ---------------------------------------------------------------------------------

def test_https_urls_parse() -> None:
    backend = parse_backend_url("HTTPS://api.internal")
    assert (backend.url, backend.port, backend.tls) == ("https://api.internal:443", 443, True)
    assert not parse_backend_url("http://api.internal").tls


def write(tmp_path: Path, text: str) -> dict[str, str]:
    path = tmp_path / "lb.toml"
    path.write_text(text)
    return {"GOL7LB_CONFIG": str(path)}


@pytest.mark.parametrize("text,words", [
    ('[[backends]]\nurl = "https://127.0.0.1:1"\n[proxy]\nupstream_ca = "/nonexistent.pem"\n',
     ["proxy.upstream_ca", "/nonexistent.pem"]),
    ('[[backends]]\nurl = "http://127.0.0.1:1"\n[proxy]\nupstream_cert = "/no/cert.pem"\n',
     ["proxy.upstream_cert", "/no/cert.pem"]),
    ('[[backends]]\nurl = "http://127.0.0.1:1"\n[proxy]\nupstream_key = "/k.pem"\n',
     ["proxy.upstream_key", "upstream_cert"]),
])
def test_bad_tls_settings_are_one_line_errors(tmp_path: Path, text: str,
                                              words: list[str]) -> None:
    with pytest.raises(ConfigError) as refused:
        load_settings(write(tmp_path, text))
    message = str(refused.value)
    assert "\n" not in message and all(w in message for w in words), message


# through a real LB -----------------------------------------------------------------------------

def test_https_backend_through_the_lb(lb_factory: Callable[..., LB], ca: trustme.CA,
                                      ca_file: str, edge: Callable[..., EdgeBackend]) -> None:
    """Verified against the URL's name (SNI = that name), the Host header as for http, kept
    alive and reused, and http health checks over TLS."""
    backend = edge(server_context(ca, "localhost"))
    lb = lb_factory({"GOL7LB_BACKENDS": f"https://localhost:{backend.port}",
                     "GOL7LB_PROXY_UPSTREAM_CA": ca_file, **FAST_HEALTH,
                     "GOL7LB_HEALTH_TYPE": "http"})
    wait_until(lambda: entry(lb, f"localhost:{backend.port}")["last_check"], timeout=30)
    with requests.Session() as session:
        for _ in range(20):
            answer = session.get(f"{lb.url}/x", headers={"Host": "site.example"}, timeout=10)
            assert answer.status_code == 200
            seen = answer.json()
            assert seen["sni"] == "localhost"
            assert seen["request"]["host"] == "site.example"
            assert seen["request"]["line"] == "GET /x HTTP/1.1"
    # 20 requests from one client over 2 workers: their connections were reused
    assert 1 <= len(backend.proxied()) <= 2
    state = entry(lb, f"localhost:{backend.port}")
    assert state["state"] == "up" and state["last_check"]["detail"] == "HTTP 200"


def test_verification_failure_through_the_lb(lb_factory: Callable[..., LB], ca: trustme.CA,
                                             ca_file: str,
                                             edge: Callable[..., EdgeBackend]) -> None:
    """A backend whose certificate stops matching after the health checks passed: each
    request it would take is retried on the other backend (retry_on connect-failure), and
    passive health counts the failures and ejects it."""
    good = edge(server_context(ca, "127.0.0.1"), close_each=True)
    flipping = server_context(ca, "127.0.0.1")
    bad = edge(flipping, close_each=True)
    lb = lb_factory({"GOL7LB_BACKENDS": f"https://127.0.0.1:{good.port}, "
                                        f"https://127.0.0.1:{bad.port}",
                     "GOL7LB_PROXY_UPSTREAM_CA": ca_file, **SLOW_HEALTH,
                     "GOL7LB_HEALTH_PASSIVE_FAILS": "2", "GOL7LB_HEALTH_MAX_EJECTED_PERCENT": "50"})
    wait_until(lambda: all(backend_entry(lb, b.port)["last_check"] for b in (good, bad)),
               timeout=30)
    ca.issue_cert("wrong.example").configure_cert(flipping)  # new handshakes get this one
    for _ in range(10):
        answer = requests.get(f"{lb.url}/", timeout=10)
        assert answer.status_code == 200
        assert answer.json()["connection"] >= 0
    assert not bad.proxied()
    wait_until(lambda: backend_entry(lb, bad.port)["state"] == "ejected", timeout=10)


def test_health_check_reason_in_status_and_log(lb_factory: Callable[..., LB], ca: trustme.CA,
                                               ca_file: str,
                                               edge: Callable[..., EdgeBackend]) -> None:
    bad = edge(server_context(ca, "wrong.example"))
    lb = lb_factory({"GOL7LB_BACKENDS": f"https://127.0.0.1:{bad.port}",
                     "GOL7LB_PROXY_UPSTREAM_CA": ca_file, **FAST_HEALTH})
    check = wait_until(lambda: backend_entry(lb, bad.port)["last_check"], timeout=30)
    assert not check["ok"]
    assert "certificate verify failed" in check["detail"], check
    assert "127.0.0.1" in check["detail"]
    wait_until(lambda: "certificate verify failed" in lb.output(), timeout=10)
    assert requests.get(f"{lb.url}/", timeout=10).status_code == 503
    assert lb_status(lb)["pools"]


def test_lab_mode_and_client_certificates(lb_factory: Callable[..., LB], ca: trustme.CA,
                                          tmp_path: Path,
                                          edge: Callable[..., EdgeBackend]) -> None:
    """upstream_verify = false connects to a backend whose name does not match (and warns at
    start); upstream_cert/upstream_key are presented to a backend that requires them."""
    backend = edge(server_context(ca, "wrong.example", client_ca=True))
    client = ca.issue_cert("gol7lb.client")
    cert, key = tmp_path / "client.pem", tmp_path / "client.key"
    client.cert_chain_pems[0].write_to_path(str(cert))
    client.private_key_pem.write_to_path(str(key))
    lb = lb_factory({"GOL7LB_BACKENDS": f"https://127.0.0.1:{backend.port}",
                     "GOL7LB_PROXY_UPSTREAM_VERIFY": "false",
                     "GOL7LB_PROXY_UPSTREAM_CERT": str(cert),
                     "GOL7LB_PROXY_UPSTREAM_KEY": str(key), **FAST_HEALTH})
    assert requests.get(f"{lb.url}/", timeout=10).status_code == 200
    [seen] = backend.proxied()
    assert seen.client_cert is not None
    assert ("DNS", "gol7lb.client") in seen.client_cert["subjectAltName"]  # type: ignore
    assert "upstream_verify is false" in lb.output()


def test_websocket_to_an_https_backend(lb_factory: Callable[..., LB], ca: trustme.CA,
                                       ca_file: str) -> None:
    logging.getLogger("websockets").setLevel(logging.CRITICAL)  # health checks' handshakes

    def echo(ws: ServerConnection) -> None:
        for message in ws:
            ws.send(message)

    server = serve(echo, "127.0.0.1", 0, ssl=server_context(ca, "127.0.0.1"),
                   ping_interval=None)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = server.socket.getsockname()[1]
        lb = lb_factory({"GOL7LB_BACKENDS": f"https://127.0.0.1:{port}",
                         "GOL7LB_PROXY_UPSTREAM_CA": ca_file, **FAST_HEALTH})
        with connect(f"ws://127.0.0.1:{lb.port}/ws", open_timeout=10, close_timeout=5,
                     ping_interval=None) as ws:
            for message in ("hello", b"\x00\x01" * 40000, "again"):
                ws.send(message)
                assert ws.recv(timeout=10) == message
    finally:
        server.shutdown()
        thread.join(timeout=10)
