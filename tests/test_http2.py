"""HTTP/2 to clients through real gunicorn LB processes: h2c by prior knowledge and h2 by ALPN
on TLS, with real clients (httpx with http2=True, curl --http2 / --http2-prior-knowledge) and
the `h2` library as a raw client for multiplexing, flow control and the limits (too many
streams, large header lists, HPACK bombs, Rapid Reset, malformed frames, idle clients)."""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import httpx
import psutil
import pytest
import requests

from tests.conftest import FAST_HEALTH, backends_env
from tests.helpers import per_label
from tests.procs import LB, free_port, start_backend, wait_until, workers_of
from tests.test_tls import Certs, tls_env

pytestmark = pytest.mark.lean_worker  # HTTP/2 is served by gol7lb's own worker only

PATTERN = bytes(range(256))


class RawClient:
    """A client-side h2 connection on a blocking socket: the tests drive every frame."""

    def __init__(self, port: int, window: int | None = None, send_preface: bool = True,
                 tls: ssl.SSLContext | None = None) -> None:
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock: socket.socket = tls.wrap_socket(raw, server_hostname="localhost") \
            if tls else raw
        config = h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        self.conn = h2.connection.H2Connection(config)
        if window is not None:
            self.conn.local_settings = h2.settings.Settings(client=True, initial_values={
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window})
        self.events: list[h2.events.Event] = []
        self.bodies: dict[int, bytearray] = {}
        self.headers: dict[int, dict[str, str]] = {}
        self.ended: set[int] = set()
        self.resets: dict[int, int] = {}
        self.terminated: h2.events.ConnectionTerminated | None = None
        self.closed = False
        if send_preface:
            self.conn.initiate_connection()
            self.flush()

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.sock.sendall(data)

    def request(self, path: str, method: str = "GET", body: bytes | None = None,
                extra: list[tuple[str, str]] | None = None, end: bool = True) -> int:
        stream_id = self.conn.get_next_available_stream_id()
        headers = [(":method", method), (":path", path), (":scheme", "http"),
                   (":authority", "localhost")] + (extra or [])
        self.conn.send_headers(stream_id, headers, end_stream=end and not body)
        if body:
            self.conn.send_data(stream_id, body, end_stream=end)
        self.flush()
        return stream_id

    def pump(self, timeout: float = 10.0, ack: bool = True) -> bool:
        """Read once (up to `timeout`); False when the connection closed."""
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return True
        except OSError:
            data = b""
        if not data:
            self.closed = True
            return False
        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError:
            self.closed = True
            return False
        for event in events:
            self.events.append(event)
            if isinstance(event, h2.events.ResponseReceived):
                self.headers[event.stream_id] = {str(k): str(v) for k, v in event.headers or []}
            elif isinstance(event, h2.events.DataReceived):
                self.bodies.setdefault(event.stream_id, bytearray()).extend(event.data)
                if ack:
                    self.conn.acknowledge_received_data(event.flow_controlled_length,
                                                        event.stream_id)
            elif isinstance(event, h2.events.StreamEnded):
                self.ended.add(event.stream_id)
            elif isinstance(event, h2.events.StreamReset):
                self.resets[event.stream_id] = event.error_code
            elif isinstance(event, h2.events.ConnectionTerminated):
                self.terminated = event
        with_suppress_flush(self)
        return True

    def until(self, condition, timeout: float = 15.0, ack: bool = True) -> None:  # noqa: ANN001
        deadline = time.monotonic() + timeout
        while not condition():
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError("condition not met in time")
            if not self.pump(min(left, 1.0), ack) and not condition():
                raise AssertionError("connection closed")

    def close(self) -> None:
        self.sock.close()


def with_suppress_flush(client: RawClient) -> None:
    try:
        client.flush()
    except OSError:
        client.closed = True


def worker_rss(lb: LB) -> int:
    return sum(w.memory_info().rss for w in workers_of(lb))


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    proc = start_backend(free_port(), tmp_path_factory.mktemp("h2-backend"))
    try:
        yield proc.port
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def h2c_lb(backend: int, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LB]:
    """One worker (a raw client's connection and the RSS it measures are that one's), small
    limits for the attack cases."""
    tmp = tmp_path_factory.mktemp("h2c")
    lb = LB({"GOL7LB_BACKENDS": backends_env([backend]), **FAST_HEALTH, "WEB_CONCURRENCY": "1",
             "GOL7LB_HTTP2_MAX_CONCURRENT_STREAMS": "4",
             "GOL7LB_HTTP2_MAX_RESETS_PER_SECOND": "20",
             "GOL7LB_HTTP2_MAX_HEADER_LIST": "16384"}, log=tmp / "lb.log")
    try:
        yield lb.wait_ready()
    finally:
        lb.stop()


