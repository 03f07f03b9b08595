"""Passive health decided in shared memory on the request path (issue 14, item 7): exactly
`passive_fails` consecutive failures eject a backend from every worker, `max_ejected_percent`
holds however the failures fall, and the cooldown doubles on repeats. Through a real LB with
two workers; the ejection rules on their own on a HostTable."""

from __future__ import annotations

import multiprocessing
import time
from collections import Counter
from pathlib import Path

import pytest
import requests

from gol7lb.hosts import HostTable, PoolPeers
from gol7lb.outlier import try_eject
from tests.helpers import config
from tests.procs import backend_entry as entry
from tests.procs import lb_status as status
from tests.procs import wait_until


def passive_toml(ports: list[int], cooldown: float, percent: int) -> str:
    """Active checks once at start only: from then on passive health alone ejects."""
    return "".join(f'[[backends]]\nurl = "http://127.0.0.1:{p}"\n' for p in ports) + (
        "[health]\ninterval = 60.0\npassive_fails = 3\npassive_window = 10.0\n"
        f"passive_cooldown = {cooldown}\nmax_ejected_percent = {percent}\n"
        f"[proxy]\nretries = {len(ports)}\n")


def start(lb_factory, backend_factory, tmp_path: Path, backends: int, dead: int,
          cooldown: float = 30.0, percent: int = 50):
    """An LB with two workers over `backends` demo backends, the last `dead` of them killed
    once their first check has passed (so they stay up for the active checks)."""
    procs = [backend_factory() for _ in range(backends)]
    lb = lb_factory({**config(tmp_path, passive_toml([p.port for p in procs], cooldown,
                                                     percent)),
                     "WEB_CONCURRENCY": "2"})
    wait_until(lambda: all(e["last_check"] for e in status(lb)["backends"]), timeout=30)
    for proc in procs[backends - dead:]:
        proc.popen.kill()
        proc.popen.wait()
    return lb, [p.port for p in procs[backends - dead:]]


def send(lb, n: int) -> Counter[int]:
    """n sequential requests on new connections (both workers serve); their statuses."""
    return Counter(requests.get(lb.url + "/", headers={"Connection": "close"},
                                timeout=10).status_code for _ in range(n))


def ejections_metric(lb, port: int) -> str:
    text = requests.get(lb.admin_url + "/metrics", timeout=5).text
    prefix = f'gol7lb_backend_ejections_total{{backend="127.0.0.1:{port}"}} '
    return next((line[len(prefix):] for line in text.splitlines()
                 if line.startswith(prefix)), "")


def test_exactly_passive_fails_failures_eject_and_the_cooldown_doubles(
        lb_factory, backend_factory, tmp_path):
    lb, (dead,) = start(lb_factory, backend_factory, tmp_path, backends=2, dead=1,
                        cooldown=3.0)
    began = time.time()
    assert send(lb, 12) == {200: 12}  # connect failures: retried on the live one
    ended = time.time()
    ejected = wait_until(lambda: (e := entry(lb, dead))["state"] == "ejected" and e, timeout=5)
    assert ejected["requests"] == 3, ejected  # the 4th request anywhere skipped it
    assert began + 3.0 <= ejected["ejected_until"] <= ended + 3.0
    assert ejected["alive"]  # the active checks did not see it: passive health did
    assert ejections_metric(lb, dead) == "1.0"
    wait_until(lambda: entry(lb, dead)["state"] == "up", timeout=10)
    began = time.time()
    assert send(lb, 12) == {200: 12}
    ended = time.time()
    again = wait_until(lambda: (e := entry(lb, dead))["state"] == "ejected" and e, timeout=5)
    assert again["requests"] == 6, again
    assert began + 6.0 <= again["ejected_until"] <= ended + 6.0  # twice the cooldown
    assert ejections_metric(lb, dead) == "2.0"


