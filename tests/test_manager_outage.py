"""A frozen Manager (kill -STOP) never freezes anybody else: every wait on it is bounded."""

from __future__ import annotations

import contextlib
import signal
import time

import psutil
import requests

from tests.conftest import FAST_HEALTH, backends_env
from tests.procs import wait_until, workers_of


def manager_of(lb) -> psutil.Process:  # noqa: ANN001
    """The LB's Manager process, by its title."""
    for proc in lb.tree():
        with contextlib.suppress(psutil.Error):
            if " ".join(proc.cmdline()).startswith("gol7lb: manager"):
                return proc
    raise AssertionError("no process titled 'gol7lb: manager'")


def timed_get(url: str) -> tuple[requests.Response, float]:
    started = time.monotonic()
    response = requests.get(url, timeout=10)
    return response, time.monotonic() - started


def test_a_frozen_manager_bounds_every_wait_and_everything_recovers(lb_factory, backend_factory):
    backend = backend_factory()
    lb = lb_factory({"GOL7LB_BACKENDS": backends_env([backend.port]), **FAST_HEALTH})
    assert requests.get(lb.admin_url + "/status", timeout=5).status_code == 200
    manager = manager_of(lb)
    admin = next(p for p in lb.tree() if "gol7lb: admin" in " ".join(p.cmdline()))
    threads_before = admin.num_threads()
    manager.suspend()
    try:
        # /healthz: within 1 s, 503 with the reason, as soon as the freeze is noticed
        def unhealthy() -> str | None:
            response, took = timed_get(lb.admin_url + "/healthz")
            assert took < 1.0, f"/healthz took {took:.2f}s"
            return response.text if response.status_code == 503 else None  # a 503 is falsy

        reason = wait_until(unhealthy, timeout=10)
        assert "manager" in reason, reason
        # /status and /metrics: within 2 s, from the last known state, marked stale
        for _ in range(5):
            response, took = timed_get(lb.admin_url + "/status")
            assert took < 2.0, f"/status took {took:.2f}s"
            doc = response.json()
            assert response.status_code == 200 and doc["stale"] is True, doc
            assert [b["id"] for b in doc["backends"]] == [f"127.0.0.1:{backend.port}"]
            assert "manager" in doc["stale_reason"] and doc["state_age"] >= 0
            response, took = timed_get(lb.admin_url + "/metrics")
            assert took < 2.0, f"/metrics took {took:.2f}s"
            assert f'gol7lb_backend_up{{backend="127.0.0.1:{backend.port}"}} 1.0' in response.text
        assert admin.num_threads() <= threads_before + 3, "probes left threads waiting"
        # requests keep flowing from the workers' last snapshot
        assert requests.get(lb.url + "/", timeout=5).status_code == 200
        # SIGHUP: the master refuses the reload within a bound and keeps managing workers
        before = {w.pid for w in workers_of(lb)}
        lb.signal(signal.SIGHUP)
        wait_until(lambda: "reload (SIGHUP) failed" in lb.output(), timeout=6)
        fresh = wait_until(lambda: (lambda now: now if len(now) == 2 and not now & before
                                    else None)({w.pid for w in workers_of(lb)}), timeout=10)
        victim = next(iter(fresh))
        psutil.Process(victim).kill()
        wait_until(lambda: (lambda now: len(now) == 2 and victim not in now)(
            {w.pid for w in workers_of(lb)}), timeout=5)
        # new workers start within their bounded fallback (5 s without the Manager) and serve
        assert requests.get(lb.url + "/", timeout=15).status_code == 200
    finally:
        with contextlib.suppress(psutil.Error):
            manager.resume()
    wait_until(lambda: requests.get(lb.admin_url + "/healthz", timeout=5).status_code == 200,
               timeout=10)
    assert requests.get(lb.admin_url + "/status", timeout=5).json()["stale"] is False
    lb.signal(signal.SIGHUP)
    wait_until(lambda: "reload (SIGHUP): configuration generation 2" in lb.output(), timeout=10)
    metrics = requests.get(lb.admin_url + "/metrics", timeout=5).text
    assert 'gol7lb_config_reloads_total{result="error"} 1.0' in metrics
    assert requests.get(lb.url + "/", timeout=5).status_code == 200
    lb.tree()


def test_a_client_reaches_a_restarted_manager_on_its_first_call(tmp_path):
    """A kept connection to a Manager that died is noticed when the request cannot be sent,
    and the request goes on a new connection to its replacement: no failed read (each one
    would serve a worker's requests from stale state for a back-off)."""
    import multiprocessing
    import os

    from gol7lb.counters import SharedCounters
    from gol7lb.hosts import HostTable
    from gol7lb.manager import ControlClient, run_manager

    spawn = multiprocessing.get_context("spawn")
    address, authkey = str(tmp_path / "manager.sock"), os.urandom(32)
    args = (address, authkey, SharedCounters(), HostTable(worker_slots=2),
            str(tmp_path / "state.pickle"))
    managers = []

    def start() -> None:
        process = spawn.Process(target=run_manager, args=args, daemon=True)
        process.start()
        managers.append(process)
        probe = ControlClient(address, authkey, timeout=1.0)
        wait_until(lambda: _answers(probe), timeout=20)

    client = ControlClient(address, authkey, timeout=2.0)
    try:
        start()
        assert client.call("snapshot") is None  # no configuration published: None, but an answer
        managers[0].kill()
        managers[0].join(10)
        start()
        assert client.call("snapshot") is None  # through its kept, now dead, connection first
    finally:
        for process in managers:
            process.kill()  # by its PID (SIGKILL); a no-op for one already gone
            process.join(10)
    assert not any(process.is_alive() for process in managers)


def _answers(client) -> bool:  # noqa: ANN001
    try:
        client.call("snapshot")
    except ConnectionError:
        return False
    return True
