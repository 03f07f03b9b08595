"""HTTPS on PORT through real gunicorn workers, with real TLS clients (`ssl`, httpx, curl,
openssl s_client) and certificates made here with trustme: SNI, ALPN, forwarding headers,
HSTS, the redirect listener, session resumption across workers, handshakes on the event
loop (stalled clients), certificate reload, mTLS, WebSocket over TLS, /status and metrics."""

from __future__ import annotations

import contextlib
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest
import requests
import trustme
from cryptography import x509

from tests.conftest import FAST_HEALTH, _stop_and_check, backends_env
from tests.helpers import header, per_label, scrape_text
from tests.procs import LB, free_port, lb_status, start_backend, wait_until, workers_of

pytestmark = pytest.mark.lean_worker  # HTTPS is served by gol7lb's own worker only


class Certs:
    """A CA and pairs it issued, written as PEM files in `root`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.ca = trustme.CA()
        self.ca_file = root / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))

    def issue(self, stem: str, *names: str) -> tuple[Path, Path]:
        cert = self.ca.issue_cert(*names)
        cert_file, key_file = self.root / f"{stem}.crt", self.root / f"{stem}.key"
        write_pair(cert, cert_file, key_file)
        return cert_file, key_file

    def client_context(self, alpn: list[str] | None = None) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca_file))
        if alpn:
            context.set_alpn_protocols(alpn)
        return context


def write_pair(cert: trustme.LeafCert, cert_file: Path, key_file: Path) -> None:
    """Chain then key, each replaced atomically (as a deployment tool does)."""
    for path, data in ((cert_file, b"".join(p.bytes() for p in cert.cert_chain_pems)),
                       (key_file, cert.private_key_pem.bytes())):
        temporary = path.with_suffix(".tmp")
        temporary.write_bytes(data)
        temporary.replace(path)


def serial_of(leaf: trustme.LeafCert) -> int:
    return x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes()).serial_number


def tls_env(cert: Path, key: Path, **more: str) -> dict[str, str]:
    return {"GOL7LB_TLS_CERT": str(cert), "GOL7LB_TLS_KEY": str(key), **more}


def peer_names(port: int, context: ssl.SSLContext, server_name: str | None) -> list[str]:
    """The SAN DNS names of the certificate the LB presents for `server_name` (the chain
    verified, the name not: the test compares the names)."""
    context.check_hostname = False
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname=server_name) as tls:
        cert: dict = tls.getpeercert() or {}
    return [str(value) for kind, value in cert.get("subjectAltName", ()) if kind == "DNS"]


def https_get(port: int, context: ssl.SSLContext, path: str = "/",
              session: ssl.SSLSession | None = None,
              name: str = "localhost") -> tuple[bytes, Resumed]:
    """One request on a new TLS connection; the answer and the connection's session."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname=name, session=session) as tls:
        tls.sendall(f"GET {path} HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n"
                    .encode())
        answer = b""
        while chunk := tls.recv(65536):
            answer += chunk
        return answer, Resumed(tls.session, bool(tls.session_reused))


class Resumed:
    def __init__(self, session: ssl.SSLSession | None, reused: bool) -> None:
        self.session = session
        self.session_reused = reused


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return Certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def https_lb(certs: Certs, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LB]:
    """HTTPS with a default pair (localhost, *.example.test), one more by SNI (other.test),
    HSTS and the redirect listener."""
    tmp = tmp_path_factory.mktemp("https")
    backend = start_backend(free_port(), tmp)
    cert, key = certs.issue("default", "localhost", "*.example.test", "127.0.0.1")
    other_cert, other_key = certs.issue("other", "other.test")
    redirect = free_port()
    lb = LB({"GOL7LB_BACKENDS": backends_env([backend.port]), **FAST_HEALTH,
             **tls_env(cert, key, GOL7LB_TLS_CERTIFICATES=f"{other_cert}:{other_key}",
                       GOL7LB_TLS_HSTS="600", GOL7LB_TLS_REDIRECT_PORT=str(redirect))},
            log=tmp / "lb.log")
    lb.redirect_port = redirect  # type: ignore[attr-defined]
    try:
        yield lb.wait_ready()
    finally:
        _stop_and_check([lb, backend])


