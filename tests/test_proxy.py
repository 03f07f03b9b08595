"""Proxying through a real gunicorn LB to real backends: what goes through, and how."""

from __future__ import annotations

import hashlib
import http.client
import json
import socket
import threading
import time
from collections import Counter

import pytest
import requests

from tests.conftest import backends_env
from tests.helpers import RawBackend, header, raw_request, split_response
from tests.procs import workers_of

pytestmark = pytest.mark.usefixtures("shared_lb")


def echo(shared_lb, method="GET", path="/echo", **kwargs) -> dict:
    kwargs.setdefault("timeout", 10)
    response = requests.request(method, shared_lb.url + path, **kwargs)
    assert response.status_code == 200, response.text
    return response.json()


def test_sequential_requests_rotate_globally_across_workers(shared_lb):
    # the LB is ready once one worker accepts; gunicorn forks the second up to 0.1 s later
    deadline = time.monotonic() + 10
    while len(workers := workers_of(shared_lb)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(workers) == 2
    cpu_before = [sum(w.cpu_times()[:2]) for w in workers]
    ports: Counter[int] = Counter()
    for _ in range(150):  # a new connection each time, so the kernel spreads them over workers
        response = requests.get(shared_lb.url + "/", headers={"Connection": "close"}, timeout=10)
        assert response.status_code == 200
        ports[int(response.headers["X-Backend-Port"])] += 1
        assert response.text == f"backend {response.headers['X-Backend-Port']}\n"
    cpu_used = [sum(w.cpu_times()[:2]) - b for w, b in zip(workers, cpu_before, strict=True)]
    assert all(used > 0 for used in cpu_used), f"a worker served nothing: {cpu_used}"
    assert set(ports) == set(shared_lb.backend_ports)
    # per-worker counters would drift apart; one shared rotation keeps the spread within one
    assert max(ports.values()) - min(ports.values()) <= 1, ports


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "PURGE"])
def test_any_method_is_forwarded(shared_lb, method):
    assert echo(shared_lb, method)["method"] == method


def test_head_has_headers_and_no_body(shared_lb):
    response = requests.head(shared_lb.url + "/", timeout=10)
    assert response.status_code == 200 and response.content == b""
    assert response.headers["Content-Length"] == str(len(f"backend {shared_lb.backend_ports[0]}\n"))


@pytest.mark.parametrize("target", [
    "/echo/a%2Cb/%41%7e/c%2e?x=%41%zz&y=1+2&&z=%2F%2e%2e#",  # an encoded / or .. is a 400
    "/echo//double//slash?q=%c3%a9",
    "/echo/UPPER%3a%3A?",
])
def test_target_is_forwarded_byte_for_byte(shared_lb, target):
    raw = raw_request(shared_lb.port, f"GET {target.rstrip('#')} HTTP/1.1\r\nHost: x\r\n"
                      "Connection: close\r\n\r\n".encode())
    status, _, body = split_response(raw)
    assert status == 200
    assert json.loads(body)["target"] == target.rstrip("#")


def test_host_header_is_passed_through_and_forwarded_headers_are_set(shared_lb):
    doc = echo(shared_lb, headers={"Host": "shop.example:8443", "X-Forwarded-For": "203.0.113.7",
                                   "X-Forwarded-Proto": "https"})
    assert header(doc, "Host") == ["shop.example:8443"]
    assert header(doc, "X-Forwarded-For") == ["203.0.113.7, 127.0.0.1"]
    assert header(doc, "X-Forwarded-Proto") == ["http"]
    assert header(doc, "X-Forwarded-Host") == ["shop.example:8443"]
    assert header(doc, "X-Forwarded-Port") == [str(shared_lb.port)]


def test_request_id_is_kept_or_generated_and_returned(shared_lb):
    response = requests.get(shared_lb.url + "/echo", headers={"X-Request-ID": "trace-42"},
                            timeout=10)
    assert response.headers["X-Request-ID"] == "trace-42"
    assert header(response.json(), "X-Request-ID") == ["trace-42"]
    response = requests.get(shared_lb.url + "/echo", timeout=10)
    generated = response.headers["X-Request-ID"]
    assert len(generated) == 32 and header(response.json(), "X-Request-ID") == [generated]


