"""Reload through SIGHUP and through a file change, under load, with good and bad files."""

from __future__ import annotations

import re
import signal
import time
from pathlib import Path

import pytest
import requests

from tests.load import Load
from tests.procs import lb_status as status
from tests.procs import wait_until, workers_of

FAST = {"GOL7LB_HEALTH_INTERVAL": "0.2", "GOL7LB_HEALTH_TIMEOUT": "0.5"}


def toml(ports: list[int], weights: list[int] | None = None, extra: str = "") -> str:
    weights = weights or [1] * len(ports)
    tables = "".join(f'[[backends]]\nurl = "http://127.0.0.1:{p}"\nweight = {w}\n'
                     for p, w in zip(ports, weights, strict=True))
    return tables + extra


def gunicorn_workers(lb) -> set[int]:
    return {w.pid for w in workers_of(lb)}


def metric(lb, text: str) -> float:
    body = requests.get(lb.admin_url + "/metrics", timeout=5).text
    match = re.search(re.escape(text) + r" ([0-9.e+]+)", body)
    return float(match.group(1)) if match else 0.0


def generation(lb) -> int:
    return status(lb)["config"]["generation"]


@pytest.fixture
def config(tmp_path: Path) -> Path:
    return tmp_path / "lb.toml"


def test_a_bad_file_on_sighup_is_refused_under_load_and_the_master_keeps_serving(
        lb_factory, three_backends, config):
    ports = [b.port for b in three_backends]
    config.write_text(toml(ports[:2], extra="[reload]\nwatch = false\n"))
    lb = lb_factory({"GOL7LB_CONFIG": str(config), **FAST})
    with Load(lb.url + "/", fresh=True) as load:
        load.wait_for(20)
        for bad in ("[[backends]\nurl = ", toml(ports, extra="[health]\nrise = 0\n"),
                    toml(ports, extra='[reload]\nwatch = false\n[colour]\nred = 1\n')):
            errors = metric(lb, 'gol7lb_config_reloads_total{result="error"}')
            config.write_text(bad)
            lb.signal(signal.SIGHUP)
            wait_until(lambda e=errors: metric(
                lb, 'gol7lb_config_reloads_total{result="error"}') == e + 1)
            doc = status(lb)
            assert doc["config"]["last_error"] and "Traceback" not in doc["config"]["last_error"]
            assert doc["config"]["generation"] == 1  # the running configuration stays
            assert [b["id"] for b in doc["backends"]] == [f"127.0.0.1:{p}" for p in ports[:2]]
            load.wait_for(20)  # still serving, through the new workers
        assert lb.popen.poll() is None
        config.write_text(toml(ports, extra="[reload]\nwatch = false\n"))
        lb.signal(signal.SIGHUP)
        wait_until(lambda: generation(lb) == 2)
        assert status(lb)["config"]["last_error"] is None  # a good file clears the error
        load.wait_for(30)
    assert load.failures == [], load.failures[:5]
    assert set(load.ports) <= set(ports)
    output = lb.output()
    refused = [line for line in output.splitlines() if "reload (SIGHUP) refused" in line]
    assert len(refused) == 3
    assert "health.rise" in refused[1] and "colour" in refused[2]
    assert "Traceback" not in output and "Parent changed" not in output
    assert metric(lb, 'gol7lb_config_reloads_total{result="ok"}') >= 1


def test_a_file_edit_takes_effect_within_two_seconds(lb_factory, three_backends, config):
    ports = [b.port for b in three_backends]
    config.write_text(toml(ports[:2]))
    lb = lb_factory({"GOL7LB_CONFIG": str(config), **FAST})
    before = gunicorn_workers(lb)
    started = time.monotonic()
    config.write_text(toml(ports, weights=[1, 1, 2]))
    wait_until(lambda: generation(lb) == 2, timeout=5)
    took = time.monotonic() - started
    assert took < 2.0, f"reload took {took:.2f}s"
    doc = status(lb)
    assert [(b["id"], b["weight"]) for b in doc["backends"]] == [
        (f"127.0.0.1:{ports[0]}", 1), (f"127.0.0.1:{ports[1]}", 1), (f"127.0.0.1:{ports[2]}", 2)]
    wait_until(lambda: all(b["state"] == "up" for b in status(lb)["backends"]), timeout=5)
    served = [int(requests.get(lb.url + "/", timeout=5).headers["X-Backend-Port"])
              for _ in range(8)]
    assert served.count(ports[2]) == 4 and served.count(ports[0]) == 2
    assert gunicorn_workers(lb) == before  # a file reload keeps the workers
    # A bad edit is refused the same way, and the running configuration stays.
    config.write_text("algorithm = 'fastest'\n")
    wait_until(lambda: status(lb)["config"]["last_error"], timeout=5)
    assert "algorithm" in status(lb)["config"]["last_error"]
    assert generation(lb) == 2 and len(status(lb)["backends"]) == 3
    # Putting back exactly what runs is a good file too: the error clears.
    config.write_text(toml(ports, weights=[1, 1, 2]))
    wait_until(lambda: status(lb)["config"]["last_error"] is None, timeout=5)
    assert generation(lb) == 3
    # An editor's write-and-rename is seen too.
    replacement = config.with_suffix(".new")
    replacement.write_text(toml(ports[:1]))
    replacement.rename(config)
    wait_until(lambda: generation(lb) == 4, timeout=5)
    assert status(lb)["config"]["last_error"] is None
    assert [b["id"] for b in status(lb)["backends"]] == [f"127.0.0.1:{ports[0]}"]