def test_https_request_with_forwarding_headers_and_hsts(https_lb, certs):
    with httpx.Client(verify=certs.client_context(), timeout=10) as client:
        answer = client.get(f"https://localhost:{https_lb.port}/echo")
    assert answer.status_code == 200
    assert answer.headers["Strict-Transport-Security"] == "max-age=600"
    doc = answer.json()
    assert header(doc, "X-Forwarded-Proto") == ["https"]
    assert header(doc, "X-Forwarded-Port") == [str(https_lb.port)]


def test_rfc7239_forwarded_and_min_version_13(certs, lb_factory, backend_factory):
    backend = backend_factory()
    cert, key = certs.issue("fwd", "localhost")
    lb = lb_factory({"GOL7LB_BACKENDS": backends_env([backend.port]),
                     "GOL7LB_PROXY_FORWARDED": "rfc7239",
                     **tls_env(cert, key, GOL7LB_TLS_MIN_VERSION="1.3")})
    with httpx.Client(verify=certs.client_context(), timeout=10) as client:
        answer = client.get(f"https://localhost:{lb.port}/echo")
    assert "proto=https" in header(answer.json(), "Forwarded")[0]
    assert "Strict-Transport-Security" not in answer.headers  # tls.hsts off
    old = certs.client_context()
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises(ssl.SSLError):
        https_get(lb.port, old)


def test_sni_picks_the_certificate_by_san_names_and_wildcards(https_lb, certs):
    context = certs.client_context()
    assert peer_names(https_lb.port, context, "other.test") == ["other.test"]
    assert "*.example.test" in peer_names(https_lb.port, context, "a.example.test")
    assert "localhost" in peer_names(https_lb.port, context, "localhost")
    # no SNI, or a name nobody has: the default pair
    assert "localhost" in peer_names(https_lb.port, certs.client_context(), None)


def test_alpn_offers_h2_then_http11(https_lb, certs):
    for offered, chosen in ((["h2", "http/1.1"], "h2"), (["http/1.1"], "http/1.1")):
        context = certs.client_context(alpn=offered)
        with socket.create_connection(("127.0.0.1", https_lb.port), timeout=10) as raw, \
                context.wrap_socket(raw, server_hostname="localhost") as tls:
            assert tls.selected_alpn_protocol() == chosen


def test_curl_and_openssl_s_client(https_lb, certs):
    if shutil.which("curl") is None or shutil.which("openssl") is None:
        pytest.skip("curl or openssl missing")
    out = subprocess.run(["curl", "-sS", "--cacert", str(certs.ca_file), "--resolve",
                          f"other.test:{https_lb.port}:127.0.0.1", "-o", "/dev/null",
                          "-w", "%{http_code} %{scheme}", f"https://other.test:{https_lb.port}/"],
                         capture_output=True, text=True, timeout=30)
    assert out.stdout == "200 HTTPS", out.stderr
    out = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{https_lb.port}",
                          "-servername", "other.test", "-CAfile", str(certs.ca_file),
                          "-alpn", "http/1.1"],
                         input="", capture_output=True, text=True, timeout=30)
    assert "Verify return code: 0 (ok)" in out.stdout, out.stdout + out.stderr
    assert "ALPN protocol: http/1.1" in out.stdout


def test_a_closing_connection_ends_with_close_notify(https_lb, certs):
    """The LB closes a TLS connection with close_notify: a client that reads until the end
    sees a clean end (no "unexpected EOF"), so its session stays resumable."""
    context = certs.client_context()
    with socket.create_connection(("127.0.0.1", https_lb.port), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname="localhost",
                                suppress_ragged_eofs=False) as tls:
        tls.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := tls.recv(65536):  # SSLEOFError without close_notify
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200 ")


def test_redirect_port_answers_308_to_https(https_lb):
    redirect = https_lb.redirect_port
    answer = requests.get(f"http://127.0.0.1:{redirect}/a/b?c=1", allow_redirects=False,
                          headers={"Host": f"shop.example:{redirect}"}, timeout=10)
    assert answer.status_code == 308
    assert answer.headers["Location"] == f"https://shop.example:{https_lb.port}/a/b?c=1"
    # ACME challenges are never redirected: answered from storage (none here: 404)
    answer = requests.get(f"http://127.0.0.1:{redirect}/.well-known/acme-challenge/abc",
                          allow_redirects=False, timeout=10)
    assert answer.status_code == 404