# the happy path ----------------------------------------------------------------------------

def test_h2c_prior_knowledge_with_httpx_and_http11_on_the_same_port(h2c_lb):
    with httpx.Client(http1=False, http2=True, timeout=10) as client:
        answer = client.get(f"{h2c_lb.url}/")
        assert answer.status_code == 200 and answer.http_version == "HTTP/2"
        assert answer.text.startswith("backend ")
        rid = answer.headers["x-request-id"]
        body = bytes(range(256)) * 4096  # 1 MiB: more than one window of the client's
        echoed = client.post(f"{h2c_lb.url}/echo?x=1", content=body).json()
        assert echoed["body_length"] == len(body)
        assert echoed["body_sha256"] == hashlib.sha256(body).hexdigest()
        assert echoed["target"] == "/echo?x=1"
    assert requests.get(f"{h2c_lb.url}/", timeout=10).status_code == 200  # HTTP/1.1 still
    wait_until(lambda: f"proto=HTTP/2 rid={rid}" in h2c_lb.output(), timeout=10)
    # the access line is written after the answer went out: wait for it too
    wait_until(lambda: " proto=HTTP/1.1 rid=" in h2c_lb.output(), timeout=10)


def test_streams_take_the_same_routes_rules_and_metrics(backend, lb_factory, tmp_path):
    config = tmp_path / "lb.toml"
    config.write_text(f"""
[[backends]]
url = "http://127.0.0.1:{backend}"

[[routes]]
path_prefix = "/ping"
respond = {{ status = 200, body = "pong\\n" }}

[[routes]]
path_prefix = "/denied"
pool = "default"
deny = ["127.0.0.0/8"]
""")
    lb = lb_factory({"GOL7LB_CONFIG": str(config), **FAST_HEALTH})
    with httpx.Client(http1=False, http2=True, timeout=10) as client:
        assert client.get(f"{lb.url}/ping").text == "pong\n"
        assert client.get(f"{lb.url}/denied/x").status_code == 403
        assert client.get(f"{lb.url}/").status_code == 200
    wait_until(lambda: per_label(lb, "gol7lb_requests_total", "code", pool="default")
               .get("200", 0) >= 1, timeout=10)
    wait_until(lambda: '"GET /denied/x" 403 ' in lb.output(), timeout=10)
    assert all(" proto=HTTP/2 " in line for line in lb.output().splitlines()
               if " rid=" in line)


def test_curl_http2_prior_knowledge(h2c_lb):
    if shutil.which("curl") is None:
        pytest.skip("curl missing")
    out = subprocess.run(["curl", "-sS", "--http2-prior-knowledge", "-o", "/dev/null", "-w",
                          "%{http_code} %{http_version}", f"{h2c_lb.url}/"],
                         capture_output=True, text=True, timeout=30)
    assert out.stdout == "200 2", out.stderr


def test_a_large_upload_streams_past_the_windows(h2c_lb):
    """Bigger than retry_buffer, the stream window (1 MiB) and the connection window: the LB
    acknowledges as the backend takes it, and the body arrives whole (chunked, no length)."""
    body = PATTERN * (12 * 4096)  # 12 MiB
    with httpx.Client(http1=False, http2=True, timeout=30) as client:
        def pieces() -> Iterator[bytes]:
            for start in range(0, len(body), 100_000):
                yield body[start:start + 100_000]
        echoed = client.post(f"{h2c_lb.url}/echo", content=pieces()).json()
    assert echoed["body_length"] == len(body)
    assert echoed["body_sha256"] == hashlib.sha256(body).hexdigest()


