"""Rate limits end to end: real gunicorn LBs with several workers, a real Redis server shared
by two LB instances, real clients (issue 17 item 2)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest
import requests

from tests.helpers import per_label, read_exactly, read_head, scrape_text, split_response
from tests.procs import LB, ROOT, Proc, free_port, wait_for_port, wait_until, workers_of


def write_config(path: Path, backend: int, limits: str, routes: str = "",
                 top: str = "") -> dict[str, str]:
    path.write_text(f"{top}\n[[backends]]\nurl = \"http://127.0.0.1:{backend}\"\n\n{routes}\n"
                    f"{limits}\n")
    return {"GOL7LB_CONFIG": str(path)}


def get(port: int, path: str = "/", headers: dict[str, str] | None = None,
        source: str = "127.0.0.1") -> tuple[int, dict[str, list[str]]]:
    """One request on its own connection from `source`; status and headers. Whatever the
    backend answered (the demo backend says 404 to paths other than /) counts as 200."""
    lines = [f"GET {path} HTTP/1.1", "Host: lb", "Connection: close",
             *(f"{k}: {v}" for k, v in (headers or {}).items())]
    with socket.create_connection(("127.0.0.1", port), timeout=10,
                                  source_address=(source, 0)) as s:
        s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    status, head, _ = split_response(data)
    return (200 if "x-backend-port" in head else status), head


def statuses(port: int, count: int, **kwargs: object) -> list[int]:
    return [get(port, **kwargs)[0] for _ in range(count)]  # type: ignore[arg-type]


def worker_of_connection(lb: LB, client_ports: set[int]) -> dict[int, int]:
    """Which worker process holds each of our connections (client port -> worker pid)."""
    found = {}
    for worker in workers_of(lb):
        try:
            for conn in worker.net_connections(kind="tcp"):
                if conn.laddr and conn.laddr.port == lb.port and conn.raddr and \
                        conn.raddr.port in client_ports:
                    found[conn.raddr.port] = worker.pid
        except psutil.Error:
            continue
    return found


def concurrent_burst(lb: LB, count: int) -> tuple[list[int], int]:
    """`count` requests sent at the same instant on connections spread over the workers;
    their statuses, and how many workers held them."""
    socks = [socket.create_connection(("127.0.0.1", lb.port), timeout=20) for _ in range(count)]
    try:
        ports = {s.getsockname()[1] for s in socks}
        held = wait_until(lambda: (lambda m: m if len(m) == count else None)(
            worker_of_connection(lb, ports)), timeout=20)
        start = threading.Barrier(count)
        results: list[int] = []
        lock = threading.Lock()

        def one(s: socket.socket) -> None:
            start.wait()
            s.sendall(b"GET / HTTP/1.1\r\nHost: lb\r\n\r\n")
            status, head, _ = split_response(read_head(s))  # the answer, not the close
            read_exactly(s, int(head["content-length"][0]))
            with lock:
                results.append(status)

        threads = [threading.Thread(target=one, args=(s,)) for s in socks]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        return results, len(set(held.values()))
    finally:
        for s in socks:
            s.close()


LIMIT_10 = """
[rate_limits.ten]
key = "client_ip"
rate = 10
per = 600
burst = 10
"""


def test_local_budget_is_exact_across_four_workers(lb_factory, backend_factory, tmp_path):
    backend = backend_factory()
    env = write_config(tmp_path / "lb.toml", backend.port, LIMIT_10, top='rate_limit = "ten"')
    lb = lb_factory({**env, "WEB_CONCURRENCY": "4", "GOL7LB_CPU_AFFINITY": "off"})
    results, workers = concurrent_burst(lb, 40)
    assert workers >= 2, "the connections did not reach several workers"
    assert Counter(results) == {200: 10, 429: 30}
    # The budget is spent for every worker: a new connection is refused too.
    assert get(lb.port)[0] == 429
    counted = per_label(lb, "gol7lb_rate_limited_total", "route")
    assert counted == {"unmatched": 31}


def test_429_headers_and_retry_after_is_when_a_request_passes_again(lb_factory, backend_factory,
                                                                   tmp_path):
    backend = backend_factory()
    env = write_config(tmp_path / "lb.toml", backend.port, """