def test_sessions_resume_on_every_worker(https_lb, certs):
    """Contexts built before the fork: a session from one worker resumes on the others.
    Connections held open spread over both workers (spread.py), and every one resumes."""
    context = certs.client_context()
    context.maximum_version = ssl.TLSVersion.TLSv1_2  # one session resumes many times
    _, first = https_get(https_lb.port, context)
    session = first.session
    assert session is not None
    held = []
    try:
        for _ in range(12):
            raw = socket.create_connection(("127.0.0.1", https_lb.port), timeout=10)
            tls = context.wrap_socket(raw, server_hostname="localhost", session=session)
            held.append(tls)
            assert tls.session_reused
        ports = {tls.getsockname()[1] for tls in held}
        served: dict[int, int] = {}
        for worker in workers_of(https_lb):
            for c in worker.net_connections(kind="tcp"):
                if c.status == psutil.CONN_ESTABLISHED and c.raddr and c.raddr.port in ports:
                    served[worker.pid] = served.get(worker.pid, 0) + 1
        assert len(served) == 2, served  # both workers hold resumed connections
    finally:
        for tls in held:
            tls.close()
    # TLS 1.3 tickets resume too
    modern = certs.client_context()
    _, first = https_get(https_lb.port, modern)
    _, again = https_get(https_lb.port, modern, session=first.session)
    assert again.session_reused


def test_status_and_metrics_show_certificates_and_handshakes(https_lb, certs):
    https_get(https_lb.port, certs.client_context())
    tls = lb_status(https_lb)["tls"]
    assert tls["acme"] == {"pending": [], "last_error": None}
    by_file = {c["file"]: c for c in tls["certificates"]}
    default = by_file[str(certs.root / "default.crt")]
    assert default["names"] == ["localhost", "*.example.test", "127.0.0.1"]
    assert default["source"] == "file" and default["not_after"] > time.time() + 86400
    assert by_file[str(certs.root / "other.crt")]["names"] == ["other.test"]
    expiry = per_label(https_lb, "gol7lb_tls_certificate_expiry_seconds", "name")
    assert expiry["other.test"] == by_file[str(certs.root / "other.crt")]["not_after"]
    assert per_label(https_lb, "gol7lb_tls_handshakes_total", "result")["ok"] >= 1
    assert "gol7lb_tls_handshakes_total" in scrape_text(https_lb)


def test_plain_http_to_the_https_port_gets_400_and_fails_the_handshake_only(https_lb, certs):
    """As nginx: a plain HTTP request on the HTTPS port gets a plain 400 saying so (a
    misconfigured client or proxy learns why), counted as a failed handshake."""
    before = per_label(https_lb, "gol7lb_tls_handshakes_total", "result").get("failed", 0)
    with socket.create_connection(("127.0.0.1", https_lb.port), timeout=10) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = b""
        with contextlib.suppress(OSError):
            while chunk := s.recv(4096):
                answer += chunk
    assert answer.startswith(b"HTTP/1.1 400 "), answer
    assert b"plain HTTP request sent to the HTTPS port" in answer
    assert b"Connection: close" in answer
    wait_until(lambda: per_label(https_lb, "gol7lb_tls_handshakes_total", "result")
               .get("failed", 0) > before)
    answer, _ = https_get(https_lb.port, certs.client_context())
    assert answer.startswith(b"HTTP/1.1 200")


def _timed_requests(port: int, context: ssl.SSLContext, n: int) -> list[float]:
    times = []
    for _ in range(n):
        started = time.monotonic()
        answer, _ = https_get(port, context)
        times.append(time.monotonic() - started)
        assert answer.startswith(b"HTTP/1.1 200")
    return times


