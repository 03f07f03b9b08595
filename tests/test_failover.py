"""Failures: dead, slow, broken and black-holed backends; a killed supervisor."""

from __future__ import annotations

import os
import re
import resource
import signal
import socket
import threading
import time

import psutil
import pytest
import requests

from tests.conftest import FAST_HEALTH, backends_env
from tests.helpers import per_label, read_exactly, read_head
from tests.load import Load
from tests.procs import (
    alive_map,
    free_port,
    kill_once_checked,
    seconds_until,
    start_backend,
    wait_until,
    workers_of,
)
from tests.procs import lb_status as status


@pytest.mark.slow
def test_backend_killed_under_load_costs_no_request_and_leaves_and_rejoins(lb_factory,
                                                                           three_backends):
    lb = lb_factory({"GOL7LB_BACKENDS": backends_env([b.port for b in three_backends]),
                     **FAST_HEALTH})
    victim = three_backends[1]
    with Load(lb.url + "/") as load:
        time.sleep(1.0)
        victim.popen.kill()
        victim.popen.wait()
        # interval 0.2 x fall 2 + timeout 0.5 = 0.9 s, plus scheduling slack
        took = seconds_until(lambda: not alive_map(lb)[victim.port], timeout=5)
        time.sleep(1.0)
        served_before_restart = load.ok
    assert load.failures == [], load.failures[:5]
    assert load.ok > 50 and served_before_restart > 50
    assert took < 0.9 + 2.0
    restarted = start_backend(victim.port)
    try:
        back = seconds_until(lambda: alive_map(lb)[victim.port], timeout=5)
        assert back < 0.2 * 2 + 2.0  # interval x rise, plus slack
        ports = {int(requests.get(lb.url + "/", timeout=5).headers["X-Backend-Port"])
                 for _ in range(6)}
        assert victim.port in ports
    finally:
        restarted.stop()
        assert not restarted.leftovers()


def test_connect_failure_moves_to_the_next_backend_before_health_notices(lb_factory,
                                                                         three_backends):
    env = {"GOL7LB_BACKENDS": backends_env([b.port for b in three_backends]),
           "GOL7LB_HEALTH_INTERVAL": "60", "GOL7LB_PROXY_RETRIES": "2"}
    lb = lb_factory(env)
    wait_until(lambda: all(b["last_check"] is not None for b in status(lb)["backends"]), timeout=5)
    for backend in three_backends[:2]:
        backend.popen.kill()
        backend.popen.wait()
    served = [requests.get(lb.url + "/", timeout=10) for _ in range(12)]
    assert [r.status_code for r in served] == [200] * 12
    assert {int(r.headers["X-Backend-Port"]) for r in served} == {three_backends[2].port}
    assert all(alive_map(lb).values())  # health checks have not run again: retries did it
    # the access lines say what happened (written within 50 ms of the answer)
    wait_until(lambda: re.search(r"attempts=[23] flags=UF,URX ", lb.output()), timeout=5)


