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
from tests.helpers import per_label
from tests.procs import LB, free_port, lb_status, wait_until
from tests.recorder import Recorder


class SlowShadow:
    """Answers every request after `delay` seconds (one thread per connection)."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(256)
        self.port = self.sock.getsockname()[1]
        self.got = 0
        self.stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(30)
            try:
                while conn.recv(65536):
                    self.got += 1
                    if self.stop.wait(self.delay):
                        return
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            except OSError:
                pass

    def close(self) -> None:
        self.stop.set()
        self.sock.close()


def start_lb(tmp: Path, main: int, shadow: int, percent: float = 100, env: dict | None = None,
             ) -> LB:
    path = tmp / "lb.toml"
    path.write_text(f"""
[pools.main]
backends = [{{ url = "http://127.0.0.1:{main}" }}]

[pools.shadow]
backends = [{{ url = "http://127.0.0.1:{shadow}" }}]

[[routes]]
path_prefix = "/plain/"
pool = "main"

[[routes]]
path_prefix = "/api/"
strip_prefix = true
pool = "main"
mirror = {{ pool = "shadow", percent = {percent} }}
""")
    return LB({"GOL7LB_CONFIG": str(path), "GOL7LB_PROXY_RETRY_BUFFER": "4096",
               "GOL7LB_HEALTH_INTERVAL": "0.2", "GOL7LB_HEALTH_TIMEOUT": "0.5",
               **(env or {})}, log=tmp / "lb.log").wait_ready()


@pytest.fixture
def main_backend() -> Iterator[Recorder]:
    rec = Recorder()
    yield rec
    rec.close()


@pytest.fixture
def lbs() -> Iterator[list[LB]]:
    started: list[LB] = []
    yield started
    for lb in started:
        lb.stop()


def mirrored(lb: LB) -> dict[str, float]:
    return per_label(lb, "gol7lb_mirror_requests_total", "result")


def test_a_copy_reaches_the_shadow_as_the_client_sent_it(tmp_path, main_backend, lbs):
    shadow = Recorder()
    try:
        lb = start_lb(tmp_path, main_backend.port, shadow.port)
        lbs.append(lb)
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
        assert fields["content-length"] == "10" and body == b"hello body"
        # the main backend got the same request
        assert main_backend.data().split(b"\r\n", 1)[0] == b"POST /items?x=1 HTTP/1.1"
        # a route without mirror sends no copy
        shadow.clear()
        assert requests.get(lb.url + "/plain/x", timeout=10).status_code == 200
        wait_until(lambda: mirrored(lb).get("ok") == 1, timeout=10)
        # a body over proxy.retry_buffer is not copied, and counted
        big = b"x" * 10000
        assert requests.post(lb.url + "/api/big", data=big, timeout=10).status_code == 200
        wait_until(lambda: mirrored(lb).get("too_large") == 1, timeout=10)
        time.sleep(0.3)  # nothing more may arrive: the plain route and the big body
        assert shadow.data() == b""
    finally:
        shadow.close()


def test_percent_copies_about_that_share(tmp_path, main_backend, lbs):
    shadow = Recorder()
    try:
        lb = start_lb(tmp_path, main_backend.port, shadow.port, percent=25)
        lbs.append(lb)
        with requests.Session() as session:
            for i in range(200):
                assert session.get(f"{lb.url}/api/{i}", timeout=10).status_code == 200
        wait_until(lambda: sum(mirrored(lb).values()) >= 20, timeout=10)
        time.sleep(0.3)
        copies = mirrored(lb).get("ok", 0)
        assert 20 <= copies <= 90, copies  # 50 expected; binomial(200, 0.25) is within
    finally:
        shadow.close()


def test_a_dead_shadow_never_fails_the_client(tmp_path, main_backend, lbs):
    dead = free_port()  # nothing listens there
    lb = start_lb(tmp_path, main_backend.port, dead)
    lbs.append(lb)
    with requests.Session() as session:
        for i in range(30):
            answer = session.post(f"{lb.url}/api/{i}", data=b"body", timeout=10)
            assert answer.status_code == 200 and answer.text == "ok\n"
    wait_until(lambda: mirrored(lb).get("error", 0) == 30, timeout=15)
    assert "ok" not in mirrored(lb)
    # on reload, an unknown mirror pool is refused with one line and the old config stays
    config = tmp_path / "lb.toml"
    config.write_text(config.read_text().replace('pool = "shadow", percent', 'pool = "gone", '
                                                 'percent'))
    error = wait_until(lambda: lb_status(lb)["config"]["last_error"], timeout=10)
    assert "routes[1].mirror.pool = 'gone'" in error and "path_prefix '/api/'" in error
    assert "\n" not in error
    assert requests.post(f"{lb.url}/api/again", data=b"body", timeout=10).status_code == 200
    wait_until(lambda: mirrored(lb).get("error", 0) == 31, timeout=15)


def test_a_slow_shadow_never_slows_the_client(tmp_path, main_backend, lbs):
    """Latency of the mirrored route against the plain route, interleaved in the same run,
    while the shadow takes 5 s per answer: the copies pile up, fill the queues and are
    dropped (counted), and the client does not notice."""
    slow = SlowShadow(5.0)
    try:
        lb = start_lb(tmp_path, main_backend.port, slow.port)
        lbs.append(lb)
        plain: list[float] = []
        mirrored_times: list[float] = []
        with requests.Session() as session:
            for i in range(200):
                for path, times in (("/plain/x", plain), (f"/api/{i}", mirrored_times)):
                    started = time.perf_counter()
                    answer = session.get(lb.url + path, timeout=10)
                    times.append(time.perf_counter() - started)
                    assert answer.status_code == 200 and answer.text == "ok\n"
        assert slow.got >= 2  # the copies did go out
        # the shadow's 5 s would show in any request that waited for it
        assert max(mirrored_times) < 2.0, max(mirrored_times)
        assert statistics.median(mirrored_times) < statistics.median(plain) + 0.05, (
            statistics.median(mirrored_times), statistics.median(plain))
        # 2 workers x (2 sending + 128 queued) < 200: some copies were dropped
        wait_until(lambda: mirrored(lb).get("dropped", 0) > 0, timeout=10)
    finally:
        slow.close()


def write(tmp_path: Path, text: str) -> dict[str, str]:
    path = tmp_path / "lb.toml"
    path.write_text('[pools.main]\nbackends = [{ url = "http://127.0.0.1:9" }]\n' + text)
    return {"GOL7LB_CONFIG": str(path)}


@pytest.mark.parametrize(("route", "expected"), [
    ('mirror = { pool = "nope" }',
     "invalid setting routes[1].mirror.pool = 'nope' (in {path}; the route for path_prefix "
     "'/api/'): no such pool; pools are main"),
    ('mirror = { pool = "main", percent = 101 }',
     "invalid setting routes[1].mirror.percent = 101 (in {path}; the route for path_prefix "
     "'/api/'): must be a number from 0 to 100"),
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
