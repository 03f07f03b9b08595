"""rise/fall bookkeeping and single checks against real sockets."""

import socket

from gol7lb.backends import parse_backend_url
from gol7lb.config import HealthSettings
from gol7lb.health import HealthTracker, http_check, tcp_check
from tests.procs import free_port


def test_first_failure_takes_an_unconfirmed_backend_out():
    tracker = HealthTracker(rise=2, fall=3)
    assert tracker.record(False) is True and tracker.alive is False


def test_fall_needs_consecutive_failures_once_confirmed():
    tracker = HealthTracker(rise=2, fall=3)
    tracker.record(True)
    assert [tracker.record(False) for _ in range(2)] == [False, False] and tracker.alive
    tracker.record(True)  # a success resets the count
    assert [tracker.record(False) for _ in range(3)] == [False, False, True]
    assert not tracker.alive


def test_rise_needs_consecutive_successes():
    tracker = HealthTracker(rise=2, fall=1, alive=False, failures=1)
    assert tracker.record(True) is False and not tracker.alive
    assert tracker.record(False) is False
    assert tracker.record(True) is False
    assert tracker.record(True) is True and tracker.alive


def test_tcp_check_against_listening_and_closed_ports():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        up = parse_backend_url(f"http://127.0.0.1:{listener.getsockname()[1]}")
        result = tcp_check(up, timeout=1.0)
        assert result.ok and result.detail == "connected"
    down = tcp_check(parse_backend_url(f"http://127.0.0.1:{free_port()}"), timeout=1.0)
    assert not down.ok and "refused" in down.detail.lower()


def test_http_check_uses_path_and_expected_statuses(backend_factory):
    backend = backend_factory()
    target = parse_backend_url(f"http://127.0.0.1:{backend.port}")
    assert http_check(target, HealthSettings(type="http")).ok
    missing = http_check(target, HealthSettings(type="http", path="/nope"))
    assert not missing.ok and missing.detail == "HTTP 404 (expected 200-399)"
    teapot = HealthSettings(type="http", path="/status/418", expect_status="418")
    assert http_check(target, teapot).ok