@pytest.mark.slow
def test_stalled_handshakes_do_not_delay_others_and_time_out(certs, lb_factory,
                                                             backend_factory):
    """1,000 clients that open TCP and stall mid-handshake (half a ClientHello, or nothing)
    cost the loop nothing: a normal HTTPS request takes about what it took without them;
    each is closed at tls.handshake_timeout and counted."""
    backend = backend_factory()
    cert, key = certs.issue("stall", "localhost")
    lb = lb_factory({"GOL7LB_BACKENDS": backends_env([backend.port]),
                     **tls_env(cert, key, GOL7LB_TLS_HANDSHAKE_TIMEOUT="4")})
    context = certs.client_context()
    context.options |= ssl.OP_NO_TICKET  # full handshakes, every time
    _timed_requests(lb.port, context, 3)  # warm up both workers
    baseline = statistics.median(_timed_requests(lb.port, context, 15))
    hello = _client_hello_start()
    stalled = []
    first_opened = time.monotonic()
    try:
        for i in range(1000):
            s = socket.create_connection(("127.0.0.1", lb.port), timeout=10)
            if i % 2:
                s.sendall(hello)  # a partial ClientHello: the handshake waits for the rest
            stalled.append(s)
        loaded = _timed_requests(lb.port, context, 15)
        delay = statistics.median(loaded) - baseline
        assert delay < 0.05, f"median {statistics.median(loaded):.4f}s vs {baseline:.4f}s"
        # closed at the timeout (4 s), by the loop's sweep
        wait_until(lambda: per_label(lb, "gol7lb_tls_handshakes_total", "result")
                   .get("timeout", 0) >= 1000, timeout=30, interval=0.25)
        assert time.monotonic() - first_opened >= 3.9  # none before its 4 s
        for s in stalled[:20]:
            s.settimeout(5)
            assert s.recv(1) == b""  # closed by the LB
    finally:
        for s in stalled:
            s.close()


def _client_hello_start() -> bytes:
    """The first 60 bytes of a real ClientHello (an ssl client's, captured from memory BIOs)."""
    context = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with contextlib.suppress(ssl.SSLWantReadError):
        client.do_handshake()
    return outgoing.read()[:60]


