"""Prometheus metrics of a real LB (2 workers, real backends), read from the admin listener's
/metrics as a Prometheus server would: exact request counts across workers, LB-made answers,
latency buckets, live backend gauges, health checks, retries, counters of a killed worker,
config reloads, a private multiprocess directory per instance, and `promtool check metrics`.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import tempfile
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import FAST_HEALTH, backends_env
from tests.helpers import per_label, scrape_text
from tests.procs import HELPERS_START, wait_until, workers_of

# DESIGN.md's table: family name (as the parser names it) -> type and label names.
DOCUMENTED = {
    "gol7lb_requests": ("counter", {"pool", "backend", "code", "method"}),
    "gol7lb_request_duration_seconds": ("histogram", {"pool", "backend"}),
    "gol7lb_backend_up": ("gauge", {"backend"}),
    "gol7lb_backend_in_flight": ("gauge", {"backend"}),
    "gol7lb_backend_weight": ("gauge", {"pool", "backend"}),
    "gol7lb_health_checks": ("counter", {"backend", "result"}),
    "gol7lb_health_check_duration_seconds": ("histogram", {"backend"}),
    "gol7lb_retries": ("counter", {"backend"}),
    "gol7lb_config_reloads": ("counter", {"result"}),
    "gol7lb_backend_ejections": ("counter", {"backend"}),
    "gol7lb_websocket_connections": ("gauge", {"backend"}),
    "gol7lb_local_errors": ("counter", {"reason"}),  # issue 14: the LB's own EMFILE and kin
}





def families(lb) -> dict:
    return {f.name: f for f in text_string_to_metric_families(scrape_text(lb))}


def value(lb, sample: str, **labels: str) -> float:
    """Sum of the samples named `sample` whose labels include `labels`."""
    return sum(s.value for f in text_string_to_metric_families(scrape_text(lb))
               for s in f.samples
               if s.name == sample and labels.items() <= s.labels.items())


def get_fresh(url: str) -> requests.Response:
    """One request on a connection of its own, so the kernel may hand it to either worker."""
    return requests.get(url, headers={"Connection": "close"}, timeout=15)


def send_concurrently(url: str, n: int) -> list[requests.Response]:
    with ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(lambda _: get_fresh(url), range(n)))



def metrics_dir(lb) -> str:
    """The instance's private multiprocess directory (gol7lb/rundir.py names it by the
    master's pid, under $XDG_RUNTIME_DIR when writable, else the temporary directory)."""
    bases = [os.environ.get("XDG_RUNTIME_DIR") or "", tempfile.gettempdir()]
    found = [d for base in bases if base
             for d in glob.glob(os.path.join(base, f"gol7lb-{lb.pid}-*", "metrics"))]
    assert len(found) == 1, f"expected one metrics directory for pid {lb.pid}: {found}"
    return found[0]


def requests_by_pid(lb) -> dict[int, float]:
    """gol7lb_requests_total per process, from each process's own counter file."""
    totals = {}
    for path in glob.glob(os.path.join(metrics_dir(lb), "counter_*.db")):
        pid = int(Path(path).stem.split("_")[1])
        totals[pid] = sum(s.value for m in MultiProcessCollector.merge([path])
                          for s in m.samples if s.name == "gol7lb_requests_total")
    return totals


def backend_id(port: int) -> str:
    return f"127.0.0.1:{port}"


@pytest.fixture
def lb3(lb_factory, three_backends):
    lb = lb_factory({"GOL7LB_BACKENDS": backends_env([b.port for b in three_backends]),
                     **FAST_HEALTH})
    lb.backends = three_backends
    # every backend checked at least once, so every health series exists
    wait_until(lambda: len(per_label(lb, "gol7lb_health_checks_total", "backend")) == 3,
               timeout=HELPERS_START)
    return lb


