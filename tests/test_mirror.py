"""Request mirroring (`mirror = { pool, percent }` on a route) through real gunicorn workers:
a shadow backend that records what it gets, a dead one and a slow one; the client's answers
and latency must not change whatever the shadow does."""

from __future__ import annotations

import socket
import statistics
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from gol7lb.config import load_settings
from gol7lb.errors import ConfigError
from tests.helpers import RawBackend, per_label
from tests.procs import LB, lb_status, wait_until
from tests.recorder import Recorder


class Shadows:
    """One LB (module-wide: an LB start is slow on a busy machine) whose routes mirror to a
    recording shadow, a dead one and a slow one; tests compare metric deltas."""

    def __init__(self, tmp: Path) -> None:
        self.main = Recorder()
        self.shadow = Recorder()
        self.stop = threading.Event()
        self.slow = RawBackend(self._slowly)
        # bound, never listening: connects are refused, and no other process can take it
        self.dead = socket.socket()
        self.dead.bind(("127.0.0.1", 0))
        self.config = tmp / "lb.toml"
        pools = {"main": self.main.port, "shadow": self.shadow.port,
                 "dead": self.dead.getsockname()[1],
                 "slow": self.slow.port}
        routes = [("/plain/", None), ("/api/", "shadow"), ("/pct/", "shadow"),
                  ("/dead/", "dead"), ("/slow/", "slow")]
        self.config.write_text("".join(
            f'[pools.{name}]\nbackends = [{{ url = "http://127.0.0.1:{port}" }}]\n'
            for name, port in pools.items()) + "".join(
            f'[[routes]]\npath_prefix = "{prefix}"\nstrip_prefix = true\npool = "main"\n'
            + (f'mirror = {{ pool = "{shadow}", percent = {25 if prefix == "/pct/" else 100} }}\n'
               if shadow else "") for prefix, shadow in routes))
        self.lb = LB({"GOL7LB_CONFIG": str(self.config), "GOL7LB_PROXY_RETRY_BUFFER": "4096",
                      "GOL7LB_HEALTH_INTERVAL": "0.2", "GOL7LB_HEALTH_TIMEOUT": "0.5"},
                     log=tmp / "lb.log")

    def _slowly(self, conn: socket.socket) -> None:
        """The slow shadow: 5 s per answer (or until the module ends)."""
        if not self.stop.wait(5.0):
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    def close(self) -> None:
        self.lb.stop()
        self.stop.set()
        for server in (self.main, self.shadow, self.slow, self.dead):
            server.close()


@pytest.fixture(scope="module")
def shadows(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shadows]:
    setup = Shadows(tmp_path_factory.mktemp("mirror"))
    try:
        setup.lb.wait_ready()
        yield setup
    finally:
        setup.close()


def mirrored(lb: LB) -> dict[str, float]:
    return per_label(lb, "gol7lb_mirror_requests_total", "result")


def settled(lb: LB, result: str, expected: float) -> None:
    """Wait until the count of `result` is `expected`, and check it stays there a moment."""
    wait_until(lambda: mirrored(lb).get(result, 0) == expected, timeout=15)
    time.sleep(0.3)
    assert mirrored(lb).get(result, 0) == expected


def test_a_copy_reaches_the_shadow_as_the_client_sent_it(shadows):
    lb, shadow = shadows.lb, shadows.shadow
    shadow.clear()
    before = mirrored(lb)
    answer = requests.post(lb.url + "/api/items?x=1", data=b"hello body",
                           headers={"Host": "shop.example", "X-Custom": "yes"}, timeout=10)
    assert answer.status_code == 200 and answer.text == "ok\n"
    wait_until(lambda: b"hello body" in shadow.data(), timeout=10)
    head, _, body = shadow.data().partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    assert lines[0] == "POST /items?x=1 HTTP/1.1"  # after strip_prefix
    fields = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    assert fields["host"] == "shop.example"
    assert fields["x-custom"] == "yes"
    assert fields["x-forwarded-for"] == "127.0.0.1"
    assert fields["x-request-id"] == answer.headers["X-Request-ID"]
    assert fields["content-length"] == "10" and body == b"hello body"
    # the main backend got the same request
    assert b"POST /items?x=1 HTTP/1.1\r\n" in shadows.main.data()
    settled(lb, "ok", before.get("ok", 0) + 1)
    # a route without mirror sends no copy; a body over proxy.retry_buffer is not copied
    shadow.clear()
    assert requests.get(lb.url + "/plain/x", timeout=10).status_code == 200
    big = b"x" * 10000
    assert requests.post(lb.url + "/api/big", data=big, timeout=10).status_code == 200
    settled(lb, "too_large", before.get("too_large", 0) + 1)
    assert mirrored(lb).get("ok", 0) == before.get("ok", 0) + 1
    assert shadow.data() == b""


def test_percent_copies_about_that_share(shadows):
    lb = shadows.lb
    before = mirrored(lb).get("ok", 0)
    with requests.Session() as session:
        for i in range(200):
            assert session.get(f"{lb.url}/pct/{i}", timeout=10).status_code == 200
    time.sleep(0.5)  # the last copies are on their way
    copies = wait_until(lambda: mirrored(lb).get("ok", 0) - before, timeout=10)
    assert 20 <= copies <= 90, copies  # 50 expected; binomial(200, 0.25) stays within