@pytest.mark.slow
@pytest.mark.parametrize("trigger", ["sighup", "file"])
def test_five_reloads_in_a_row_under_load_lose_no_request(lb_factory, three_backends, config,
                                                          trigger):
    ports = [b.port for b in three_backends]
    variants = [toml(ports), toml(ports, [3, 1, 1]), toml(ports[:2]), toml(ports, [1, 2, 1]),
                toml(ports[1:]), toml(ports)]
    config.write_text(variants[0])
    watch = "true" if trigger == "file" else "false"
    lb = lb_factory({"GOL7LB_CONFIG": str(config), "GOL7LB_RELOAD_WATCH": watch, **FAST})
    with Load(lb.url + "/", threads=3, fresh=True) as fresh, \
            Load(lb.url + "/", threads=2, fresh=trigger == "sighup") as kept:
        fresh.wait_for(20)
        for number, variant in enumerate(variants[1:], start=2):
            before = gunicorn_workers(lb)
            config.write_text(variant)
            if trigger == "sighup":
                lb.signal(signal.SIGHUP)
            wait_until(lambda n=number: generation(lb) == n, timeout=10)
            if trigger == "sighup":  # the old workers retire: wait until they are gone
                wait_until(lambda b=before: not gunicorn_workers(lb) & b, timeout=15)
            fresh.wait_for(20)
        kept.wait_for(10)
    assert fresh.failures == [] and kept.failures == [], (fresh.failures + kept.failures)[:5]
    assert fresh.ok > 100
    assert "Traceback" not in lb.output()


def test_a_reload_keeps_health_state_and_new_workers_start_from_it(lb_factory, backend_factory,
                                                                   config):
    a, b, victim = backend_factory(), backend_factory(), backend_factory()
    ports = [a.port, b.port, victim.port]
    config.write_text(toml(ports, extra="[reload]\nwatch = false\n"))
    # rise 6 at 0.5 s: a backend that had to rise again would be out for about 3 s.
    lb = lb_factory({"GOL7LB_CONFIG": str(config), "GOL7LB_HEALTH_INTERVAL": "0.5",
                     "GOL7LB_HEALTH_TIMEOUT": "0.5", "GOL7LB_HEALTH_RISE": "6",
                     "GOL7LB_HEALTH_FALL": "1"})
    victim.popen.kill()
    victim.popen.wait()
    wait_until(lambda: not next(e for e in status(lb)["backends"]
                                if e["id"] == f"127.0.0.1:{victim.port}")["alive"], timeout=5)
    mark = len(lb.output())
    config.write_text(toml(ports, weights=[2, 2, 1], extra="[reload]\nwatch = false\n"))
    lb.signal(signal.SIGHUP)
    # Straight away, through whichever workers answer (the new ones among them):
    served = []
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline:
        served.append(int(requests.get(lb.url + "/", timeout=5,
                                       headers={"Connection": "close"}).headers["X-Backend-Port"]))
    assert set(served) == {a.port, b.port}  # both up ones serve on, without a new rise
    doc = status(lb)
    assert doc["config"]["generation"] == 2
    states = {e["id"]: e["state"] for e in doc["backends"]}
    assert states[f"127.0.0.1:{victim.port}"] == "down"  # a down one stays down
    after = lb.output()[mark:]
    assert f"backend=127.0.0.1:{victim.port}" not in after
    access = [line for line in after.splitlines() if " rid=" in line]
    assert access and all(" attempts=1 flags=- " in line for line in access), access  # none tried


def test_restart_only_settings_say_so_in_the_log(lb_factory, backend_factory, config):
    backend = backend_factory()
    config.write_text(toml([backend.port]))
    lb = lb_factory({"GOL7LB_CONFIG": str(config), **FAST})
    config.write_text('cpu_affinity = "off"\n' + toml([backend.port]))
    wait_until(lambda: generation(lb) == 2, timeout=5)
    wait_until(lambda: "cpu_affinity changed from 'auto' to 'off': it takes effect after a "
                       "restart" in lb.output(), timeout=5)


@pytest.mark.lean_worker  # gunicorn's gthread decides keep-alive before the app runs
def test_a_request_in_flight_during_sighup_is_answered_with_connection_close(
        lb_factory, backend_factory):
    """The retiring worker closes the connection after that answer, so the answer says so:
    a client must not send its next request on a connection that is about to close."""
    import socket

    backend = backend_factory()
    lb = lb_factory({"GOL7LB_BACKENDS": f"http://127.0.0.1:{backend.port}", **FAST})
    with socket.create_connection(("127.0.0.1", lb.port), timeout=10) as s:
        s.sendall(b"GET /sleep/1.5 HTTP/1.1\r\nHost: x\r\n\r\n")
        wait_until(lambda: status(lb)["backends"][0]["in_flight"] == 1)
        lb.popen.send_signal(signal.SIGHUP)
        answer = b""
        while b"\r\n\r\n" not in answer:
            answer += s.recv(65536)
        head = answer.split(b"\r\n\r\n")[0]
        assert head.startswith(b"HTTP/1.1 200 ")
        assert b"\r\nConnection: close" in head
        while chunk := s.recv(65536):  # then the close it announced
            answer += chunk
