"""Start, serve, stop: graceful and quick shutdown, demo backends, admin, Procfile."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from typing import Any

import psutil
import pytest
import requests

from tests.conftest import FAST_HEALTH, backends_env
from tests.procs import (
    ROOT,
    Proc,
    backend_entry,
    free_port,
    port_closed,
    wait_for_port,
    wait_until,
    workers_of,
)

DEMO_PORTS = (8081, 8082, 8083)


def skip_if_demo_ports_taken() -> None:
    """The demo backends listen on fixed ports (8081-8083); something else on this machine
    holding one is no fault of the LB: the test is skipped, with the ports, instead of failing."""
    busy = [p for p in DEMO_PORTS if not port_closed(p)]
    if busy:
        pytest.skip(f"demo ports {busy} are taken by another program on this machine")


@pytest.mark.slow
@pytest.mark.stop_behaviour
def test_term_drains_in_flight_requests_refuses_new_ones_and_leaves_nothing(lb_factory,
                                                                            backend_factory):
    backend = backend_factory()
    lb = lb_factory({"GOL7LB_BACKENDS": backends_env([backend.port])})
    tree = lb.tree()
    assert len(tree) >= 5  # master, 2 workers, manager, supervisor, admin (+ resource tracker)
    result: dict[str, Any] = {}

    def slow_request() -> None:
        started = time.monotonic()
        response = requests.get(lb.url + "/sleep/4", timeout=30)
        result.update(status=response.status_code, body=response.text,
                      took=time.monotonic() - started)

    client = threading.Thread(target=slow_request)
    client.start()
    wait_until(lambda: backend_entry(lb, backend.port)["in_flight"] == 1)  # TERM finds it there
    lb.signal(signal.SIGTERM)
    refused_after = None
    started = time.monotonic()
    while time.monotonic() - started < 3:
        if port_closed(lb.port):
            refused_after = time.monotonic() - started
            break
        time.sleep(0.05)
    client.join(timeout=30)
    assert refused_after is not None and refused_after < 3, "new connections still accepted"
    assert result["status"] == 200 and result["body"] == "slept 4\n"
    assert 3.5 < result["took"] < 10
    assert lb.wait(timeout=30) == 0
    assert lb.leftovers() == []
    assert port_closed(lb.admin_port)
    assert "helpers stopped" in lb.output()


@pytest.mark.stop_behaviour
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGQUIT])
def test_int_and_quit_stop_quickly_and_leave_nothing(lb_factory, backend_factory, sig):
    backend = backend_factory()
    lb = lb_factory({"GOL7LB_BACKENDS": backends_env([backend.port])})
    outcome: list[str] = []

    def in_flight() -> None:
        try:
            outcome.append(str(requests.get(lb.url + "/sleep/20", timeout=30).status_code))
        except requests.ConnectionError:
            outcome.append("cut")

    client = threading.Thread(target=in_flight)
    client.start()
    # In flight for real: a request the stop refused would be "cut" too.
    wait_until(lambda: backend_entry(lb, backend.port)["in_flight"] == 1)
    lb.tree()
    started = time.monotonic()
    lb.signal(sig)
    lb.wait(timeout=15)
    assert time.monotonic() - started < 8  # not the 20 s request, not the 30 s graceful timeout
    client.join(timeout=10)
    assert outcome == ["cut"]  # a quick stop does not wait for in-flight requests
    assert lb.leftovers() == []


def test_demo_backends_start_serve_and_stop_with_the_lb(lb_factory):
    skip_if_demo_ports_taken()
    lb = lb_factory({})
    assert "started demo backends on 127.0.0.1:8081, 127.0.0.1:8082, 127.0.0.1:8083" in lb.output()
    seen = {requests.get(lb.url + "/", timeout=5).text for _ in range(3)}
    assert seen == {f"backend {p}\n" for p in DEMO_PORTS}
    demo = [p for p in lb.tree() if "backend" in p.cmdline()[1:3] or "-m" in p.cmdline()[1:2]
            and "backend" in p.cmdline()]
    assert len(demo) == 3
    lb.signal(signal.SIGTERM)
    assert lb.wait(timeout=30) == 0
    assert lb.leftovers() == []
    assert all(port_closed(p) for p in DEMO_PORTS)
    assert "stopped demo backends" in lb.output()


@pytest.mark.stop_behaviour
def test_ctrl_c_to_the_whole_process_group_leaves_nothing(lb_factory):
    """What a terminal does on Ctrl-C: SIGINT to every process of the foreground group."""
    skip_if_demo_ports_taken()
    lb = lb_factory({}, new_session=True)  # demo backends too
    assert requests.get(lb.url + "/", timeout=5).status_code == 200
    # A terminal's user presses Ctrl-C on a running LB, not one whose supervisor is still
    # importing (the lean worker answers before the spawned supervisor is up; a SIGINT in
    # the middle of its imports prints a KeyboardInterrupt traceback: see the issue 9 note).
    deadline = time.monotonic() + 10
    while not any(b.get("last_check") for b in
                  requests.get(lb.admin_url + "/status", timeout=5).json()["backends"]):
        assert time.monotonic() < deadline, "the supervisor never checked a backend"
        time.sleep(0.05)
    lb.tree()
    os.killpg(lb.pid, signal.SIGINT)
    assert lb.wait(timeout=15) == 0
    assert lb.leftovers() == []
    assert all(port_closed(p) for p in DEMO_PORTS)
    assert "Traceback" not in lb.output()
    assert "died" not in lb.output()  # helpers are stopped by the master, not by the group


def test_hup_reloads_workers_and_keeps_serving(lb_factory, backend_factory):
    backend = backend_factory()
    lb = lb_factory({"GOL7LB_BACKENDS": backends_env([backend.port])})
    before = {w.pid for w in workers_of(lb)}
    lb.signal(signal.SIGHUP)
    deadline = time.monotonic() + 15
    while True:
        after = {w.pid for w in workers_of(lb)}
        if len(after) == 2 and not after & before:
            break
        assert time.monotonic() < deadline, "workers were not replaced after HUP"
        time.sleep(0.1)
    time.sleep(0.5)
    for _ in range(4):
        assert requests.get(lb.url + "/", timeout=5).text == f"backend {backend.port}\n"
    assert "reload (SIGHUP): configuration generation 2" in lb.output()
    lb.tree()


def test_a_busy_demo_port_is_a_clear_start_error(lb_factory):
    import socket
    skip_if_demo_ports_taken()
    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", DEMO_PORTS[1]))
        squatter.listen()
        lb = lb_factory({}, ready=False)
        assert lb.wait(timeout=30) != 0
    assert "demo backend port 127.0.0.1:8082 is in use" in lb.output()
    assert "Traceback" not in lb.output()
    assert lb.leftovers() == []


def test_admin_healthz_and_status(lb_factory, three_backends):
    ports = [b.port for b in three_backends]
    lb = lb_factory({"GOL7LB_BACKENDS": f"http://127.0.0.1:{ports[0]} weight=3, "
                     + backends_env(ports[1:]), **FAST_HEALTH})
    healthz = requests.get(lb.admin_url + "/healthz", timeout=5)
    assert (healthz.status_code, healthz.text) == (200, "ok\n")
    deadline = time.monotonic() + 5
    while True:
        doc = requests.get(lb.admin_url + "/status", timeout=5).json()
        if all(b["last_check"] for b in doc["backends"]) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert doc["algorithm"] == "round_robin"
    assert [b["url"] for b in doc["backends"]] == [f"http://127.0.0.1:{p}" for p in ports]
    assert [b["weight"] for b in doc["backends"]] == [3, 1, 1]
    assert all(b["alive"] is True for b in doc["backends"])
    check = doc["backends"][0]["last_check"]
    assert check["ok"] is True and check["detail"] == "connected" and check["duration"] >= 0
    assert requests.get(lb.admin_url + "/nope", timeout=5).status_code == 404
    assert requests.post(lb.admin_url + "/status", timeout=5).status_code == 405
    three_backends[2].popen.kill()
    three_backends[2].popen.wait()
    deadline = time.monotonic() + 5
    while requests.get(lb.admin_url + "/status", timeout=5).json()["backends"][2]["alive"]:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    last = requests.get(lb.admin_url + "/status", timeout=5).json()["backends"][2]
    assert last["last_check"]["ok"] is False and "refused" in last["last_check"]["detail"].lower()


def test_admin_can_be_turned_off(lb_factory, backend_factory):
    backend = backend_factory()
    lb = lb_factory({"GOL7LB_BACKENDS": backends_env([backend.port]), "GOL7LB_ADMIN_BIND": ""})
    assert requests.get(lb.url + "/", timeout=5).status_code == 200
    assert "admin off" in lb.output()
    assert not any(c.status == psutil.CONN_LISTEN and c.laddr.port != lb.port
                   for p in lb.tree() for c in p.net_connections("tcp"))


def test_web_concurrency_sets_the_number_of_workers(lb_factory, backend_factory):
    backend = backend_factory()
    lb = lb_factory({"GOL7LB_BACKENDS": backends_env([backend.port]), "WEB_CONCURRENCY": "3"})
    deadline = time.monotonic() + 15  # the master forks them one by one
    while len(workers_of(lb)) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(workers_of(lb)) == 3
    listeners = {c.laddr for p in workers_of(lb) for c in p.net_connections("tcp")
                 if c.status == psutil.CONN_LISTEN}
    assert {(a.ip, a.port) for a in listeners} == {("0.0.0.0", lb.port)}


@pytest.mark.parametrize("mode", ["auto", "off"])
def test_cpu_affinity_pins_each_worker_to_its_own_cpu_or_not(lb_factory, backend_factory, mode):
    backend = backend_factory()
    lb = lb_factory({"GOL7LB_BACKENDS": backends_env([backend.port]),
                     "GOL7LB_CPU_AFFINITY": mode})
    allowed = sorted(os.sched_getaffinity(0))
    pinned = [w.cpu_affinity() for w in workers_of(lb)]
    assert len(pinned) == 2
    if mode == "off":
        assert all(sorted(cpus) == allowed for cpus in pinned)
    else:
        assert all(len(cpus) == 1 for cpus in pinned)
        if len(allowed) >= 2:
            assert pinned[0] != pinned[1]
    assert psutil.Process(lb.pid).cpu_affinity() == allowed  # the master is never pinned
    assert requests.get(lb.url + "/", timeout=5).status_code == 200


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs to tell apart")
def test_a_replacement_worker_takes_the_cpu_of_the_one_it_replaces(lb_factory,
                                                                   backend_factory):
    """Pinning follows the worker's slot, not its age: killing the worker on the first CPU
    must not put its replacement beside the survivor."""
    backend = backend_factory()
    lb = lb_factory({"GOL7LB_BACKENDS": backends_env([backend.port])})
    deadline = time.monotonic() + 15
    while len(workers_of(lb)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    before = {w.pid: w.cpu_affinity() for w in workers_of(lb)}
    victim = min(before, key=lambda pid: before[pid])
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 15
    while True:
        now = {w.pid: w.cpu_affinity() for w in workers_of(lb) if w.pid != victim}
        if len(now) == 2:
            break
        assert time.monotonic() < deadline, "the killed worker was not replaced"
        time.sleep(0.05)
    assert sorted(map(tuple, now.values())) == sorted(map(tuple, before.values()))
    assert requests.get(lb.url + "/", timeout=5).status_code == 200


def test_toml_config_file_is_used(lb_factory, backend_factory, tmp_path):
    backend = backend_factory()
    config = tmp_path / "lb.toml"
    config.write_text(f'algorithm = "random"\n[[backends]]\nurl = "http://127.0.0.1:{backend.port}"'
                      '\nweight = 2\n[health]\ninterval = 0.5\n')
    lb = lb_factory({"GOL7LB_CONFIG": str(config)})
    doc = requests.get(lb.admin_url + "/status", timeout=5).json()
    assert doc["algorithm"] == "random" and doc["health"]["interval"] == 0.5
    assert doc["backends"][0]["weight"] == 2
    assert requests.get(lb.url + "/", timeout=5).text == f"backend {backend.port}\n"


def test_procfile_runs_under_honcho(backend_factory, tmp_path):
    backend = backend_factory()
    port = free_port()
    honcho = Proc([sys.executable, "-m", "honcho", "start", "-p", str(port), "web"],
                  env={"GOL7LB_BACKENDS": backends_env([backend.port]),
                       "GOL7LB_ADMIN_BIND": "", "GUNICORN_CMD_ARGS": "--no-control-socket"},
                  cwd=ROOT, log=tmp_path / "honcho.log")
    try:
        wait_for_port(port, timeout=30)
        time.sleep(0.3)
        assert requests.get(f"http://127.0.0.1:{port}/", timeout=5).text == \
            f"backend {backend.port}\n"
        honcho.tree()
    finally:
        honcho.stop()
    assert honcho.leftovers() == []
    log = (tmp_path / "honcho.log").read_text()
    assert "helpers stopped" in log
    assert "died" not in log and "restarting" not in log and "Traceback" not in log


def wait_for_new_workers(lb, before: set[int], count: int = 2) -> set[int]:
    """Until `count` workers run and none of them is one of `before`."""
    def replaced() -> set[int] | None:
        after = {w.pid for w in workers_of(lb)}
        return after if len(after) == count and not after & before else None
    return wait_until(replaced, timeout=20)


@pytest.mark.slow
@pytest.mark.lean_worker
def test_hup_never_drops_a_request_on_a_kept_alive_connection(lb_factory, backend_factory):
    """Issue 14: busy keep-alive clients and repeated SIGHUPs gave RemoteDisconnected. A worker
    that stops answers the next request on a kept-alive connection with Connection: close and
    closes only connections that stay idle."""
    backend = backend_factory()
    lb = lb_factory({"GOL7LB_BACKENDS": backends_env([backend.port]),
                     "GOL7LB_RELOAD_WATCH": "false"})
    stop = threading.Event()
    failures: list[str] = []
    done = [0]

    def client() -> None:
        with requests.Session() as session:
            while not stop.is_set():
                try:
                    response = session.get(lb.url + "/", timeout=10)
                    if response.status_code != 200:
                        failures.append(f"status {response.status_code}")
                    done[0] += 1
                except requests.RequestException as e:
                    failures.append(repr(e))

    clients = [threading.Thread(target=client) for _ in range(12)]
    for t in clients:
        t.start()
    try:
        for _ in range(5):
            before = {w.pid for w in workers_of(lb)}
            lb.signal(signal.SIGHUP)
            wait_for_new_workers(lb, before)
            time.sleep(0.5)  # the old workers drain under load
    finally:
        stop.set()
        for t in clients:
            t.join(timeout=30)
    print(f"{done[0]} requests, {len(failures)} failed")
    assert done[0] > 500
    assert failures == []


@pytest.mark.lean_worker
def test_workers_started_after_hup_enforce_the_new_client_limits(lb_factory, backend_factory,
                                                                 tmp_path):
    """Issue 14: client-edge limits are read by each worker when it starts; after a SIGHUP the
    new workers took the master's start-up values instead of the reloaded ones."""
    import socket

    backend = backend_factory()
    config = tmp_path / "lb.toml"

    def write(max_headers: int, body_timeout: float) -> None:
        config.write_text(f'[[backends]]\nurl = "http://127.0.0.1:{backend.port}"\n'
                          f"[proxy]\nmax_headers = {max_headers}\n"
                          f"client_body_timeout = {body_timeout}\n[reload]\nwatch = false\n")

    def status_of(raw: bytes) -> bytes:
        with socket.create_connection(("127.0.0.1", lb.port), timeout=10) as s:
            s.sendall(raw)
            return s.recv(4096)[:12]

    many = b"GET / HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(20)) \
        + b"Connection: close\r\n\r\n"
    stalled = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc"
    write(100, 30.0)
    lb = lb_factory({"GOL7LB_CONFIG": str(config)})
    assert status_of(many) == b"HTTP/1.1 200"
    write(10, 1.0)
    before = {w.pid for w in workers_of(lb)}
    lb.signal(signal.SIGHUP)
    wait_for_new_workers(lb, before)
    wait_until(lambda: "configuration generation 2" in lb.output())
    assert status_of(many) == b"HTTP/1.1 431"
    started = time.monotonic()
    assert status_of(stalled) == b"HTTP/1.1 408"
    assert time.monotonic() - started < 5