def test_a_dead_shadow_never_fails_the_client(shadows):
    lb = shadows.lb
    before = mirrored(lb).get("error", 0)
    with requests.Session() as session:
        for i in range(30):
            answer = session.post(f"{lb.url}/dead/{i}", data=b"body", timeout=10)
            assert answer.status_code == 200 and answer.text == "ok\n"
    settled(lb, "error", before + 30)


def test_a_bad_mirror_is_refused_on_reload(shadows):
    lb, config = shadows.lb, shadows.config
    good = config.read_text()
    generation = lb_status(lb)["config"]["generation"]
    config.write_text(good.replace('pool = "dead", percent', 'pool = "gone", percent'))
    try:
        error = wait_until(lambda: lb_status(lb)["config"]["last_error"], timeout=10)
        assert "routes[3].mirror.pool = 'gone'" in error and "path_prefix=/dead/" in error
        assert "\n" not in error
        assert lb_status(lb)["config"]["generation"] == generation  # the old one runs on
    finally:
        config.write_text(good)
        wait_until(lambda: lb_status(lb)["config"]["last_error"] is None, timeout=10)
    before = mirrored(lb).get("error", 0)
    assert requests.post(f"{lb.url}/dead/again", data=b"body", timeout=10).status_code == 200
    settled(lb, "error", before + 1)


def test_a_slow_shadow_never_slows_the_client(shadows):
    """Latency of the mirrored route against the plain route, interleaved in the same run,
    while the shadow takes 5 s per answer: the copies pile up, fill the queue and are
    dropped (counted), and the client does not notice. (Last in the module: copies still
    queued here end as `ok` later.)"""
    lb = shadows.lb
    plain: list[float] = []
    mirrored_times: list[float] = []
    with requests.Session() as session:  # one connection: one worker's queue fills
        for i in range(150):
            for path, times in (("/plain/x", plain), (f"/slow/{i}", mirrored_times)):
                started = time.perf_counter()
                answer = session.get(lb.url + path, timeout=10)
                times.append(time.perf_counter() - started)
                assert answer.status_code == 200 and answer.text == "ok\n"
    assert shadows.slow.requests >= 1  # the copies did go out
    # the shadow's 5 s would show in any request that waited for it
    assert max(mirrored_times) < 2.0, max(mirrored_times)
    assert statistics.median(mirrored_times) < statistics.median(plain) + 0.05, (
        statistics.median(mirrored_times), statistics.median(plain))
    # 2 sending + 128 queued < 150 on one worker: some copies were dropped
    wait_until(lambda: mirrored(lb).get("dropped", 0) > 0, timeout=10)


def write(tmp_path: Path, text: str) -> dict[str, str]:
    path = tmp_path / "lb.toml"
    path.write_text('[pools.main]\nbackends = [{ url = "http://127.0.0.1:9" }]\n' + text)
    return {"GOL7LB_CONFIG": str(path)}


@pytest.mark.parametrize(("route", "expected"), [
    ('mirror = { pool = "nope" }',
     "invalid setting routes[1].mirror.pool = 'nope' (in {path}; the route routes[1] path_prefix="
     "/api/): no such pool; pools are main"),
    ('mirror = { pool = "main", percent = 101 }',
     "invalid setting routes[1].mirror.percent = 101 (in {path}; the route routes[1] path_prefix="
     "/api/): must be a number from 0 to 100"),
    ('mirror = { pool = "main", percent = -1 }', "routes[1].mirror.percent = -1"),
    ('mirror = { pool = "main", share = 5 }', "unknown setting routes[1].mirror.share"),
    ('mirror = "main"', "routes[1].mirror = 'main'"),
    ('compress = "yes"', "invalid setting routes[1].compress = 'yes'"),
])
def test_bad_route_keys_are_refused_naming_the_route(tmp_path, route, expected):
    env = write(tmp_path, '[[routes]]\npath_prefix = "/x/"\npool = "main"\n\n'
                f'[[routes]]\npath_prefix = "/api/"\npool = "main"\n{route}\n')
    with pytest.raises(ConfigError) as refused:
        load_settings(env)
    message = str(refused.value)
    assert "\n" not in message
    assert expected.format(path=env["GOL7LB_CONFIG"]) in message


@pytest.mark.parametrize(("text", "expected"), [
    ('encodings = ["gzip", "deflate"]', "compression.encodings"),
    ('encodings = ["gzip", "gzip"]', "compression.encodings"),
    ('types = ["text"]', "compression.types"),
    ('level = "max"', "compression.level"),
    ('min_bytes = -1', "compression.min_bytes"),
])
def test_bad_compression_settings_are_refused(tmp_path, text, expected):
    with pytest.raises(ConfigError, match=expected):
        load_settings(write(tmp_path, f"[compression]\n{text}\n"))


def test_good_route_keys(tmp_path):
    settings = load_settings(write(tmp_path, '[[routes]]\npool = "main"\ncompress = true\n'
                                   'mirror = { pool = "main", percent = 12.5 }\n'))
    route = settings.routes[0]
    assert route.compress and route.mirror is not None and route.mirror.percent == 12.5
    assert route.describe()["mirror"] == {"pool": "main", "percent": 12.5}