def test_documented_metrics_have_their_types_and_labels(lb3):
    lb = lb3
    ports = [b.port for b in lb.backends]
    assert all(a.status_code == 200 for a in send_concurrently(lb.url + "/", 9))
    found = families(lb)
    for name, (kind, labels) in DOCUMENTED.items():
        assert name in found, f"{name} missing from /metrics"
        family = found[name]
        assert family.type == kind, (name, family.type)
        assert family.documentation, f"{name} has no HELP"
        for sample in family.samples:
            assert set(sample.labels) - {"le"} == labels, (name, sample.labels)
    requests_samples = found["gol7lb_requests"].samples
    assert {s.labels["backend"] for s in requests_samples} == {backend_id(p) for p in ports}
    assert {(s.labels["pool"], s.labels["code"], s.labels["method"])
            for s in requests_samples} == {("default", "200", "GET")}
    for name in ("gol7lb_backend_up", "gol7lb_backend_in_flight", "gol7lb_backend_weight"):
        assert {s.labels["backend"] for s in found[name].samples} == {backend_id(p)
                                                                      for p in ports}
    assert {(s.labels["pool"], s.value) for s in found["gol7lb_backend_weight"].samples} == {
        ("default", 1.0)}
    assert {s.labels["result"] for s in found["gol7lb_health_checks"].samples} >= {"ok"}
    # the event counters exist at 0 before their first event, so alerts on them work at once
    assert {(s.labels["result"], s.value) for s in found["gol7lb_config_reloads"].samples} == {
        ("ok", 0.0), ("error", 0.0)}
    for name in ("gol7lb_retries", "gol7lb_backend_ejections", "gol7lb_websocket_connections"):
        assert {(s.labels["backend"], s.value) for s in found[name].samples} == {
            (backend_id(p), 0.0) for p in ports}, name
    assert {(s.labels["reason"], s.value) for s in found["gol7lb_local_errors"].samples} == {
        ("emfile", 0.0), ("enfile", 0.0), ("enobufs", 0.0), ("enomem", 0.0)}
    # the counters the duration histogram is built from stay internal
    assert sorted(n for n in found if n.startswith("gol7lb_request_duration")) == [
        "gol7lb_request_duration_seconds"]


def test_requests_are_counted_while_other_requests_stay_open(lb_factory, three_backends):
    """A worker batches its counts while it has requests open: they still show within a
    fraction of a second, not only once it is idle (one worker, so it is never idle here)."""
    lb = lb_factory({"GOL7LB_BACKENDS": backends_env([b.port for b in three_backends]),
                     "WEB_CONCURRENCY": "1", **FAST_HEALTH})
    before = value(lb, "gol7lb_requests_total")
    with ThreadPoolExecutor(max_workers=4) as pool:
        slow = [pool.submit(requests.get, lb.url + "/sleep/3", timeout=30) for _ in range(2)]
        wait_until(lambda: sum(per_label(lb, "gol7lb_backend_in_flight", "backend").values())
                   >= 2, timeout=HELPERS_START)
        quick = [get_fresh(lb.url + "/") for _ in range(6)]
        assert all(a.status_code == 200 for a in quick)
        wait_until(lambda: value(lb, "gol7lb_requests_total") == before + 6, timeout=2)
        assert not any(f.done() for f in slow)  # counted while the worker had two open
        assert all(f.result().status_code == 200 for f in slow)
    assert value(lb, "gol7lb_requests_total") == before + 8
    assert value(lb, "gol7lb_request_duration_seconds_bucket", le="5.0") == \
        value(lb, "gol7lb_request_duration_seconds_count")


