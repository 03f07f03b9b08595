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
from tests.test_lifecycle import workers_of

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
    print(f"baseline {statistics.median(baseline) * 1000:.1f} ms, during "
          f"{statistics.median(during) * 1000:.1f} ms (max {max(during) * 1000:.1f} ms)")
    slower = statistics.median(during) - statistics.median(baseline)
    assert slower < 0.05, f"median {slower * 1000:.1f} ms slower (baseline {baseline}, " \
                          f"during {during})"
    assert max(during) < 0.5, during
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
                    extra_args=("--threads", str(THREADS)))
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