def test_a_draining_worker_survives_threads_closing_connections_meanwhile():
    """Issue 14: the drain iterated the live connection table while pool threads deleted
    from it (`dictionary changed size during iteration`), cutting the worker's requests."""
    import logging
    import select
    import socket

    from gunicorn.config import Config

    from gol7lb.http1 import Http1Parser
    from gol7lb.serve import Conn
    from gol7lb.worker import ProxyWorker

    cfg = Config()
    cfg.set("graceful_timeout", 1)
    worker = ProxyWorker(1, os.getpid(), [], None, 30, cfg, logging.getLogger("test"))
    pairs = [socket.socketpair() for _ in range(200)]
    for server, _client in pairs:
        conn = Conn(server, ("", ""), ("", ""), Http1Parser(), time.monotonic() + 60)
        worker.conns[conn.fd] = conn  # each served by a thread (not waiting)
        worker.active.add(conn)
    stop = threading.Event()

    def churn() -> None:  # what pool threads do: connections come and go
        conns = list(worker.conns.values())
        while not stop.is_set():
            for conn in conns[::2]:
                worker.conns.pop(conn.fd, None)
            for conn in conns[::2]:
                worker.conns[conn.fd] = conn

    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    churner = threading.Thread(target=churn)
    churner.start()
    epoll = select.epoll()
    busy, other = socket.socketpair()  # always readable, and no connection of the worker's:
    other.send(b"x")  # the drain loop goes round without waiting (many chances for the race)
    epoll.register(busy.fileno(), select.EPOLLIN)
    try:
        worker._drain(epoll)  # waits for the served connections until graceful_timeout
    finally:
        stop.set()
        churner.join()
        sys.setswitchinterval(switch)
        busy.close()
        other.close()
        for server, client in pairs:
            server.close()
            client.close()