def test_request_counts_are_exact_across_both_workers_and_split_by_backend(lb3):
    lb = lb3
    before = value(lb, "gol7lb_requests_total")
    before_split = per_label(lb, "gol7lb_requests_total", "backend")
    before_by_pid = requests_by_pid(lb)
    served: Counter[str] = Counter()
    sent = 0
    for _ in range(10):  # fresh connections until both workers have served some
        answers = send_concurrently(lb.url + "/", 20)
        assert all(a.status_code == 200 for a in answers)
        served.update(backend_id(int(a.headers["X-Backend-Port"])) for a in answers)
        sent += len(answers)
        by_pid = requests_by_pid(lb)
        grew = [pid for pid, n in by_pid.items() if n > before_by_pid.get(pid, 0)]
        if len(grew) >= 2:
            break
    assert set(grew) <= {w.pid for w in workers_of(lb)}
    assert len(grew) == 2, f"only one worker served {sent} requests on fresh connections"
    assert value(lb, "gol7lb_requests_total") - before == sent
    assert sum(requests_by_pid(lb).values()) - sum(before_by_pid.values()) == sent
    after_split = per_label(lb, "gol7lb_requests_total", "backend")
    assert {b: after_split[b] - before_split.get(b, 0) for b in after_split} == dict(served)
    assert value(lb, "gol7lb_requests_total", pool="default", code="200", method="GET") \
        == value(lb, "gol7lb_requests_total")
    # the duration histogram saw every request, and a slow one lands above 0.25 s
    assert value(lb, "gol7lb_request_duration_seconds_count") \
        == value(lb, "gol7lb_requests_total")
    below = value(lb, "gol7lb_request_duration_seconds_bucket", le="0.25")
    every = value(lb, "gol7lb_request_duration_seconds_bucket", le="+Inf")
    slow = get_fresh(lb.url + "/sleep/0.3")
    assert slow.status_code == 200
    slow_backend = backend_id(int(slow.headers["X-Backend-Port"]))
    assert value(lb, "gol7lb_request_duration_seconds_bucket", le="0.25") == below
    assert value(lb, "gol7lb_request_duration_seconds_bucket", le="0.5",
                 backend=slow_backend) >= 1
    assert value(lb, "gol7lb_request_duration_seconds_bucket", le="+Inf") == every + 1
    assert value(lb, "gol7lb_request_duration_seconds_sum", backend=slow_backend) >= 0.3


def test_lb_made_answer_is_counted_with_backend_none(lb_factory, backend_factory):
    only = backend_factory()
    lb = lb_factory({"GOL7LB_BACKENDS": backends_env([only.port]), **FAST_HEALTH})
    assert get_fresh(lb.url + "/").status_code == 200
    only.popen.kill()
    wait_until(lambda: value(lb, "gol7lb_backend_up", backend=backend_id(only.port)) == 0,
               timeout=HELPERS_START)
    answers = [get_fresh(lb.url + "/") for _ in range(3)]
    assert [a.status_code for a in answers] == [503] * 3
    assert value(lb, "gol7lb_requests_total", backend="none", code="503", pool="default",
                 method="GET") == 3
    assert value(lb, "gol7lb_requests_total", backend=backend_id(only.port)) == 1
    assert value(lb, "gol7lb_request_duration_seconds_count", backend="none") == 3


def test_backend_gauges_in_flight_and_up_follow_the_backends(lb3):
    lb = lb3
    ports = [b.port for b in lb.backends]
    result: list[requests.Response] = []
    slow = threading.Thread(target=lambda: result.append(get_fresh(lb.url + "/sleep/2")))
    slow.start()
    in_flight = wait_until(lambda: {b: v for b, v in per_label(
        lb, "gol7lb_backend_in_flight", "backend").items() if v} or None, timeout=10)
    slow.join()
    assert result[0].status_code == 200
    assert in_flight == {backend_id(int(result[0].headers["X-Backend-Port"])): 1.0}
    wait_until(lambda: value(lb, "gol7lb_backend_in_flight") == 0, timeout=10)

    checks = per_label(lb, "gol7lb_health_checks_total", "backend", result="ok")
    durations = value(lb, "gol7lb_health_check_duration_seconds_count")
    assert all(value(lb, "gol7lb_backend_up", backend=backend_id(p)) == 1 for p in ports)
    victim = lb.backends[0]
    victim.popen.kill()
    victim.popen.wait(5)
    wait_until(lambda: value(lb, "gol7lb_backend_up", backend=backend_id(victim.port)) == 0,
               timeout=HELPERS_START)
    assert [value(lb, "gol7lb_backend_up", backend=backend_id(p)) for p in ports[1:]] == [1, 1]
    wait_until(lambda: value(lb, "gol7lb_health_checks_total", backend=backend_id(victim.port),
                             result="fail") >= 2, timeout=HELPERS_START)
    now = per_label(lb, "gol7lb_health_checks_total", "backend", result="ok")
    assert all(now[backend_id(p)] > checks[backend_id(p)] for p in ports[1:])
    assert value(lb, "gol7lb_health_check_duration_seconds_count") > durations
    weights = families(lb)["gol7lb_backend_weight"].samples
    assert {(s.labels["pool"], s.labels["backend"]) for s in weights} == {
        ("default", backend_id(p)) for p in ports}