[rate_limits.slow]
rate = 1
per = 2
burst = 2
""", routes='[[routes]]\npath_prefix = "/api/"\npool = "default"\nrate_limit = "slow"\n')
    lb = lb_factory(env)
    assert statuses(lb.port, 2, path="/api/x") == [200, 200]
    status, head = get(lb.port, "/api/x")
    refused_at = time.monotonic()
    assert status == 429
    assert head["retry-after"] == ["2"]  # one token every 2 s: the next one within 2 s
    assert head["ratelimit-limit"] == ["2"]
    assert head["ratelimit-remaining"] == ["0"]
    assert head["ratelimit-reset"] == ["4"]  # two tokens to refill: full within 4 s
    assert get(lb.port, "/other")[0] == 200  # another route (no limit) is not limited
    time.sleep(max(0.0, refused_at + 0.5 - time.monotonic()))
    assert get(lb.port, "/api/x")[0] == 429  # not yet
    time.sleep(max(0.0, refused_at + 2.0 - time.monotonic()))
    assert get(lb.port, "/api/x")[0] == 200  # Retry-After later: it passes
    assert per_label(lb, "gol7lb_rate_limited_total", "route") == {"routes[0] path_prefix=/api/": 2}
    routes = wait_until(lambda: (lambda doc: doc["routes"] if doc["routes"][0]["rate_limited"]
                                 else None)(requests.get(lb.admin_url + "/status",
                                                         timeout=5).json()))
    assert routes[0]["rate_limit"] == "slow" and routes[0]["rate_limited"] == 2


def test_keys_by_header_path_client_ip_and_route(lb_factory, backend_factory, tmp_path):
    backend = backend_factory()
    env = write_config(tmp_path / "lb.toml", backend.port, """