def test_expect_100_continue_and_a_body_without_length(h2c_lb):
    """The client waits for `100` before its body; the body has no content-length (HTTP/2
    needs none): the backend gets it whole."""
    client = RawClient(h2c_lb.port)
    try:
        stream = client.request("/echo", "POST", extra=[("expect", "100-continue")], end=False)
        client.until(lambda: any(isinstance(e, h2.events.InformationalResponseReceived)
                                 for e in client.events))
        body = b"z" * 200_000  # more than retry_buffer: streamed to the backend
        for start in range(0, len(body), 16384):
            while client.conn.local_flow_control_window(stream) < 16384:
                client.pump(1.0)
            client.conn.send_data(stream, body[start:start + 16384])
            client.flush()
        client.conn.end_stream(stream)
        client.flush()
        client.until(lambda: stream in client.ended)
        echoed = json.loads(bytes(client.bodies[stream]))
        assert echoed["body_length"] == len(body)
        assert echoed["body_sha256"] == hashlib.sha256(body).hexdigest()
    finally:
        client.close()


def test_streams_are_multiplexed_a_slow_one_holds_no_other(h2c_lb):
    client = RawClient(h2c_lb.port)
    try:
        slow = client.request("/sleep/3")
        started = time.monotonic()
        fast = [client.request("/") for _ in range(3)]
        client.until(lambda: all(s in client.ended for s in fast))
        assert time.monotonic() - started < 2.0
        assert slow not in client.ended
        assert all(client.headers[s][":status"] == "200" for s in fast)
        client.until(lambda: slow in client.ended)
        assert client.headers[slow][":status"] == "200"
    finally:
        client.close()


def test_a_slow_reader_gets_its_download_paced_with_flat_memory(h2c_lb):
    """50 MiB from the backend at full speed to a client that reads only when it acknowledges
    (a 64 KiB window): nothing more than the window comes before WINDOW_UPDATE, and the
    worker does not hold the body."""
    size = 50 * 1024 * 1024
    client = RawClient(h2c_lb.port, window=65535)
    try:
        before = worker_rss(h2c_lb)
        stream = client.request(f"/bytes/{size}")
        client.until(lambda: len(client.bodies.get(stream, b"")) >= 65535 - 16384, ack=False)
        time.sleep(1.0)  # the LB must wait for the window; the backend keeps sending
        client.pump(0.5, ack=False)
        got = len(client.bodies.get(stream, b""))
        assert got <= 65535, got  # never past the window
        assert worker_rss(h2c_lb) - before < 16 * 1024 * 1024
        # now read it all, acknowledging: the rest comes, whole and in order
        body = client.bodies.setdefault(stream, bytearray())
        client.conn.acknowledge_received_data(got, stream)
        client.flush()
        peak = 0
        deadline = time.monotonic() + 120
        sampled = 0.0
        while stream not in client.ended and stream not in client.resets:
            assert time.monotonic() < deadline
            client.pump(1.0)
            if time.monotonic() - sampled > 0.2:  # the worker's memory while it streams
                sampled = time.monotonic()
                peak = max(peak, worker_rss(h2c_lb) - before)
        assert len(body) == size
        assert body[:512] == PATTERN * 2 and body[-256:] == PATTERN
        assert peak < 32 * 1024 * 1024
    finally:
        client.close()


def test_connections_cost_no_thread(h2c_lb):
    """60 open HTTP/2 connections (one with a body that stalls) hold no thread: the
    worker's thread count stays, and other clients are answered at once."""
    worker = workers_of(h2c_lb)[0]
    threads = worker.num_threads()
    clients = [RawClient(h2c_lb.port) for _ in range(60)]
    try:
        clients[0].request("/echo", "POST", body=b"x" * 1000, end=False)
        for client in clients:
            client.pump(0.05)
        assert worker.num_threads() <= threads + 1
        started = time.monotonic()
        with httpx.Client(http1=False, http2=True, timeout=10) as other:
            assert other.get(f"{h2c_lb.url}/").status_code == 200
        assert time.monotonic() - started < 3
    finally:
        for client in clients:
            client.close()


# limits and attacks ------------------------------------------------------------------------

def test_streams_beyond_max_concurrent_streams_are_refused_alone(h2c_lb):
    """The client sends before it reads the LB's SETTINGS (4 streams): the fifth and sixth
    are refused with REFUSED_STREAM, the others answered on the same connection."""
    client = RawClient(h2c_lb.port)
    try:
        streams = [client.request("/sleep/0.5") for _ in range(6)]
        client.until(lambda: all(s in client.ended or s in client.resets for s in streams))
        refused = [s for s in streams if client.resets.get(s) == 7]  # REFUSED_STREAM
        assert refused == streams[4:], client.resets
        assert all(client.headers[s][":status"] == "200" for s in streams[:4])
        again = client.request("/")  # the connection goes on
        client.until(lambda: again in client.ended)
    finally:
        client.close()