def test_retry_after_connect_failure_is_counted_against_the_dead_backend(lb_factory,
                                                                          three_backends):
    ports = [b.port for b in three_backends]
    lb = lb_factory({"GOL7LB_BACKENDS": backends_env(ports), **FAST_HEALTH,
                     "GOL7LB_HEALTH_INTERVAL": "60"})  # the dead one stays "up"...
    # ...once each backend had its first check (the next one is a minute away)
    wait_until(lambda: len(per_label(lb, "gol7lb_health_checks_total", "backend",
                                     result="ok")) == 3, timeout=HELPERS_START)
    dead = three_backends[0]
    dead.popen.kill()
    dead.popen.wait(5)
    answers = send_concurrently(lb.url + "/", 12)
    assert [a.status_code for a in answers] == [200] * 12
    assert dead.port not in {int(a.headers["X-Backend-Port"]) for a in answers}
    retries = per_label(lb, "gol7lb_retries_total", "backend")
    assert {b for b, n in retries.items() if n} == {backend_id(dead.port)}
    assert set(retries) == {backend_id(p) for p in ports}  # the others at 0
    assert retries[backend_id(dead.port)] >= 1
    assert value(lb, "gol7lb_requests_total") == 12
    assert value(lb, "gol7lb_requests_total", backend=backend_id(dead.port)) == 0
    assert value(lb, "gol7lb_backend_up", backend=backend_id(dead.port)) == 1


def test_counters_of_a_killed_worker_are_kept(lb3):
    lb = lb3
    before = value(lb, "gol7lb_requests_total")
    assert all(a.status_code == 200 for a in send_concurrently(lb.url + "/", 20))
    assert value(lb, "gol7lb_requests_total") == before + 20
    workers = workers_of(lb)
    assert len(workers) == 2
    by_pid = requests_by_pid(lb)
    victim = max(workers, key=lambda w: by_pid.get(w.pid, 0))  # the one that served most
    assert by_pid.get(victim.pid, 0) > 0
    victim.send_signal(signal.SIGKILL)
    wait_until(lambda: len({w.pid for w in workers_of(lb)} - {victim.pid}) == 2, timeout=30)
    assert value(lb, "gol7lb_requests_total") == before + 20
    assert all(a.status_code == 200 for a in send_concurrently(lb.url + "/", 10))
    assert value(lb, "gol7lb_requests_total") == before + 30
    assert value(lb, "gol7lb_request_duration_seconds_count") == before + 30