[rate_limits.by_key]
key = "header:X-Api-Key"
rate = 2
per = 600
[rate_limits.by_path]
key = "path"
rate = 2
per = 600
[rate_limits.by_ip]
key = "client_ip"
rate = 2
per = 600
[rate_limits.by_route]
key = "route"
rate = 2
per = 600
""", routes="""
[[routes]]
path_prefix = "/key/"
pool = "default"
rate_limit = "by_key"
[[routes]]
path_prefix = "/path/"
pool = "default"
rate_limit = "by_path"
[[routes]]
path_prefix = "/ip/"
pool = "default"
rate_limit = "by_ip"
[[routes]]
path_prefix = "/route/a"
pool = "default"
rate_limit = "by_route"
[[routes]]
path_prefix = "/route/b"
pool = "default"
rate_limit = "by_route"
""")
    lb = lb_factory(env)
    port = lb.port
    # header: each value its own budget; without the header, the client address's
    assert statuses(port, 3, path="/key/x", headers={"X-Api-Key": "a"}) == [200, 200, 429]
    assert statuses(port, 3, path="/key/y", headers={"X-Api-Key": "b"}) == [200, 200, 429]
    assert statuses(port, 3, path="/key/x") == [200, 200, 429]
    assert get(port, "/key/x", source="127.0.0.2")[0] == 200
    # path: the normalised path, whoever asks
    assert statuses(port, 3, path="/path/one") == [200, 200, 429]
    assert get(port, "/path//one", source="127.0.0.3")[0] == 429  # same path, normalised
    assert statuses(port, 2, path="/path/two") == [200, 200]
    # client address: each its own budget, whatever the path
    assert [get(port, p)[0] for p in ("/ip/a", "/ip/b", "/ip/c")] == [200, 200, 429]
    assert statuses(port, 3, path="/ip/a", source="127.0.0.2") == [200, 200, 429]
    # route: one budget per route, even when two routes name the same limit
    assert [get(port, "/route/a", source=f"127.0.0.{i}")[0] for i in (1, 2, 3)] == \
        [200, 200, 429]
    assert statuses(port, 3, path="/route/b") == [200, 200, 429]


def test_budgets_survive_a_reload_and_unknown_names_are_refused(lb_factory, backend_factory,
                                                               tmp_path):
    backend = backend_factory()
    path = tmp_path / "lb.toml"
    env = write_config(path, backend.port, LIMIT_10, top='rate_limit = "ten"')
    lb = lb_factory({**env, "WEB_CONCURRENCY": "2"})
    assert Counter(statuses(lb.port, 12)) == {200: 10, 429: 2}

    def generation() -> int:
        return int(requests.get(lb.admin_url + "/status", timeout=5).json()["config"]
                   ["generation"])

    before = generation()
    doc = wait_until(lambda: (lambda d: d if d["unmatched"]["rate_limited"] == 2 else None)(
        requests.get(lb.admin_url + "/status", timeout=5).json()))
    assert doc["unmatched"]["rate_limit"] == "ten"
    assert doc["unmatched"]["rate_limited"] == 2
    assert doc["rate_limits"]["ten"] == {"key": "client_ip", "rate": 10.0, "per": 600.0,
                                         "burst": 10, "store": "local",
                                         "on_store_error": "allow"}
    # Same limit, a faster rate and a new route: the budget spent stays spent.
    write_config(path, backend.port, LIMIT_10.replace("per = 600", "per = 300"),
                 routes='[[routes]]\npath_prefix = "/x/"\npool = "default"\n',
                 top='rate_limit = "ten"')
    wait_until(lambda: generation() > before, timeout=10)
    assert get(lb.port)[0] == 429
    # A route naming a limit that does not exist: refused, the old configuration stays.
    write_config(path, backend.port, LIMIT_10, top='rate_limit = "ten"',
                 routes='[[routes]]\nhost = "a.example"\npath_prefix = "/api/"\n'
                        'pool = "default"\nrate_limit = "tne"\n')

    def last_error() -> str | None:
        return requests.get(lb.admin_url + "/status", timeout=5).json()["config"]["last_error"]

    error = wait_until(last_error, timeout=10)
    assert "routes[0].rate_limit = 'tne'" in error and "path_prefix='/api/'" in error
    assert "host='a.example'" in error and "\n" not in error
    assert get(lb.port)[0] == 429
    # SIGHUP replaces the workers; the new ones inherit the master's buckets.
    write_config(path, backend.port, LIMIT_10, top='rate_limit = "ten"')
    wait_until(lambda: last_error() is None, timeout=10)
    before_hup = {w.pid for w in workers_of(lb)}
    lb.signal(signal.SIGHUP)
    wait_until(lambda: (lambda now: len(now) == 2 and not now & before_hup)(
        {w.pid for w in workers_of(lb)}), timeout=30)
    assert get(lb.port)[0] == 429


def test_unknown_rate_limit_stops_the_start_with_one_line(backend_factory, tmp_path):
    backend = backend_factory()
    env = write_config(tmp_path / "lb.toml", backend.port, LIMIT_10,
                       routes='[[routes]]\npath_prefix = "/api/"\npool = "default"\n'
                              'rate_limit = "eleven"\n')
    result = subprocess.run(
        [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "gol7lb.wsgi",
         "--no-control-socket"], cwd=ROOT, capture_output=True, text=True, timeout=60,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PORT": str(free_port()),
             "GOL7LB_ADMIN_BIND": "", **env})
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert "routes[0].rate_limit = 'eleven'" in lines[0] and "path_prefix='/api/'" in lines[0]
    assert "rate limits are ten" in lines[0]


# -- Redis -------------------------------------------------------------------------------------


class Redis(Proc):
    """A real redis-server on a free loopback port, nothing saved, stopped by PID."""

    def __init__(self, tmp_path: Path, port: int | None = None) -> None:
        port = port or free_port()
        super().__init__(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                          "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
                         log=tmp_path / f"redis-{port}.log", port=port)
        wait_for_port(port)


@pytest.fixture
def redis_server(tmp_path):
    if shutil.which("redis-server") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("redis-server is missing in CI: tests/run.sh installs it")
        pytest.skip("redis-server is not installed (Debian: apt-get install redis-server; "
                    "tests/run.sh installs it)")
    started: list[Redis] = []

    def start(port: int | None = None) -> Redis:
        server = Redis(tmp_path, port)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()
    assert not [pid for server in started for pid in server.leftovers()]


def redis_limit(port: int, policy: str = "allow") -> str:
    return f"""