def test_a_header_list_over_the_limit_gets_431_on_its_stream_only(h2c_lb):
    client = RawClient(h2c_lb.port)
    try:
        big = client.request("/", extra=[("x-big", "a" * 20000)])
        fine = client.request("/")
        client.until(lambda: big in client.ended and fine in client.ended)
        assert client.headers[big][":status"] == "431"
        assert client.headers[fine][":status"] == "200"
    finally:
        client.close()


def test_an_hpack_bomb_closes_only_its_connection(h2c_lb):
    """A header list past twice max_header_list, made of one entry of the dynamic table
    referenced again and again: GOAWAY and close; other connections are served."""
    client = RawClient(h2c_lb.port)
    try:
        value = "b" * 4000
        client.request("/", extra=[("x-bomb", value)])  # enters the dynamic table
        client.request("/", extra=[("x-bomb", value)] * 60)  # ~240 KB decoded, small on wire
        client.until(lambda: client.closed or client.terminated is not None)
        assert client.terminated is not None and client.terminated.error_code == 11
    finally:
        client.close()
    assert httpx.Client(http1=False, http2=True).get(f"{h2c_lb.url}/").status_code == 200


def test_rapid_reset_gets_goaway_enhance_your_calm(h2c_lb):
    client = RawClient(h2c_lb.port)
    try:
        for _ in range(60):  # the burst in one write, as an attacker's client sends it
            stream = client.conn.get_next_available_stream_id()
            client.conn.send_headers(stream, [(":method", "GET"), (":path", "/sleep/1"),
                                              (":scheme", "http"), (":authority", "localhost")],
                                     end_stream=True)
            client.conn.reset_stream(stream, 8)  # CANCEL
        client.flush()
        client.until(lambda: client.terminated is not None or client.closed)
        assert client.terminated is not None and client.terminated.error_code == 11
    finally:
        client.close()
    with httpx.Client(http1=False, http2=True, timeout=10) as other:
        assert other.get(f"{h2c_lb.url}/").status_code == 200


def test_malformed_frames_close_only_that_connection(h2c_lb):
    with socket.create_connection(("127.0.0.1", h2c_lb.port), timeout=10) as sock:
        # the preface, then a SETTINGS frame on stream 1 (settings belong to stream 0)
        sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
                     b"\x00\x00\x00\x04\x00\x00\x00\x00\x01")
        received = b""
        sock.settimeout(10)
        while True:
            data = sock.recv(65536)
            if not data:
                break
            received += data
    assert b"\x07" in received  # a GOAWAY frame (type 7) came before the close
    with httpx.Client(http1=False, http2=True, timeout=10) as other:
        assert other.get(f"{h2c_lb.url}/").status_code == 200


def test_an_idle_http2_connection_is_closed_like_a_slow_http11_one(backend, lb_factory):
    lb = lb_factory({"GOL7LB_BACKENDS": backends_env([backend]), **FAST_HEALTH,
                     "GOL7LB_PROXY_CLIENT_HEADER_TIMEOUT": "1",
                     "GOL7LB_PROXY_CLIENT_IDLE_TIMEOUT": "1.5"})
    silent = RawClient(lb.port)  # the preface and SETTINGS, then no request
    used = RawClient(lb.port)
    try:
        stream = used.request("/")
        used.until(lambda: stream in used.ended)
        started = time.monotonic()
        silent.until(lambda: silent.closed, timeout=10)
        used.until(lambda: used.closed, timeout=10)
        assert time.monotonic() - started < 6
    finally:
        silent.close()
        used.close()


# TLS (ALPN) ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return Certs(tmp_path_factory.mktemp("h2-certs"))


@pytest.fixture(scope="module")
def h2_tls_lb(backend: int, certs: Certs, tmp_path_factory: pytest.TempPathFactory
              ) -> Iterator[LB]:
    tmp = tmp_path_factory.mktemp("h2-tls")
    cert, key = certs.issue("h2", "localhost", "127.0.0.1")
    lb = LB({"GOL7LB_BACKENDS": backends_env([backend]), **FAST_HEALTH,
             **tls_env(cert, key, GOL7LB_TLS_HSTS="600")}, log=tmp / "lb.log")
    try:
        yield lb.wait_ready()
    finally:
        lb.stop()


