"""Slow and idle clients hold no thread: 1,000 connections trickling a head one byte a second
do not delay a normal request, and get 408; 2,000 idle keep-alive connections are held by the
event loop, not by threads."""

from __future__ import annotations

import contextlib
import resource
import select
import socket
import statistics
import threading
import time

import psutil
import pytest
import requests

from tests.conftest import backends_env
from tests.procs import wait_until, workers_of

pytestmark = [pytest.mark.lean_worker, pytest.mark.slow]

THREADS = 8  # per worker: far fewer than the connections held


def raise_fd_limit(wanted: int) -> None:
    """The test and the LB it starts (which inherits the limit) hold thousands of sockets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        if hard != resource.RLIM_INFINITY and hard < wanted:
            pytest.skip(f"file-descriptor hard limit {hard} < {wanted}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def latencies(url: str, n: int = 20) -> list[float]:
    """n requests, each on a new connection, one after the other."""
    out = []
    for _ in range(n):
        started = time.monotonic()
        response = requests.get(url, headers={"Connection": "close"}, timeout=10)
        out.append(time.monotonic() - started)
        assert response.status_code == 200
    return out


def assert_not_delayed(baseline: list[float], during: list[float]) -> None:
    """Tens of milliseconds at most, with a margin for a loaded 2-core machine."""
    print(f"baseline {statistics.median(baseline) * 1000:.1f} ms, during "
          f"{statistics.median(during) * 1000:.1f} ms (max {max(during) * 1000:.1f} ms)")
    slower = statistics.median(during) - statistics.median(baseline)
    assert slower < 0.05, f"median {slower * 1000:.1f} ms slower (baseline {baseline}, " \
                          f"during {during})"
    assert max(during) < 0.5, during


def open_many(port: int, n: int) -> list[socket.socket]:
    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        socks.append(s)
    return socks


def test_a_thousand_trickling_heads_do_not_delay_a_normal_request_and_get_408(
        lb_factory, backend_factory):
    raise_fd_limit(8192)
    header_timeout = 5.0
    backend = backend_factory()
    lb = lb_factory({"GOL7LB_BACKENDS": backends_env([backend.port]),
                     "GOL7LB_PROXY_CLIENT_HEADER_TIMEOUT": str(header_timeout)},
                    extra_args=("--threads", str(THREADS)))
    latencies(lb.url + "/", 5)  # warm up
    baseline = latencies(lb.url + "/")

    head = b"GET /slow HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 1000
    socks = open_many(lb.port, 1000)
    opened = time.monotonic()
    stop = threading.Event()

    def trickle() -> None:
        i = 0
        while not stop.is_set() and i < len(head):
            for s in socks:
                with contextlib.suppress(OSError):
                    s.send(head[i:i + 1])
            i += 1
            stop.wait(1.0)

    trickler = threading.Thread(target=trickle)
    trickler.start()
    try:
        time.sleep(1.5)  # a couple of bytes on every connection
        during = latencies(lb.url + "/")
    finally:
        stop.set()
        trickler.join()
    assert_not_delayed(baseline, during)
    # each worker kept its few threads
    for worker in workers_of(lb):
        assert worker.num_threads() <= THREADS + 3

    # every trickling connection gets 408 and a close, about header_timeout after it opened
    answers: dict[socket.socket, bytes] = {s: b"" for s in socks}
    by_fd = {s.fileno(): s for s in socks}
    poller = select.poll()  # not select(): these descriptors may be above 1024
    for fd in by_fd:
        poller.register(fd, select.POLLIN)
    open_socks = set(socks)
    deadline = opened + header_timeout + 5
    while open_socks and time.monotonic() < deadline:
        for fd, _event in poller.poll(500):
            s = by_fd[fd]
            try:
                data = s.recv(4096)
            except OSError:
                data = b""
            answers[s] += data
            if not data:
                open_socks.discard(s)
                poller.unregister(fd)
    closed_at = time.monotonic() - opened
    for s in socks:
        s.close()
    assert not open_socks, f"{len(open_socks)} slow connections still open after {closed_at:.1f}s"
    with_408 = sum(a.startswith(b"HTTP/1.1 408 ") for a in answers.values())
    assert with_408 == len(socks)


def test_two_thousand_idle_keep_alive_connections_hold_no_threads(lb_factory, backend_factory):
    raise_fd_limit(8192)
    backend = backend_factory()
    lb = lb_factory({"GOL7LB_BACKENDS": backends_env([backend.port])},
                    extra_args=("--threads", str(THREADS), "--worker-connections", "4000"))
    socks = open_many(lb.port, 2000)
    try:
        for s in socks:
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        for s in socks:
            data = b""
            while not data.endswith(b"\n") or b"\r\n\r\n" not in data:
                chunk = s.recv(4096)
                assert chunk, "an idle keep-alive connection was closed"
                data += chunk
            assert data.startswith(b"HTTP/1.1 200 ") and b"Connection: keep-alive" in data
        # all 2,000 are now idle and open
        held = sum(len([c for c in w.net_connections("tcp")
                        if c.status == psutil.CONN_ESTABLISHED and c.laddr.port == lb.port])
                   for w in workers_of(lb))
        assert held >= 2000
        for worker in workers_of(lb):
            assert worker.num_threads() <= THREADS + 3
        during = latencies(lb.url + "/")
        assert statistics.median(during) < 0.05 and max(during) < 0.5, during
        # and they are still usable
        for s in socks[::100]:
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert s.recv(4096).startswith(b"HTTP/1.1 200 ")
    finally:
        for s in socks:
            s.close()


def test_running_out_of_descriptors_pauses_accepting_instead_of_spinning(lb_factory,
                                                                         backend_factory):
    backend = backend_factory()
    lb = lb_factory({"GOL7LB_BACKENDS": backends_env([backend.port]), "WEB_CONCURRENCY": "1"},
                    extra_args=("--threads", "2"))
    assert requests.get(lb.url + "/", timeout=5).status_code == 200
    (worker,) = workers_of(lb)
    worker.rlimit(psutil.RLIMIT_NOFILE, (worker.num_fds() + 10, worker.num_fds() + 10))
    socks = open_many(lb.port, 40)  # the kernel completes them all; the worker cannot take them
    try:
        deadline = time.monotonic() + 10
        while "accept failed" not in lb.output():
            assert time.monotonic() < deadline, "the worker never ran out of descriptors"
            time.sleep(0.05)
        cpu = worker.cpu_times()
        time.sleep(1.0)  # measuring a spin needs a duration
        after = worker.cpu_times()
        assert (after.user + after.system) - (cpu.user + cpu.system) < 0.3  # no busy loop
        out = lb.output()  # once per episode (an fd freed meanwhile ends one), not per pause
        assert out.count("accept failed") == out.count("accepting again after") + 1
    finally:
        for s in socks:
            s.close()
    deadline = time.monotonic() + 15
    while True:  # once the descriptors are back, it serves again
        try:
            if requests.get(lb.url + "/", timeout=2).status_code == 200:
                break
        except requests.RequestException:
            pass
        assert time.monotonic() < deadline, "the worker did not recover"
        time.sleep(0.1)
    assert "accepting again after" in lb.output()


def post_head(length: int, path: str = "/echo") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
            f"Content-Length: {length}\r\n\r\n").encode()


def read_until_closed(sock: socket.socket, timeout: float) -> tuple[bytes, float]:
    """Everything the LB sends until it closes, and how long that took."""
    started = time.monotonic()
    sock.settimeout(timeout)
    data = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            data += chunk
    return data, time.monotonic() - started


def test_a_thousand_trickling_bodies_do_not_delay_a_normal_request(lb_factory, backend_factory):
    """Issue 14: 200 clients sending a POST body one byte a second held every pool thread, and
    the LB answered nothing else. The loop now buffers a body before a thread takes it."""
    raise_fd_limit(8192)
    backend = backend_factory()
    lb = lb_factory({"GOL7LB_BACKENDS": backends_env([backend.port])},
                    extra_args=("--threads", str(THREADS), "--worker-connections", "4000"))
    latencies(lb.url + "/", 5)  # warm up
    baseline = latencies(lb.url + "/")
    socks = open_many(lb.port, 1000)
    stop = threading.Event()

    def trickle() -> None:
        for s in socks:
            with contextlib.suppress(OSError):
                s.sendall(post_head(100000))
        while not stop.wait(1.0):
            for s in socks:
                with contextlib.suppress(OSError):
                    s.send(b"x")

    trickler = threading.Thread(target=trickle)
    trickler.start()
    try:
        time.sleep(1.5)  # every head is in and a byte or two of each body
        during = latencies(lb.url + "/")
        for worker in workers_of(lb):
            assert worker.num_threads() <= THREADS + 3
    finally:
        stop.set()
        trickler.join()
        for s in socks:
            s.close()
    assert_not_delayed(baseline, during)


def test_bodies_that_stall_on_their_threads_do_not_starve_the_pool(lb_factory, backend_factory):
    """Bodies larger than proxy.retry_buffer are streamed on a thread; one that must wait for
    its client lends itself out (a replacement joins the pool), so others are still served."""
    backend = backend_factory()
    lb = lb_factory({"GOL7LB_BACKENDS": backends_env([backend.port]), "WEB_CONCURRENCY": "1"},
                    extra_args=("--threads", "4"))
    latencies(lb.url + "/", 5)  # the backend is up (and the pool's threads all started)
    (worker,) = workers_of(lb)
    pooled = worker.num_threads()
    socks = open_many(lb.port, 40)
    try:
        for s in socks:
            s.sendall(post_head(200000) + b"y" * 70000)  # past the loop's buffer: on a thread
        wait_until(lambda: worker.num_threads() >= pooled + 40, timeout=20)
        during = latencies(lb.url + "/")
        assert statistics.median(during) < 0.1 and max(during) < 1.0, during
    finally:
        for s in socks:
            s.close()
    # the lent threads end with their requests: the pool is back to its size (give or take
    # a helper thread of the proxy's own, started on the first broken-off body)
    wait_until(lambda: worker.num_threads() <= pooled + 2, timeout=20)


@pytest.mark.parametrize("sent, length", [(3, 10), (70000, 200000)],
                         ids=["buffered-by-the-loop", "streamed-on-a-thread"])
def test_a_body_that_stalls_longer_than_client_body_timeout_gets_408_and_a_close(
        lb_factory, backend_factory, sent, length):
    backend = backend_factory()
    lb = lb_factory({"GOL7LB_BACKENDS": backends_env([backend.port]),
                     "GOL7LB_PROXY_CLIENT_BODY_TIMEOUT": "1"})
    with socket.create_connection(("127.0.0.1", lb.port), timeout=10) as s:
        s.sendall(post_head(length) + b"z" * sent)
        answer, took = read_until_closed(s, 10)
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
    assert b"Connection: close" in answer.partition(b"\r\n\r\n")[0]
    assert 0.9 < took < 3.0, took
    if sent > 65536:  # the proxy read the body: its access line says what the client got
        wait_until(lambda: '"POST /echo" 408 ' in lb.output(), timeout=5)


@pytest.mark.parametrize("first, length", [(0, 3000), (70000, 72000)],
                         ids=["buffered-by-the-loop", "streamed-on-a-thread"])
def test_a_body_trickling_within_client_body_timeout_is_proxied_intact(
        lb_factory, backend_factory, first, length):
    import hashlib
    import json

    backend = backend_factory()
    lb = lb_factory({"GOL7LB_BACKENDS": backends_env([backend.port]),
                     "GOL7LB_PROXY_CLIENT_BODY_TIMEOUT": "1"})
    body = bytes(range(256)) * (length // 256) + b"e" * (length % 256)
    pieces = [body[:first]] + [body[i:i + 400] for i in range(first, length, 400)]
    with socket.create_connection(("127.0.0.1", lb.port), timeout=10) as s:
        s.sendall(post_head(length) + pieces[0])
        for piece in pieces[1:]:
            time.sleep(0.4)  # the trickle itself: 0.4 s between reads, 2 s in all
            s.sendall(piece)
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer, _ = read_until_closed(s, 10)
    head, _, rest = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), answer[:300]
    doc = json.loads(rest.split(b"\n", 1)[0])
    assert doc["body_length"] == length
    assert doc["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert b"backend " in rest  # and the connection served its next request


def test_worker_connections_caps_what_one_worker_holds(lb_factory, backend_factory):
    """gunicorn's worker_connections: at the cap a worker stops accepting; below it, resumes."""
    backend = backend_factory()
    lb = lb_factory({"GOL7LB_BACKENDS": backends_env([backend.port]), "WEB_CONCURRENCY": "1",
                     "GOL7LB_ADMIN_BIND": ""},
                    extra_args=("--worker-connections", "5"))
    held = open_many(lb.port, 5)
    for s in held:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert s.recv(4096).startswith(b"HTTP/1.1 200 ")
    with socket.create_connection(("127.0.0.1", lb.port), timeout=10) as extra:
        extra.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        extra.settimeout(1.0)
        with pytest.raises(TimeoutError):
            extra.recv(4096)  # the kernel queued it; the worker does not take it
        held.pop().close()
        extra.settimeout(5.0)
        assert extra.recv(4096).startswith(b"HTTP/1.1 200 ")
    for s in held:
        s.close()