[rate_limits.shared]
key = "client_ip"
rate = 10
per = 600
burst = 10
store = "redis://127.0.0.1:{port}/0"
on_store_error = "{policy}"
"""


def test_redis_budget_is_shared_by_two_instances(lb_factory, backend_factory, redis_server,
                                                 tmp_path):
    redis = redis_server()
    backend = backend_factory()
    env = write_config(tmp_path / "lb.toml", backend.port, redis_limit(redis.port),
                       top='rate_limit = "shared"')
    first = lb_factory({**env, "WEB_CONCURRENCY": "2"})
    second = lb_factory({**env, "WEB_CONCURRENCY": "2"})
    results = []
    for _ in range(3):  # one after the other, through both
        results += [get(first.port)[0], get(second.port)[0]]
    assert results == [200] * 6
    # 24 at the same instant, half through each instance: exactly the 4 tokens left pass
    start = threading.Barrier(24)
    lock = threading.Lock()

    def one(port: int) -> None:
        start.wait()
        status = get(port)[0]
        with lock:
            results.append(status)

    threads = [threading.Thread(target=one, args=(lb.port,))
               for lb in (first, second) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert Counter(results[6:]) == {200: 4, 429: 20}
    status, head = get(second.port)
    assert status == 429 and head["ratelimit-limit"] == ["10"]
    assert int(head["retry-after"][0]) in (59, 60)  # one token a minute, by Redis's clock


@pytest.mark.parametrize("policy", ["allow", "deny"])
def test_redis_down_follows_on_store_error_and_recovers(lb_factory, backend_factory,
                                                        redis_server, tmp_path, policy):
    redis = redis_server()
    backend = backend_factory()
    env = write_config(tmp_path / "lb.toml", backend.port, redis_limit(redis.port, policy),
                       top='rate_limit = "shared"')
    lb = lb_factory({**env, "WEB_CONCURRENCY": "1"})
    assert statuses(lb.port, 3) == [200, 200, 200]
    redis.stop()
    expected = 200 if policy == "allow" else 429
    assert statuses(lb.port, 5) == [expected] * 5
    errors = per_label(lb, "gol7lb_rate_limit_store_errors_total", "limit")
    assert errors == {"shared": 5}
    if policy == "deny":  # refused: counted as rate limited too, in a valid exposition
        assert per_label(lb, "gol7lb_rate_limited_total", "route") == {"unmatched": 5}
        promtool = shutil.which("promtool")
        if promtool is not None:
            checked = subprocess.run([promtool, "check", "metrics"], input=scrape_text(lb),
                                     text=True, capture_output=True, timeout=60)
            assert checked.returncode == 0 and not checked.stdout.strip(), checked.stdout
    assert lb.output().count("rate limit store") == 1  # logged once for the outage
    assert "unreachable" in lb.output()
    # Back on the same port: within the back-off (5 s at most) limiting resumes, from an
    # empty store (a Redis that saves nothing lost the budget).
    redis_server(redis.port)
    assert _probe_until_back(lb)
    assert lb.output().count("reachable again") == 1
    assert Counter(statuses(lb.port, 11, source="127.0.0.5")) == {200: 10, 429: 1}


def _probe_until_back(lb: LB) -> bool:
    """Requests bring the store back (it is only tried on a request, after the back-off)."""
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        get(lb.port)
        if "reachable again" in lb.output():
            return True
        time.sleep(0.2)
    return False


def test_a_frozen_redis_costs_one_timeout_not_one_per_request(lb_factory, backend_factory,
                                                              redis_server, tmp_path):
    """A Redis that stops answering (SIGSTOP: connections hang, nothing is refused) costs the
    request that meets it its 0.25 s timeout; later ones skip it until the back-off ends."""
    redis = redis_server()
    backend = backend_factory()
    env = write_config(tmp_path / "lb.toml", backend.port, redis_limit(redis.port, "allow"),
                       top='rate_limit = "shared"')
    lb = lb_factory({**env, "WEB_CONCURRENCY": "1"})
    assert statuses(lb.port, 2) == [200, 200]
    redis.signal(signal.SIGSTOP)
    try:
        started = time.monotonic()
        assert statuses(lb.port, 20) == [200] * 20
        took = time.monotonic() - started
    finally:
        redis.signal(signal.SIGCONT)
    # 20 x 0.25 s = 5 s if each request waited for Redis; one timeout, a probe or two and
    # 20 quick requests take about 1 s
    assert took < 3.5, took
    errors = per_label(lb, "gol7lb_rate_limit_store_errors_total", "limit")
    assert errors == {"shared": 20}
    assert lb.output().count("unreachable") == 1


def test_redis_buckets_refill_by_the_server_clock_and_expire(redis_server):
    """The Lua script alone, against the real server: refill, the token left, the expiry
    (written in whole milliseconds even when it is very long)."""
    import redis as redis_library

    from gol7lb.ratelimit import RateLimitSpec
    from gol7lb.ratelimit_redis import RedisStore

    server = redis_server()
    store = RedisStore(f"redis://127.0.0.1:{server.port}/0")
    fast = RateLimitSpec("fast", rate=20.0, per=1.0, burst=2)
    assert [store.take(fast, b"k" * 16)[0] for _ in range(3)] == [True, True, False]
    time.sleep(0.1)  # 20 a second: two tokens back after 0.1 s
    assert store.take(fast, b"k" * 16)[0]
    huge = RateLimitSpec("huge", rate=1.0, per=86400.0, burst=10**9)
    assert store.take(huge, b"k" * 16) == (True, 10**9 - 1)
    client = redis_library.Redis(port=server.port, decode_responses=True)
    ttls = {str(key).split(":")[2]: client.pttl(key) for key in client.keys("gol7lb:rl:*")}
    assert 0 < ttls["fast"] <= 1100 and ttls["huge"] > 86400 * 1000
    client.close()