def test_h2_by_alpn_with_httpx_multiplexed_and_http11_alongside(h2_tls_lb, certs):
    url = f"https://localhost:{h2_tls_lb.port}"
    context = certs.client_context()
    with httpx.Client(http2=True, verify=context, timeout=20) as client:
        answer = client.get(f"{url}/")
        assert answer.http_version == "HTTP/2" and answer.status_code == 200
        assert answer.headers["strict-transport-security"] == "max-age=600"
        echoed = client.post(f"{url}/echo", content=b"x" * 300_000).json()
        assert echoed["body_length"] == 300_000
        assert ["X-Forwarded-Proto", "https"] in echoed["headers"]
    with httpx.Client(verify=context, timeout=20) as http11:
        answer = http11.get(f"{url}/")
        assert answer.http_version == "HTTP/1.1" and answer.status_code == 200
    tls = certs.client_context(alpn=["h2", "http/1.1"])
    raw = RawClient(h2_tls_lb.port, tls=tls)
    try:
        slow = raw.request("/sleep/2")
        fast = raw.request("/")
        raw.until(lambda: fast in raw.ended)
        assert slow not in raw.ended
        raw.until(lambda: slow in raw.ended)
    finally:
        raw.close()


def test_curl_http2_over_tls(h2_tls_lb, certs):
    if shutil.which("curl") is None:
        pytest.skip("curl missing")
    out = subprocess.run(["curl", "-sS", "--http2", "--cacert", str(certs.ca_file), "-o",
                          "/dev/null", "-w", "%{http_code} %{http_version}",
                          f"https://localhost:{h2_tls_lb.port}/bytes/200000"],
                         capture_output=True, text=True, timeout=30)
    assert out.stdout == "200 2", out.stderr


def test_http2_off_offers_http11_only(backend, certs, lb_factory, tmp_path: Path):
    cert, key = certs.issue("off", "localhost")
    lb = lb_factory({"GOL7LB_BACKENDS": backends_env([backend]), **FAST_HEALTH,
                     **tls_env(cert, key), "GOL7LB_HTTP2_ENABLED": "false"})
    context = certs.client_context(alpn=["h2", "http/1.1"])
    with socket.create_connection(("127.0.0.1", lb.port), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname="localhost") as tls:
        assert tls.selected_alpn_protocol() == "http/1.1"
    assert psutil.pid_exists(lb.popen.pid)


def test_term_answers_streams_in_flight_then_goaway(backend, lb_factory):
    """A stopping worker sends GOAWAY (no new streams) and finishes the streams it has."""
    lb = lb_factory({"GOL7LB_BACKENDS": backends_env([backend]), **FAST_HEALTH,
                     "WEB_CONCURRENCY": "1"})
    client = RawClient(lb.port)
    try:
        slow = client.request("/sleep/1.5")
        time.sleep(0.3)  # the request reached the backend
        lb.signal(signal.SIGTERM)
        client.until(lambda: slow in client.ended, timeout=20)
        assert client.headers[slow][":status"] == "200"
        client.until(lambda: client.terminated is not None or client.closed, timeout=20)
        assert client.terminated is not None and client.terminated.error_code == 0
    finally:
        client.close()
    assert lb.wait(30) == 0


def test_clients_that_leave_right_after_the_handshake_kill_no_worker(h2_tls_lb, certs):
    pids = {w.pid for w in workers_of(h2_tls_lb)}
    context = certs.client_context(alpn=["h2"])
    for _ in range(20):
        with socket.create_connection(("127.0.0.1", h2_tls_lb.port), timeout=10) as raw, \
                context.wrap_socket(raw, server_hostname="localhost") as tls:
            assert tls.selected_alpn_protocol() == "h2"
    with httpx.Client(http2=True, verify=certs.client_context(), timeout=20) as client:
        assert client.get(f"https://localhost:{h2_tls_lb.port}/").status_code == 200
    assert {w.pid for w in workers_of(h2_tls_lb)} == pids
    assert "Exception in worker process" not in h2_tls_lb.output()
