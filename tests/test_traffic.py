"""Traffic management through real gunicorn workers: policies, sticky sessions, retries,
passive health, connection limits with a queue, slow start, a frozen backend."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter

import pytest
import requests

from tests.conftest import FAST_HEALTH
from tests.helpers import config, port_of
from tests.load import Load
from tests.procs import backend_entry as entry
from tests.procs import lb_status as status
from tests.procs import wait_until


def backends_toml(ports: list[int], extra: str = "", weights: list[int] | None = None) -> str:
    weights = weights or [1] * len(ports)
    return "".join(f'[[backends]]\nurl = "http://127.0.0.1:{p}"\nweight = {w}\n{extra}'
                   for p, w in zip(ports, weights, strict=True))


def get(lb, path: str = "/", **kwargs) -> requests.Response:
    return requests.get(lb.url + path, timeout=10, **kwargs)


@pytest.mark.parametrize("algorithm", ["round_robin", "random", "least_connections",
                                       "power_of_two", "consistent_hash"])
def test_every_policy_serves_through_real_workers(lb_factory, three_backends, tmp_path,
                                                  algorithm):
    ports = [b.port for b in three_backends]
    lb = lb_factory({**config(tmp_path, f'algorithm = "{algorithm}"\nhash_key = "path"\n'
                                        + backends_toml(ports)), **FAST_HEALTH})
    served = Counter(port_of(get(lb, f"/?n={i}", headers={"Connection": "close"}))
                     for i in range(60))
    assert set(served) <= set(ports)
    if algorithm == "consistent_hash":  # hash_key = path: one path, one backend, always
        assert len({port_of(get(lb, "/same")) for _ in range(10)}) == 1
    else:
        assert all(served[p] >= 8 for p in ports), served
    assert status(lb)["pools"]["default"]["algorithm"] == algorithm


def test_least_connections_steers_away_from_a_busy_backend(lb_factory, three_backends,
                                                           tmp_path):
    ports = [b.port for b in three_backends]
    lb = lb_factory({**config(tmp_path, 'algorithm = "least_connections"\n'
                                        + backends_toml(ports)), **FAST_HEALTH})
    slow = []

    def hold() -> None:
        slow.append(port_of(get(lb, "/sleep/3")))  # held while the 6 below are sent

    holders = [threading.Thread(target=hold) for _ in range(4)]
    for count, t in enumerate(holders, 1):
        t.start()  # each one in flight before the next is sent: each one sees the last
        wait_until(lambda n=count: sum(e["in_flight"] for e in status(lb)["backends"]) == n)
    loads = {e["id"]: e["in_flight"] for e in status(lb)["backends"]}
    assert sorted(loads.values()) == [1, 1, 2]  # the 4 slow ones spread too
    least = {k for k, v in loads.items() if v == 1}
    answers = Counter(f"127.0.0.1:{port_of(get(lb))}" for _ in range(6))
    for t in holders:
        t.join()
    assert set(answers) <= least, (answers, loads)  # never the busiest one


def test_consistent_hash_keys_stay_and_a_down_backends_keys_come_back(lb_factory,
                                                                      backend_factory,
                                                                      tmp_path):
    backends = [backend_factory() for _ in range(3)]
    ports = [b.port for b in backends]
    lb = lb_factory({**config(tmp_path, 'algorithm = "consistent_hash"\n'
                                        'hash_key = "header:X-User"\n' + backends_toml(ports)),
                     **FAST_HEALTH})
    users = [f"user-{i}" for i in range(40)]
    first = {u: port_of(get(lb, headers={"X-User": u, "Connection": "close"})) for u in users}
    assert len(set(first.values())) == 3
    again = {u: port_of(get(lb, headers={"X-User": u})) for u in users}
    assert again == first  # the same key, the same backend, whichever worker
    victim = backends[0]
    victim.popen.kill()
    victim.popen.wait()
    wait_until(lambda: not entry(lb, victim.port)["alive"], timeout=10)
    moved = {u: port_of(get(lb, headers={"X-User": u})) for u in users}
    for user, port in first.items():
        if port != victim.port:
            assert moved[user] == port  # only the down backend's keys move
        else:
            assert moved[user] != victim.port
    from tests.procs import start_backend
    back = start_backend(victim.port)
    try:
        wait_until(lambda: entry(lb, victim.port)["alive"], timeout=10)
        assert {u: port_of(get(lb, headers={"X-User": u})) for u in users} == first
    finally:
        back.stop()


def test_sticky_cookie_pins_a_client_and_resticks_when_its_backend_drains(lb_factory,
                                                                          three_backends,
                                                                          tmp_path):
    ports = [b.port for b in three_backends]
    lb = lb_factory({**config(tmp_path, 'sticky_cookie = "lb"\n' + backends_toml(ports)),
                     **FAST_HEALTH})
    session = requests.Session()
    first = session.get(lb.url + "/", timeout=5)
    cookie = first.headers["Set-Cookie"]
    assert cookie.startswith("lb=") and "Path=/" in cookie and "HttpOnly" in cookie
    assert "SameSite=Lax" in cookie
    value = session.cookies["lb"]
    assert value is not None
    assert str(port_of(first)) not in value and "127.0.0.1" not in value  # opaque
    pinned = port_of(first)
    for _ in range(10):
        answer = session.get(lb.url + "/", timeout=5)
        assert port_of(answer) == pinned
        assert "Set-Cookie" not in answer.headers  # already stuck: nothing to set
    requests.post(f"{lb.admin_url}/backends/127.0.0.1:{pinned}/drain", timeout=5)
    moved = session.get(lb.url + "/", timeout=5)
    assert port_of(moved) != pinned and moved.headers["Set-Cookie"].startswith("lb=")
    new = port_of(moved)
    assert all(port_of(session.get(lb.url + "/", timeout=5)) == new for _ in range(5))
    # The same backend gets the same value from another client (no per-client state).
    other = requests.Session()
    while port_of(answer := other.get(lb.url + "/", timeout=5)) != new:
        other.cookies.clear()
    assert other.cookies["lb"] == session.cookies["lb"]
    assert answer is not None


def test_a_dead_backend_spreads_its_share_over_the_others_until_checks_catch_it(
        lb_factory, three_backends, tmp_path):
    ports = [b.port for b in three_backends]
    lb = lb_factory(config(tmp_path, backends_toml(ports) + "[health]\ninterval = 60.0\n"))
    wait_until(lambda: all(e["last_check"] for e in status(lb)["backends"]))
    three_backends[0].popen.kill()
    three_backends[0].popen.wait()
    served = Counter(port_of(get(lb, headers={"Connection": "close"})) for _ in range(30))
    assert sum(served.values()) == 30 and ports[0] not in served
    assert abs(served[ports[1]] - served[ports[2]]) <= 4, served  # not 20/10


def test_retry_on_503_buffers_a_small_body_and_never_retries_a_streamed_one(
        lb_factory, backend_factory, tmp_path):
    good, bad = backend_factory(), backend_factory()
    # The "bad" backend answers 503 for /status/503; the good one as well, so route by
    # weight: only `bad` is tried first for half the requests. Use the echo of the good one.
    text = (f'[[backends]]\nurl = "http://127.0.0.1:{bad.port}"\n'
            f'[[backends]]\nurl = "http://127.0.0.1:{good.port}"\n'
            '[proxy]\nretry_on = ["connect-failure", "503"]\nretry_buffer = 1024\n')
    lb = lb_factory({**config(tmp_path, text), **FAST_HEALTH})
    # /status/503 answers 503 everywhere: a retried request ends with the last backend's 503,
    # after both were tried (the retry metric counts it).
    answer = requests.request("GET", lb.url + "/status/503", data=b"x" * 100, timeout=10)
    assert answer.status_code == 503
    metrics = requests.get(lb.admin_url + "/metrics", timeout=5).text
    assert "gol7lb_retries_total" in metrics
    # A body larger than retry_buffer is streamed and never sent twice.
    big = b"y" * 5000
    answer = requests.request("GET", lb.url + "/status/503", data=big, timeout=10)
    assert answer.status_code == 503
    rid = answer.headers["X-Request-ID"]  # its access line is written within 50 ms
    log = wait_until(lambda: rid in lb.output() and lb.output(), timeout=5)
    retried = [line for line in log.splitlines() if "attempts=2 flags=U5,URX " in line]
    assert len(retried) == 1, retried


@pytest.mark.slow
def test_passive_health_ejects_from_every_worker_then_lets_it_back(lb_factory,
                                                                   backend_factory, tmp_path):
    good, flaky = backend_factory(), backend_factory()
    text = (f'[[backends]]\nurl = "http://127.0.0.1:{good.port}"\n'
            f'[[backends]]\nurl = "http://127.0.0.1:{flaky.port}"\n'
            "[health]\ninterval = 60.0\npassive_fails = 3\npassive_window = 10.0\n"
            "passive_cooldown = 6.0\nmax_ejected_percent = 50\n")  # outlasts the checks below
    lb = lb_factory(config(tmp_path, text))
    # The one active check each backend gets at start has run (it passed): from now on only
    # passive health can take the flaky one out.
    wait_until(lambda: all(e["last_check"] for e in status(lb)["backends"]), timeout=30)
    flaky.popen.kill()
    flaky.popen.wait()
    for _ in range(8):  # connect failures: retried on the good one, counted against flaky
        assert get(lb, headers={"Connection": "close"}).status_code == 200
    doc_entry = wait_until(lambda: (e := entry(lb, flaky.port))["state"] == "ejected" and e,
                           timeout=10)
    assert doc_entry["ejected_until"] > time.time()
    assert doc_entry["alive"]  # active checks have not run: passive health did it
    metrics = requests.get(lb.admin_url + "/metrics", timeout=5).text
    assert f'gol7lb_backend_ejections_total{{backend="127.0.0.1:{flaky.port}"}} 1.0' in metrics
    answers = [get(lb, headers={"Connection": "close"}) for _ in range(10)]
    assert Counter(port_of(answer) for answer in answers) == {good.port: 10}
    # Their access lines (found by request id: lines are written in batches, so lines of the
    # earlier requests may still come after these were sent) show a single attempt each.
    rids = {answer.headers["X-Request-ID"] for answer in answers}
    access = wait_until(lambda: len(lines := [
        line for line in lb.output().splitlines()
        if line.rpartition(" rid=")[2] in rids]) == 10 and lines)
    assert time.time() < doc_entry["ejected_until"]  # all of them came while it was ejected
    assert all(" attempts=1 flags=- " in line for line in access), access  # none tried it
    wait_until(lambda: entry(lb, flaky.port)["state"] == "up", timeout=15)
    # max_ejected_percent 50 of 2: the good one is never ejected, whatever it does.


def test_max_connections_is_never_exceeded_across_workers_and_the_queue_times_out(
        lb_factory, backend_factory, tmp_path):
    backend = backend_factory()
    text = (f'[[backends]]\nurl = "http://127.0.0.1:{backend.port}"\nmax_connections = 3\n'
            "[proxy]\nqueue_timeout = 0.3\n")
    lb = lb_factory({**config(tmp_path, text), **FAST_HEALTH, "WEB_CONCURRENCY": "2"})
    results: list[int] = []
    lock = threading.Lock()

    def call() -> None:
        code = requests.get(lb.url + "/sleep/1", timeout=10,
                            headers={"Connection": "close"}).status_code
        with lock:
            results.append(code)

    threads = [threading.Thread(target=call) for _ in range(8)]
    for t in threads:
        t.start()
    peak = 0
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline and any(t.is_alive() for t in threads):
        peak = max(peak, entry(lb, backend.port)["in_flight"])
        time.sleep(0.02)
    for t in threads:
        t.join()
    assert peak == 3
    assert Counter(results) == {200: 3, 503: 5}  # the rest waited 0.3 s, then 503
    assert entry(lb, backend.port)["in_flight"] == 0


def test_a_queued_request_gets_the_slot_that_frees_up(lb_factory, backend_factory, tmp_path):
    backend = backend_factory()
    text = (f'[[backends]]\nurl = "http://127.0.0.1:{backend.port}"\nmax_connections = 1\n'
            "[proxy]\nqueue_timeout = 5.0\n")
    lb = lb_factory({**config(tmp_path, text), **FAST_HEALTH})
    first = threading.Thread(target=lambda: get(lb, "/sleep/0.5"))
    first.start()
    wait_until(lambda: entry(lb, backend.port)["in_flight"] == 1)
    started = time.monotonic()
    assert get(lb, "/").status_code == 200
    assert 0.1 < time.monotonic() - started < 3.0
    first.join()


@pytest.mark.slow
def test_slow_start_ramps_a_returning_backend(lb_factory, backend_factory, tmp_path):
    a, b = backend_factory(), backend_factory()
    text = backends_toml([a.port, b.port]) + (
        "[health]\ninterval = 0.2\ntimeout = 0.5\nrise = 1\nfall = 1\nslow_start = 6.0\n")
    lb = lb_factory(config(tmp_path, text))
    b.popen.kill()
    b.popen.wait()
    wait_until(lambda: not entry(lb, b.port)["alive"], timeout=5)
    from tests.procs import start_backend
    back = start_backend(b.port)
    try:
        wait_until(lambda: entry(lb, b.port)["alive"], timeout=5)
        up_at = time.monotonic()
        early: Counter[int] = Counter()
        while time.monotonic() - up_at < 2.0:  # the first third of the ramp: 10 % to 33 %
            early[port_of(get(lb))] += 1
        time.sleep(max(0.0, up_at + 6.5 - time.monotonic()))  # the ramp is over
        late = Counter(port_of(get(lb)) for _ in range(40))
    finally:
        back.stop()
    assert sum(early.values()) >= 5
    assert early[b.port] / sum(early.values()) < 0.35, early  # well under half
    assert 16 <= late[b.port] <= 24, late  # an even share afterwards


@pytest.mark.slow
def test_one_frozen_backend_does_not_stall_the_lb(lb_factory, three_backends, tmp_path):
    ports = [b.port for b in three_backends]
    text = backends_toml(ports) + (
        "[health]\ntype = \"http\"\ninterval = 0.5\ntimeout = 0.5\nfall = 2\n"
        "passive_fails = 3\n[proxy]\nread_timeout = 2.0\nretry_on = [\"connect-failure\", "
        "\"timeout\"]\n")
    lb = lb_factory(config(tmp_path, text))
    frozen = three_backends[0]
    with Load(lb.url + "/", threads=24, seconds=30) as load:
        load.wait_for(50)
        os.kill(frozen.pid, signal.SIGSTOP)
        try:
            mark_ok, mark_failed = load.ok, len(load.failures)
            # HTTP checks (interval 0.5 s x fall 2 + timeout 0.5 s) take it out; meanwhile the
            # per-backend share keeps the other backends' threads free.
            took = time.monotonic()
            wait_until(lambda: entry(lb, frozen.port)["state"] in ("down", "ejected"),
                       timeout=10)
            took = time.monotonic() - took
            fresh = []
            for _ in range(10):
                started = time.monotonic()
                assert requests.get(lb.url + "/", timeout=10,
                                    headers={"Connection": "close"}).status_code == 200
                fresh.append(time.monotonic() - started)
                time.sleep(0.2)
            load.wait_for(100)
        finally:
            os.kill(frozen.pid, signal.SIGCONT)
    ok = load.ok - mark_ok
    failed = len(load.failures) - mark_failed
    assert ok / (ok + failed) >= 0.9, (ok, failed, load.failures[:3])
    assert took < 4.0
    assert max(fresh) < 1.0, fresh