class Dropper:
    """A 'backend' that accepts, reads the request and closes without answering."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.requests = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(2)
                try:
                    if conn.recv(65536):
                        self.requests += 1
                except OSError:
                    pass

    def close(self) -> None:
        self.sock.close()


def test_backend_dropping_a_replayable_request_sends_it_to_the_next_one(lb_factory,
                                                                         backend_factory):
    good = backend_factory()
    dropper = Dropper()
    try:
        lb = lb_factory({"GOL7LB_BACKENDS": backends_env([dropper.port, good.port]),
                         "GOL7LB_HEALTH_INTERVAL": "60"})  # the TCP check passes: it accepts
        gets = [requests.get(lb.url + "/", headers={"Connection": "close"}, timeout=10)
                for _ in range(6)]
        assert [r.status_code for r in gets] == [200] * 6
        assert {r.text for r in gets} == {f"backend {good.port}\n"}
        assert dropper.requests >= 1  # it was tried, and the client never saw it fail
        # reset before answering, retried
        wait_until(lambda: "flags=UR,URX " in lb.output(), timeout=5)
    finally:
        dropper.close()


def test_retries_are_bounded(lb_factory, three_backends):
    env = {"GOL7LB_BACKENDS": backends_env([b.port for b in three_backends]),
           "GOL7LB_HEALTH_INTERVAL": "60", "GOL7LB_PROXY_RETRIES": "0"}
    lb = lb_factory(env)
    wait_until(lambda: all(b["last_check"] is not None for b in status(lb)["backends"]), timeout=5)
    three_backends[0].popen.kill()
    three_backends[0].popen.wait()
    codes = sorted(requests.get(lb.url + "/", headers={"Connection": "close"}, timeout=10)
                   .status_code for _ in range(6))
    assert 502 in codes and 200 in codes  # no retry: the dead one's turns fail


def test_no_healthy_backend_gives_503_with_retry_after(lb_factory):
    dead = [free_port(), free_port()]
    lb = lb_factory({"GOL7LB_BACKENDS": backends_env(dead), **FAST_HEALTH})
    wait_until(lambda: not any(alive_map(lb).values()), timeout=5)
    response = requests.get(lb.url + "/anything", timeout=10)
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "1"
    assert "no healthy backend" in response.text and "Traceback" not in response.text
    assert response.headers["X-Request-ID"]


def test_slow_backend_gives_504(lb_factory, backend_factory):
    backend = backend_factory()
    lb = lb_factory({"GOL7LB_BACKENDS": backends_env([backend.port]),
                     "GOL7LB_PROXY_READ_TIMEOUT": "1"})
    started = time.monotonic()
    response = requests.get(lb.url + "/sleep/5", timeout=10)
    assert response.status_code == 504
    assert time.monotonic() - started < 4
    assert requests.get(lb.url + "/", timeout=5).status_code == 200  # and it recovers
    wait_until(lambda: re.search(r'"GET /sleep/5" 504 \d+ .* attempts=1 flags=UT ',
                                 lb.output()), timeout=5)


def test_a_backend_that_stalls_mid_body_is_cut_at_read_timeout(lb_factory):
    """The backend sends its head and 3 of 100 bytes, then nothing: after read_timeout (a
    fraction of a second, which the kernel's socket timeout must honour too) the client is
    cut off, never handed a short body as complete."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    release = threading.Event()

    def stall(conn: socket.socket) -> None:
        with conn:
            conn.settimeout(10)
            try:
                if conn.recv(65536):  # health checks only connect
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nabc")
                    release.wait(10)
            except OSError:
                pass

    def accept() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=stall, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        port = listener.getsockname()[1]
        lb = lb_factory({"GOL7LB_BACKENDS": f"http://127.0.0.1:{port}",
                         "GOL7LB_PROXY_READ_TIMEOUT": "0.5"})
        started = time.monotonic()
        with socket.create_connection(("127.0.0.1", lb.port), timeout=10) as client:
            client.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = b""
            while chunk := client.recv(65536):  # until the LB closes
                answer += chunk
        took = time.monotonic() - started
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ") and b"Content-Length: 100" in head
        assert body == b"abc"  # 3 of the 100 bytes announced, then the close
        assert 0.4 < took < 3, took
        assert re.search(r"failed mid-response \(request \w+\): timed out", lb.output())
        assert "Traceback" not in lb.output()
    finally:
        release.set()
        listener.close()


@pytest.mark.parametrize("path", ["/drop", "/garbage"])
def test_broken_backend_answers_give_502_without_traceback(lb_factory, backend_factory, path):
    backend = backend_factory()
    lb = lb_factory({"GOL7LB_BACKENDS": backends_env([backend.port])})
    response = requests.get(lb.url + path, timeout=10)
    assert response.status_code == 502
    assert response.text == "502 Bad Gateway: bad gateway\n"
    assert requests.get(lb.url + "/", timeout=5).status_code == 200
    flag = {"/drop": "UR", "/garbage": "UPE"}[path]  # closed without answering; not HTTP
    wait_until(lambda: re.search(rf'"GET {path}" 502 .* backend=127.0.0.1:{backend.port} .* '
                                 rf"flags={flag} ", lb.output()), timeout=5)
    assert "Traceback" not in lb.output()


def test_backend_dying_mid_response_cuts_the_client_off(lb_factory, backend_factory):
    backend = backend_factory()
    lb = lb_factory({"GOL7LB_BACKENDS": backends_env([backend.port])})
    received = 0
    # never a silently short "complete" body: the client must see the break
    with pytest.raises(requests.RequestException), \
            requests.get(lb.url + f"/bytes/{4 * 1024**3}", stream=True, timeout=10) as r:
        assert r.status_code == 200
        for block in r.iter_content(1024 * 1024):
            received += len(block)
            if received >= 50 * 1024 * 1024 and backend.popen.poll() is None:
                backend.popen.kill()
    assert received < 4 * 1024**3
    assert "failed mid-response" in lb.output()
    assert "Traceback" not in lb.output()


def test_black_holed_backend_does_not_delay_the_others(lb_factory, three_backends):
    # A listener whose accept queue is full: further SYNs are dropped, so connects hang.
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(0)
    fillers = []
    try:
        for _ in range(3):
            f = socket.socket()
            f.setblocking(False)
            f.connect_ex(hole.getsockname())
            fillers.append(f)
        time.sleep(0.2)
        ports = [b.port for b in three_backends] + [hole.getsockname()[1]]
        lb = lb_factory({"GOL7LB_BACKENDS": backends_env(ports), "GOL7LB_HEALTH_INTERVAL": "0.2",
                         "GOL7LB_HEALTH_TIMEOUT": "2", "GOL7LB_PROXY_CONNECT_TIMEOUT": "0.5"})
        time.sleep(3.0)
        doc = status(lb)
        checks = {int(b["url"].rsplit(":", 1)[1]): b["checks"] for b in doc["backends"]}
        hole_checks = checks.pop(hole.getsockname()[1])
        assert hole_checks <= 2
        assert min(checks.values()) >= 8, checks  # ~15 expected at 0.2 s
        assert not alive_map(lb)[hole.getsockname()[1]]
    finally:
        for f in fillers:
            f.close()
        hole.close()


def supervisor_pids(lb) -> list[int]:
    """Supervisor PIDs in the order the master logged starting them."""
    return [int(m) for m in re.findall(r"started supervisor \(pid (\d+)\)", lb.output())]


@pytest.mark.slow
def test_killed_supervisor_is_restarted_and_traffic_is_unaffected(lb_factory, three_backends):
    lb = lb_factory({"GOL7LB_BACKENDS": backends_env([b.port for b in three_backends]),
                     **FAST_HEALTH})
    [first] = supervisor_pids(lb)
    assert first in {p.pid for p in psutil.Process(lb.pid).children()}
    with Load(lb.url + "/") as load:
        time.sleep(0.5)
        os.kill(first, signal.SIGKILL)
        took = seconds_until(lambda: len(supervisor_pids(lb)) == 2, timeout=10)
        time.sleep(0.5)
    assert took < 5
    assert load.failures == [] and load.ok > 20
    second = supervisor_pids(lb)[1]
    assert second in {p.pid for p in psutil.Process(lb.pid).children()}
    lb.tree()  # remember the new supervisor's PID for the leftover check
    # the new supervisor keeps checking: a stopped backend still leaves the rotation
    three_backends[0].popen.kill()
    three_backends[0].popen.wait()
    wait_until(lambda: not alive_map(lb)[three_backends[0].port], timeout=5)


def error_lines(lb) -> list[str]:
    return [line for line in lb.output().split("\n") if "[ERROR]" in line]


def test_failed_attempts_that_a_retry_saved_log_no_error(lb_factory, backend_factory):
    live, doomed = backend_factory(), backend_factory()
    lb = lb_factory({"GOL7LB_BACKENDS": backends_env([doomed.port, live.port]),
                     "GOL7LB_HEALTH_INTERVAL": "60"})
    dead = kill_once_checked(lb, doomed)
    answers = [requests.get(lb.url + "/", headers={"Connection": "close"}, timeout=10)
               for _ in range(20)]
    assert [a.status_code for a in answers] == [200] * 20
    # the access lines say what happened (written within 50 ms of the answer)
    wait_until(lambda: re.search(r"attempts=[23] flags=UF,URX ", lb.output()), timeout=5)
    assert not [line for line in error_lines(lb) if f":{dead}" in line]


def test_an_outage_logs_no_healthy_backend_once_not_per_request(lb_factory):
    lb = lb_factory({"GOL7LB_BACKENDS": backends_env([free_port(), free_port()]),
                     **FAST_HEALTH})
    wait_until(lambda: not any(alive_map(lb).values()), timeout=10)
    codes = [requests.get(lb.url + "/", headers={"Connection": "close"}, timeout=10).status_code
             for _ in range(30)]
    assert codes == [503] * 30
    logged = [line for line in lb.output().split("\n") if "no healthy backend" in line]
    assert 1 <= len(logged) <= 2, logged  # once per worker at most
    # and each backend's fall is logged once, by the supervisor that decides it
    assert sorted(line.split("backend ")[1].split()[0] for line in lb.output().split("\n")
                  if " is DOWN " in line) == sorted(b["id"] for b in status(lb)["backends"])


def worker_fds(lb) -> tuple[psutil.Process, int]:
    wait_until(lambda: len(workers_of(lb)) == 1, timeout=10)
    worker = workers_of(lb)[0]
    return worker, worker.num_fds()


def test_running_out_of_descriptors_is_the_lbs_error_not_the_backends(lb_factory,
                                                                     backend_factory):
    """The worker's own EMFILE when it opens a backend connection: 503 with Retry-After,
    no failure counted against the healthy backend, logged once, counted apart, and every
    request answered with a status line (the metrics files need descriptors too)."""
    backend = backend_factory()
    lb = lb_factory({"GOL7LB_BACKENDS": backends_env([backend.port]), "WEB_CONCURRENCY": "1"})
    worker, fds = worker_fds(lb)
    soft, hard = resource.prlimit(worker.pid, resource.RLIMIT_NOFILE)
    resource.prlimit(worker.pid, resource.RLIMIT_NOFILE, (fds + 8, hard))
    held: list[socket.socket] = []
    try:
        client = socket.create_connection(("127.0.0.1", lb.port), timeout=10)
        held.append(client)
        for _ in range(30):  # idle connections the worker accepts until it has no descriptor
            held.append(socket.create_connection(("127.0.0.1", lb.port), timeout=10))
        wait_until(lambda: worker.num_fds() >= fds + 8, timeout=10)
        for _ in range(3):
            client.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            head = read_head(client)
            assert head.endswith(b"\r\n\r\n"), f"closed without an answer after {head!r}"
            assert head.startswith(b"HTTP/1.1 503 "), head
            assert b"\r\nRetry-After: " in head
            length_field = re.search(rb"Content-Length: (\d+)", head)
            assert length_field, head
            length = int(length_field[1])
            assert len(read_exactly(client, length)) == length
    finally:
        for sock in held:
            sock.close()
        resource.prlimit(worker.pid, resource.RLIMIT_NOFILE, (soft, hard))
    assert requests.get(lb.url + "/", timeout=10).status_code == 200
    entry = next(b for b in status(lb)["backends"] if b["id"] == f"127.0.0.1:{backend.port}")
    assert entry["failures"] == 0 and entry["alive"]
    assert per_label(lb, "gol7lb_local_errors_total", "reason")["emfile"] == 3
    logged = [line for line in error_lines(lb) if "out of local resources" in line]
    assert len(logged) == 1 and "EMFILE" in logged[0], logged  # once for the episode
    wait_until(lambda: len(re.findall(r'"GET /" 503 .* attempts=1 flags=LR ', lb.output())) == 3,
               timeout=5)