@pytest.mark.slow
def test_changed_certificates_reload_without_failed_requests(certs, lb_factory,
                                                             backend_factory):
    backend = backend_factory()
    cert, key = certs.issue("live", "localhost")
    lb = lb_factory({"GOL7LB_BACKENDS": backends_env([backend.port]), **tls_env(cert, key)})
    context = certs.client_context()
    context.options |= ssl.OP_NO_TICKET

    def serial() -> int:
        with socket.create_connection(("127.0.0.1", lb.port), timeout=10) as raw, \
                context.wrap_socket(raw, server_hostname="localhost") as tls:
            return int(tls.getpeercert()["serialNumber"], 16)

    failures: list[str] = []
    done = threading.Event()

    def load() -> None:  # requests on new connections all through the changes
        while not done.is_set():
            try:
                answer, _ = https_get(lb.port, context)
                if not answer.startswith(b"HTTP/1.1 200"):
                    failures.append(answer[:40].decode("latin-1"))
            except OSError as e:
                failures.append(repr(e))

    threads = [threading.Thread(target=load) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        def everywhere(leaf: trustme.LeafCert) -> bool:  # both workers, by a few handshakes
            return all(serial() == serial_of(leaf) for _ in range(8))

        new = certs.ca.issue_cert("localhost")
        write_pair(new, cert, key)
        changed_at = time.monotonic()
        wait_until(lambda: everywhere(new), timeout=10)
        assert time.monotonic() - changed_at < 2.0
        # a pair that does not load: refused, named, the served one stays
        key.write_bytes(b"-----BEGIN PRIVATE KEY-----\nbroken\n-----END PRIVATE KEY-----\n")
        error = wait_until(lambda: lb_status(lb)["config"]["last_error"], timeout=10)
        assert str(key) in error
        assert everywhere(new)
        # a key from another pair: refused as well, naming the key file
        other = certs.ca.issue_cert("localhost")
        key.write_bytes(other.private_key_pem.bytes())
        wait_until(lambda: "does not match" in (lb_status(lb)["config"]["last_error"] or ""),
                   timeout=10)
        assert everywhere(new)
        write_pair(other, cert, key)  # fixed: served, and the error is gone
        wait_until(lambda: everywhere(other), timeout=10)
        wait_until(lambda: lb_status(lb)["config"]["last_error"] is None, timeout=10)
    finally:
        done.set()
        for t in threads:
            t.join(timeout=30)
    assert not failures, failures[:5]
    assert "certificate refused" in lb.output() and str(key) in lb.output()


@pytest.mark.parametrize("broken", ["cert", "key", "mismatch"])
def test_a_bad_pair_stops_the_start_naming_the_file(certs, lb_factory, broken, tmp_path):
    cert, key = certs.issue(f"bad-{broken}", "localhost")
    if broken == "cert":
        cert.write_text("not a certificate\n")
    elif broken == "key":
        key.write_text("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    else:
        _, other_key = certs.issue("bad-other", "localhost")
        key = other_key
    lb = lb_factory(tls_env(cert, key), ready=False)
    assert lb.wait(30) == 2
    lines = [line for line in lb.output().splitlines() if line.startswith("gol7lb:")]
    assert len(lines) == 1, lb.output()
    assert str(cert if broken == "cert" else key) in lines[0]


def test_client_certificates_are_required_with_client_ca(certs, lb_factory, backend_factory):
    backend = backend_factory()
    cert, key = certs.issue("mtls", "localhost")
    lb = lb_factory({"GOL7LB_BACKENDS": backends_env([backend.port]),
                     **tls_env(cert, key, GOL7LB_TLS_CLIENT_CA=str(certs.ca_file))})
    anonymous = certs.client_context()
    with pytest.raises((ssl.SSLError, OSError)):
        answer, _ = https_get(lb.port, anonymous)
        assert not answer  # TLS 1.3: the refusal may come at the first read
        raise ssl.SSLError("no answer")
    client_cert = certs.ca.issue_cert("client@example.test")
    with_cert = certs.client_context()
    client_cert.configure_cert(with_cert)
    answer, _ = https_get(lb.port, with_cert)
    assert answer.startswith(b"HTTP/1.1 200")


def test_websocket_over_tls(certs, lb_factory):
    from websockets.sync.client import connect
    from websockets.sync.server import serve

    def echo(ws):  # noqa: ANN001
        for message in ws:
            ws.send(message)

    server = serve(echo, "127.0.0.1", 0, ping_interval=None)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        cert, key = certs.issue("ws", "localhost")
        port = server.socket.getsockname()[1]
        lb = lb_factory({"GOL7LB_BACKENDS": f"http://127.0.0.1:{port}", **tls_env(cert, key)})
        with connect(f"wss://localhost:{lb.port}/ws", ssl=certs.client_context(),
                     ping_interval=None, open_timeout=10, close_timeout=5,
                     max_size=None) as ws:
            for size in (5, 100_000, 1_000_000):
                ws.send("x" * size)
                assert ws.recv(timeout=10) == "x" * size
    finally:
        server.shutdown()
        thread.join(timeout=10)


@pytest.mark.parametrize("worker", ["gthread"])
def test_another_worker_class_refuses_tls(certs, lb_factory, worker):
    cert, key = certs.issue("gthread", "localhost")
    lb = lb_factory(tls_env(cert, key), ready=False, extra_args=("--worker-class", worker))
    assert lb.wait(30) == 2
    assert "tls.cert needs gol7lb's own worker" in lb.output()


# units: settings, selection, the redirect app ---------------------------------------------

def test_tls_settings_from_toml_and_environment(tmp_path):
    from gol7lb.config import CertPair, ConfigError, load_settings

    path = tmp_path / "lb.toml"
    path.write_text('[tls]\ncert = "a.crt"\nkey = "a.key"\nhsts = 60\n'
                    'certificates = [{ cert = "b.crt", key = "b.key" }]\n')
    settings = load_settings({"GOL7LB_CONFIG": str(path)})
    assert settings.tls.certificates == (CertPair("b.crt", "b.key"),)
    assert settings.tls.hsts == 60 and settings.tls.min_version == "1.2"
    env = {"GOL7LB_TLS_CERT": "a.crt", "GOL7LB_TLS_KEY": "a.key",
           "GOL7LB_TLS_CERTIFICATES": "/x/b.crt:/x/b.key, c.crt:c.key"}
    assert load_settings(env).tls.certificates == (CertPair("/x/b.crt", "/x/b.key"),
                                                  CertPair("c.crt", "c.key"))
    for bad, words in ((
            {"GOL7LB_TLS_CERT": "a.crt"}, "set both"),
            ({"GOL7LB_TLS_HSTS": "5"}, "tls.hsts"),
            ({"GOL7LB_TLS_MIN_VERSION": "1.1"}, "tls.min_version"),
            ({**env, "GOL7LB_TLS_CERTIFICATES": "nokey"}, "tls.certificates")):
        with pytest.raises(ConfigError, match=words):
            load_settings(bad)
    path.write_text('[tls]\ncert = "a.crt"\nkey = "a.key"\ncertificates = [{ cert = "b" }]\n')
    with pytest.raises(ConfigError, match="tls.certificates"):
        load_settings({"GOL7LB_CONFIG": str(path)})


def test_sni_selection_exact_then_one_label_wildcards(certs):
    from gol7lb.config import TlsSettings
    from gol7lb.tls import Source, TLSServer

    a = certs.issue("sel-a", "a.test", "*.wild.test")
    b = certs.issue("sel-b", "exact.wild.test")
    server = TLSServer(TlsSettings(cert=str(a[0]), key=str(a[1])),
                       lambda: [Source(str(a[0]), str(a[1])), Source(str(b[0]), str(b[1]))])
    first, second = (server.loaded[s].context for s in server.order)
    assert server.select("exact.wild.test") is second  # exact beats the wildcard
    assert server.select("Other.Wild.Test.") is first
    assert server.select("deep.other.wild.test") is first  # default: no match
    assert server.select(None) is first
    assert server.select("nobody.test") is first


def test_redirect_app_locations_and_acme_challenges(tmp_path):
    from gol7lb import challenges
    from gol7lb.redirect import RedirectApp

    seen: list[tuple[str, list[tuple[str, str]]]] = []

    def call(app, target, host="example.com:80"):  # noqa: ANN001
        body = b"".join(app({"RAW_URI": target, "HTTP_HOST": host},
                            lambda status, headers: seen.append((status, headers))))
        status, headers = seen[-1]
        return status[:3], dict(headers), body

    storage = str(tmp_path)
    app = RedirectApp(443, lambda: storage)
    assert call(app, "/x?y=1")[1]["Location"] == "https://example.com/x?y=1"
    assert call(app, "/", "[::1]:8080")[1]["Location"] == "https://[::1]/"
    assert call(app, "http://example.com/p?q")[1]["Location"] == "https://example.com/p?q"
    assert call(RedirectApp(8443, lambda: ""), "/")[1]["Location"] == \
        "https://example.com:8443/"
    assert call(app, "/", "")[0] == "400"
    challenges.publish(storage, "tok_EN-1", "tok_EN-1.thumb")
    assert call(app, "/.well-known/acme-challenge/tok_EN-1") == \
        ("200", {"Content-Length": "14", "Content-Type": "application/octet-stream"},
         b"tok_EN-1.thumb")
    assert call(app, "/.well-known/acme-challenge/other")[0] == "404"


@pytest.mark.slow
def test_a_reload_adds_certificates_and_refuses_a_pair_that_does_not_load(
        certs, lb_factory, backend_factory, tmp_path):
    backend = backend_factory()
    cert, key = certs.issue("base", "localhost")
    extra_cert, extra_key = certs.issue("added", "added.test")
    config = tmp_path / "lb.toml"
    head = (f'[[backends]]\nurl = "http://127.0.0.1:{backend.port}"\n\n'
            f'[tls]\ncert = "{cert}"\nkey = "{key}"\n')
    config.write_text(head)
    lb = lb_factory({"GOL7LB_CONFIG": str(config)})
    context = certs.client_context()
    assert peer_names(lb.port, context, "added.test") == ["localhost"]  # the default
    config.write_text(head + f'certificates = [{{ cert = "{extra_cert}", key = "{extra_key}" }}]\n')
    # no request needed: the workers read the reloaded configuration by themselves
    wait_until(lambda: all(peer_names(lb.port, context, "added.test") == ["added.test"]
                           for _ in range(6)), timeout=15)
    broken = tmp_path / "broken.key"
    broken.write_text("not a key\n")
    config.write_text(head + f'certificates = [{{ cert = "{extra_cert}", key = "{broken}" }}]\n')
    error = wait_until(lambda: lb_status(lb)["config"]["last_error"], timeout=15)
    assert str(broken) in error
    assert peer_names(lb.port, context, "added.test") == ["added.test"]  # the running one stays
    out = subprocess.run([sys.executable, "-m", "gol7lb", "check", str(config)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and str(broken) in out.stderr


def test_ciphers_and_client_ca_are_checked_when_the_contexts_are_built(certs, tmp_path):
    from gol7lb.config import ConfigError, TlsSettings
    from gol7lb.tls import new_context

    assert new_context(TlsSettings(ciphers="ECDHE+AESGCM")).get_ciphers()
    with pytest.raises(ConfigError, match="tls.ciphers"):
        new_context(TlsSettings(ciphers="NOTHING-AT-ALL"))
    missing = tmp_path / "nope.pem"
    with pytest.raises(ConfigError, match=f"tls.client_ca = '{missing}'"):
        new_context(TlsSettings(client_ca=str(missing)))
    context = new_context(TlsSettings(client_ca=str(certs.ca_file), min_version="1.3"))
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.minimum_version == ssl.TLSVersion.TLSv1_3