def test_max_ejected_percent_holds_and_each_ejected_backend_got_exactly_passive_fails(
        lb_factory, backend_factory, tmp_path):
    lb, dead = start(lb_factory, backend_factory, tmp_path, backends=4, dead=3)
    assert send(lb, 30) == {200: 30}
    wait_until(lambda: sum(entry(lb, p)["state"] == "ejected" for p in dead) == 2, timeout=5)
    entries = sorted((entry(lb, p) for p in dead), key=lambda e: e["state"])
    assert [e["state"] for e in entries] == ["ejected", "ejected", "up"]  # 50 % of 4
    assert [e["requests"] for e in entries[:2]] == [3, 3], entries
    assert entries[2]["requests"] > 3  # kept failing, never ejected: it would exceed 50 %


# -- the rules on their own ---------------------------------------------------------------------

@pytest.fixture
def table(tmp_path: Path) -> HostTable:
    return HostTable(2, host_slots=8, lock_path=str(tmp_path / "hosts.lock"))


def test_the_cooldown_doubles_on_repeats_up_to_ten_times_and_resets_after_a_calm(table):
    cells = table.for_worker(0)
    peers = [PoolPeers((0, 1, 2, 3), (0, 1, 2, 3))]
    now = 1000.0
    lengths = []
    for _ in range(6):
        until = try_eject(cells, 0, peers, 50, 2.0, now)
        assert until is not None and table.ejected(0, now)
        assert try_eject(cells, 0, peers, 50, 2.0, now) is None  # already out
        lengths.append(until - now)
        now = until + 1.0
        assert not table.ejected(0, now)
    assert lengths == [2.0, 4.0, 8.0, 16.0, 20.0, 20.0]
    until = try_eject(cells, 0, peers, 50, 2.0, now + 10 * 2.0 + 1)  # long healthy: forgotten
    assert until == pytest.approx(now + 21.0 + 2.0)


def test_max_ejected_percent_counts_ejected_peers_and_never_takes_the_last_available(table):
    cells = table.for_worker(1)
    now = 1000.0
    four = [PoolPeers((0, 1, 2, 3), (0, 1, 2, 3))]
    assert try_eject(cells, 0, four, 50, 5.0, now) is not None
    assert try_eject(cells, 1, four, 50, 5.0, now) is not None
    assert try_eject(cells, 2, four, 50, 5.0, now) is None  # 3 of 4 is over 50 %
    assert try_eject(cells, 2, four, 50, 5.0, now + 6.0) is not None  # the first two are back
    # 100 %: anything but the last available one (slot 5 is down, slot 4 the last up).
    two = [PoolPeers((4, 5), (4,))]
    assert try_eject(cells, 4, two, 100, 5.0, now) is None
    # In two pools: the stricter one decides.
    both = [PoolPeers((6, 7), (6, 7)), PoolPeers((6,), (6,))]
    assert try_eject(cells, 6, both, 100, 5.0, now) is None


def test_two_processes_completing_streaks_at_once_never_exceed_the_share(table):
    """The ejection lock is a byte-range lock: it holds between processes (forked workers)."""
    context = multiprocessing.get_context("fork")
    four = [PoolPeers((0, 1, 2, 3), (0, 1, 2, 3))]

    def eject(slots: tuple[int, ...], worker: int, barrier) -> None:  # noqa: ANN001
        cells = table.for_worker(worker)
        barrier.wait(timeout=10)
        for slot in slots:
            try_eject(cells, slot, four, 50, 60.0, time.time())

    for _ in range(20):
        for slot in range(4):
            table.forget_passive(slot)
        barrier = context.Barrier(2)
        procs = [context.Process(target=eject, args=(slots, worker, barrier))
                 for worker, slots in enumerate(((0, 1), (2, 3)))]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join(timeout=10)
            assert proc.exitcode == 0
        assert sum(table.ejected(slot, time.time()) for slot in range(4)) == 2
