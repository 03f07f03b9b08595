"""The master's helper processes: each one shows its role in ps, is restarted after kill -9 with
no request lost, and /healthz tells the truth while one is missing or frozen."""

from __future__ import annotations

import os
import signal

import psutil
import pytest
import requests

from tests.conftest import FAST_HEALTH
from tests.load import Load
from tests.procs import lb_status as status
from tests.procs import wait_until

ROLES = ("manager", "supervisor", "admin listener", "config watcher")


def helper_pid(lb, role: str) -> int | None:
    for proc in lb.tree():
        try:
            if proc.cmdline()[:1] == [f"gol7lb: {role}"]:
                return proc.pid
        except psutil.NoSuchProcess:
            continue
    return None


def healthz(lb) -> requests.Response:
    return requests.get(lb.admin_url + "/healthz", timeout=10)


@pytest.fixture
def lb_with_config(lb_factory, three_backends, tmp_path):
    config = tmp_path / "lb.toml"
    config.write_text("".join(f'[[backends]]\nurl = "http://127.0.0.1:{b.port}"\n'
                              for b in three_backends))
    return lb_factory({"GOL7LB_CONFIG": str(config), **FAST_HEALTH})


def test_every_helper_shows_its_role_in_ps_and_its_pid_in_the_log(lb_with_config):
    lb = lb_with_config
    wait_until(lambda: all(helper_pid(lb, role) for role in ROLES))
    output = lb.output()
    for role in ROLES:
        assert f"started {role} (pid {helper_pid(lb, role)})" in output
    titles = {p.cmdline()[0] for p in psutil.Process(lb.pid).children()}
    assert any(t.startswith("gunicorn: worker") for t in titles)


@pytest.mark.slow
@pytest.mark.parametrize("role", ROLES)
def test_a_helper_killed_under_load_is_restarted_and_no_request_is_lost(lb_with_config,
                                                                        three_backends, role):
    lb = lb_with_config
    old = wait_until(lambda: helper_pid(lb, role))
    with Load(lb.url + "/", threads=4) as load:
        load.wait_for(30)
        os.kill(old, signal.SIGKILL)
        new = wait_until(lambda: (pid := helper_pid(lb, role)) not in (None, old) and pid,
                         timeout=10)
        load.wait_for(30)
        wait_until(lambda: healthz(lb).status_code == 200, timeout=10)
        load.wait_for(30)
    assert load.failures == [], load.failures[:5]
    output = lb.output()
    assert f"{role} (pid {old}) died (killed by SIGKILL); restarting" in output
    assert f"restarted {role} (pid {new})" in output
    # Everything works on after the restart: health checks still mark a dead backend down,
    # /status answers, a drain through the API still reaches the workers.
    victim = three_backends[0]
    victim.popen.kill()
    victim.popen.wait()
    wait_until(lambda: not next(b for b in status(lb)["backends"]
                                if b["id"] == f"127.0.0.1:{victim.port}")["alive"], timeout=10)
    drained = three_backends[1].port
    assert requests.post(f"{lb.admin_url}/backends/127.0.0.1:{drained}/drain",
                         timeout=5).status_code == 200
    served = {int(requests.get(lb.url + "/", timeout=5).headers["X-Backend-Port"])
              for _ in range(6)}
    assert served == {three_backends[2].port}
    assert "Traceback" not in output


def test_healthz_says_503_with_the_reason_while_a_helper_is_frozen(lb_with_config):
    lb = lb_with_config
    assert healthz(lb).status_code == 200
    supervisor = wait_until(lambda: helper_pid(lb, "supervisor"))
    os.kill(supervisor, signal.SIGSTOP)
    try:
        answer = wait_until(lambda: (r := healthz(lb)).status_code == 503 and [r], timeout=30)[0]
        assert "supervisor not running" in answer.text
    finally:
        os.kill(supervisor, signal.SIGCONT)
    wait_until(lambda: healthz(lb).status_code == 200, timeout=10)
    manager = wait_until(lambda: helper_pid(lb, "manager"))
    os.kill(manager, signal.SIGSTOP)
    try:
        answer = wait_until(lambda: (r := healthz(lb)).status_code == 503 and [r], timeout=30)[0]
        assert "shared state unreachable" in answer.text
        # The proxy keeps serving from the last known state meanwhile.
        assert requests.get(lb.url + "/", timeout=5).status_code == 200
    finally:
        os.kill(manager, signal.SIGCONT)
    wait_until(lambda: healthz(lb).status_code == 200, timeout=10)