def write_config(path: Path, text: str) -> None:
    """Write then rename, as editors do, so the watcher never reads half a file."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def test_config_reloads_are_counted_ok_and_error(lb_factory, three_backends, tmp_path):
    config = tmp_path / "gol7lb.toml"
    write_config(config, "[proxy]\nretries = 2\n")
    lb = lb_factory({"GOL7LB_BACKENDS": backends_env([b.port for b in three_backends]),
                     "GOL7LB_CONFIG": str(config), **FAST_HEALTH})
    wait_until(lambda: "config watcher on" in lb.output(), timeout=HELPERS_START)
    assert value(lb, "gol7lb_config_reloads_total") == 0
    write_config(config, "[proxy]\nretries = 1\n")
    wait_until(lambda: value(lb, "gol7lb_config_reloads_total", result="ok") == 1, timeout=30)
    write_config(config, '[proxy]\nretries = "many"\n')
    wait_until(lambda: value(lb, "gol7lb_config_reloads_total", result="error") == 1,
               timeout=30)
    assert value(lb, "gol7lb_config_reloads_total", result="ok") == 1
    lb.signal(signal.SIGHUP)  # the master's own reload of the same bad file
    wait_until(lambda: value(lb, "gol7lb_config_reloads_total", result="error") == 2,
               timeout=30)
    write_config(config, "[proxy]\nretries = 0\n")
    wait_until(lambda: value(lb, "gol7lb_config_reloads_total", result="ok") == 2, timeout=30)
    found = families(lb)["gol7lb_config_reloads"]
    assert found.type == "counter" and found.documentation
    assert all(set(s.labels) == {"result"} for s in found.samples)
    assert get_fresh(lb.url + "/").status_code == 200


def test_an_edit_while_the_watcher_starts_is_applied(lb_factory, three_backends, tmp_path):
    config = tmp_path / "gol7lb.toml"
    write_config(config, "[proxy]\nretries = 2\n")
    lb = lb_factory({"GOL7LB_BACKENDS": backends_env([b.port for b in three_backends]),
                     "GOL7LB_CONFIG": str(config), **FAST_HEALTH})
    write_config(config, "[proxy]\nretries = 1\n")  # no wait for the watcher
    wait_until(lambda: value(lb, "gol7lb_config_reloads_total", result="ok") >= 1,
               timeout=HELPERS_START)
    wait_until(lambda: "config watcher on" in lb.output(), timeout=HELPERS_START)
    assert value(lb, "gol7lb_config_reloads_total", result="error") == 0


def test_two_instances_count_independently(lb_factory, three_backends):
    env = {"GOL7LB_BACKENDS": backends_env([b.port for b in three_backends]), **FAST_HEALTH}
    first, second = lb_factory(dict(env)), lb_factory(dict(env))
    assert metrics_dir(first) != metrics_dir(second)
    send_concurrently(first.url + "/", 7)
    send_concurrently(second.url + "/", 3)
    assert value(first, "gol7lb_requests_total") == 7
    assert value(second, "gol7lb_requests_total") == 3


def test_promtool_accepts_the_exposition(lb_factory, three_backends, tmp_path):
    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("CI") == "true":
            pytest.fail("promtool is missing in CI: tests/run.sh installs Debian's prometheus")
        pytest.skip("promtool not installed (Debian: apt-get install prometheus); "
                    "tests/run.sh installs it")
    config = tmp_path / "gol7lb.toml"
    write_config(config, "[proxy]\nretries = 2\n")
    ports = [b.port for b in three_backends]
    lb = lb_factory({"GOL7LB_BACKENDS": backends_env(ports), "GOL7LB_CONFIG": str(config),
                     **FAST_HEALTH, "GOL7LB_HEALTH_INTERVAL": "60"})
    wait_until(lambda: "config watcher on" in lb.output(), timeout=HELPERS_START)
    three_backends[0].popen.kill()  # retries, and later failed checks
    send_concurrently(lb.url + "/", 6)
    requests.post(lb.url + "/", data=b"x", timeout=10)
    requests.request("BREW", lb.url + "/", timeout=30)
    write_config(config, "[proxy]\nretries = oops\n")
    wait_until(lambda: value(lb, "gol7lb_config_reloads_total", result="error") == 1,
               timeout=HELPERS_START)
    text = scrape_text(lb)
    for name in ("gol7lb_requests_total", "gol7lb_retries_total",
                 "gol7lb_request_duration_seconds_bucket", "gol7lb_health_checks_total",
                 "gol7lb_config_reloads_total", "gol7lb_backend_up"):
        assert name in text
    checked = subprocess.run([promtool, "check", "metrics"], input=text, text=True,
                             capture_output=True, timeout=60)
    assert checked.returncode == 0 and not checked.stdout.strip() and \
        not checked.stderr.strip(), checked.stdout + checked.stderr