def test_hop_by_hop_request_headers_are_removed(shared_lb):
    raw = raw_request(shared_lb.port, (
        b"GET /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\nConnection: X-Private\r\n"
        b"X-Private: secret\r\n"
        b"Keep-Alive: timeout=9\r\nTE: trailers\r\nUpgrade: websocket\r\nProxy-Authorization: "
        b"Basic eA==\r\nProxy-Connection: keep-alive\r\nX-Public: yes\r\n\r\n"))
    status, _, body = split_response(raw)
    names = {name.lower() for name, _ in json.loads(body)["headers"]}
    assert status == 200
    assert "x-public" in names
    for gone in ("x-private", "keep-alive", "te", "upgrade", "proxy-authorization",
                 "proxy-connection"):
        assert gone not in names
    assert not {"user-agent", "accept-encoding"} & names  # nothing added that was not sent


def test_response_hop_by_hop_removed_and_repeated_headers_kept(shared_lb):
    raw = raw_request(shared_lb.port,
                      b"GET /response-headers HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    status, headers, body = split_response(raw)
    assert status == 200 and body == b"headers\n"
    assert headers["set-cookie"] == ["a=1; Path=/", "b=2; Path=/"]
    assert headers["x-end-to-end"] == ["kept"]
    for gone in ("x-hop-test", "keep-alive", "proxy-authenticate", "upgrade"):
        assert gone not in headers
    assert headers["connection"] == ["close"]  # gunicorn's own, for the client hop


def test_content_length_upload_is_streamed_intact(shared_lb):
    body = bytes(range(256)) * (20 * 4096)  # 20 MiB
    doc = echo(shared_lb, "POST", data=body)
    assert doc["body_length"] == len(body)
    assert doc["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert header(doc, "Content-Length") == [str(len(body))]


def test_chunked_upload_is_streamed_intact(shared_lb):
    parts = [b"x" * 1000, b"y" * 70000, b"z"]
    doc = echo(shared_lb, "POST", data=iter(parts))  # a generator makes requests send chunked
    assert doc["body_length"] == sum(map(len, parts))
    assert doc["body_sha256"] == hashlib.sha256(b"".join(parts)).hexdigest()
    assert header(doc, "Transfer-Encoding") == ["chunked"]


@pytest.mark.parametrize("chunked", [False, True])
def test_downloads_arrive_whole_with_either_framing(shared_lb, chunked):
    size = 5 * 1024 * 1024 + 17
    response = requests.get(f"{shared_lb.url}/bytes/{size}{'?chunked=1' if chunked else ''}",
                            timeout=30)
    assert response.status_code == 200
    assert len(response.content) == size
    assert response.content[:512] == bytes(range(256)) * 2
    if chunked:
        assert response.headers.get("Transfer-Encoding") == "chunked"
    else:
        assert response.headers["Content-Length"] == str(size)


def test_status_codes_pass_through(shared_lb):
    for code in (201, 204, 301, 404, 418, 500, 503):
        response = requests.get(f"{shared_lb.url}/status/{code}", timeout=10,
                                allow_redirects=False)
        assert response.status_code == code


def test_client_keep_alive_reuses_one_connection(shared_lb):
    conn = http.client.HTTPConnection("127.0.0.1", shared_lb.port, timeout=10)
    local_ports = set()
    try:
        for _ in range(10):
            conn.request("GET", "/")
            response = conn.getresponse()
            assert response.status == 200 and response.read().startswith(b"backend ")
            assert response.getheader("Connection") == "keep-alive"
            local_ports.add(conn.sock.getsockname()[1])
    finally:
        conn.close()
    assert len(local_ports) == 1


def test_upstream_connections_are_reused(shared_lb):
    workers = workers_of(shared_lb)
    local_ports = set()
    with requests.Session() as session:
        for i in range(60):
            session.get(shared_lb.url + "/", timeout=10)
            if i % 6:
                continue
            for worker in workers:
                local_ports |= {c.laddr.port for c in worker.net_connections("tcp")
                                if c.raddr and c.raddr.port in shared_lb.backend_ports}
    # one kept-alive connection per worker and backend, not one per request
    assert 3 <= len(local_ports) <= 2 * 3, local_ports


def test_absolute_form_and_host_never_choose_the_destination(shared_lb):
    with socket.socket() as trap:  # where an open proxy would connect
        trap.bind(("127.0.0.1", 0))
        trap.listen()
        trap.settimeout(1.0)
        elsewhere = f"127.0.0.1:{trap.getsockname()[1]}"
        raw = raw_request(shared_lb.port, (
            f"GET http://{elsewhere}/echo?via=absolute HTTP/1.1\r\nHost: {elsewhere}\r\n"
            "Connection: close\r\n\r\n").encode())
        status, headers, body = split_response(raw)
        assert status == 200
        doc = json.loads(body)
        assert doc["port"] in shared_lb.backend_ports
        assert doc["target"] == "/echo?via=absolute"
        assert header(doc, "Host") == [elsewhere]
        response = requests.get(shared_lb.url + "/", headers={"Host": elsewhere}, timeout=10)
        assert int(response.headers["X-Backend-Port"]) in shared_lb.backend_ports
        with pytest.raises(TimeoutError):
            trap.accept()


def test_connect_method_is_refused(shared_lb):
    raw = raw_request(shared_lb.port,
                      b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n")
    assert split_response(raw)[0] in (400, 405)


def test_non_ascii_target_is_a_clean_400(shared_lb):
    raw = raw_request(shared_lb.port,
                      "GET /caf\u00e9 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    status, _, body = split_response(raw)
    assert status == 400
    assert b"Traceback" not in body


def lb_rss(lb) -> int:
    return sum(p.memory_info().rss for p in lb.tree())


@pytest.mark.slow
def test_one_gib_download_does_not_grow_lb_memory(shared_lb):
    size = 1024 ** 3
    requests.get(shared_lb.url + "/bytes/1048576", timeout=30)  # warm every code path once
    before = lb_rss(shared_lb)
    peak = before
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, lb_rss(shared_lb))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample)
    sampler.start()
    received = 0
    try:
        with requests.get(f"{shared_lb.url}/bytes/{size}", stream=True, timeout=60) as response:
            for block in response.iter_content(1024 * 1024):
                received += len(block)
    finally:
        done.set()
        sampler.join()
    assert received == size
    growth = (peak - before) / 2**20
    assert growth < 10, f"LB grew by {growth:.1f} MiB while streaming 1 GiB"
    worker_rss = [w.memory_info().rss / 2**20 for w in workers_of(shared_lb)]
    assert max(worker_rss) < 40, f"worker RSS after load: {worker_rss} MiB"


@pytest.mark.slow
def test_256_mib_upload_does_not_grow_lb_memory(shared_lb):
    size = 256 * 1024 ** 2
    block = b"u" * (1024 * 1024)
    before = lb_rss(shared_lb)

    def body():
        for _ in range(size // len(block)):
            yield block

    doc = echo(shared_lb, "POST", data=body(), timeout=60)
    assert doc["body_length"] == size
    growth = (lb_rss(shared_lb) - before) / 2**20
    assert growth < 10, f"LB grew by {growth:.1f} MiB while streaming 256 MiB up"


def test_a_head_split_over_two_reads_with_a_large_body_behind_it_is_relayed(lb_factory):
    """Loopback delivers a head in one read; a real network may not. The second part of the
    head comes with 100 KB of body in the same write: only head bytes count against the
    64 KiB head limit."""
    body = bytes(range(256)) * 400

    def answer(conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nConte")
        time.sleep(0.2)  # the LB reads the first part alone
        conn.sendall(b"nt-Length: %d\r\n\r\n%b" % (len(body), body))

    backend = RawBackend(answer)
    try:
        lb = lb_factory({"GOL7LB_BACKENDS": backends_env([backend.port])})
        response = requests.get(lb.url + "/", timeout=10)
        assert response.status_code == 200, response.text
        assert response.content == body
        assert "larger than" not in lb.output()
    finally:
        backend.close()
