"""One health check (TCP connect or HTTP GET) and the rise/fall bookkeeping of one backend."""

from __future__ import annotations

import socket
import time
from dataclasses import asdict, dataclass
from typing import Any

import requests

from gol7lb.backends import Backend
from gol7lb.config import HealthSettings


@dataclass(frozen=True)
class CheckResult:
    ok: bool
    detail: str  # "connected", "HTTP 200", or the reason it failed
    duration: float  # seconds
    at: float  # wall-clock time the check finished, for /status

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def tcp_check(backend: Backend, timeout: float) -> CheckResult:
    started = time.monotonic()
    try:
        with socket.create_connection(backend.address, timeout=timeout):
            ok, detail = True, "connected"
    except TimeoutError:
        ok, detail = False, f"connect timed out after {timeout:g}s"
    except OSError as e:
        ok, detail = False, e.strerror or str(e)
    return CheckResult(ok, detail, time.monotonic() - started, time.time())


def http_check(backend: Backend, settings: HealthSettings,
               session: requests.Session) -> CheckResult:
    started = time.monotonic()
    try:
        response = session.get(
            f"http://{backend.netloc}{settings.path}", timeout=settings.timeout,
            allow_redirects=False, stream=True,
        )
        response.close()
        ok = any(lo <= response.status_code <= hi for lo, hi in settings.status_ranges)
        detail = f"HTTP {response.status_code}"
    except requests.Timeout:
        ok, detail = False, f"timed out after {settings.timeout:g}s"
    except requests.RequestException as e:
        ok, detail = False, type(e).__name__
    return CheckResult(ok, detail, time.monotonic() - started, time.time())


def run_check(backend: Backend, settings: HealthSettings, session: requests.Session) -> CheckResult:
    if settings.type == "http":
        return http_check(backend, settings, session)
    return tcp_check(backend, settings.timeout)


class HealthTracker:
    """rise/fall hysteresis, so one lost packet does not flap a backend.

    A backend starts up but unconfirmed (like HAProxy): the first failed check takes it out,
    after that `fall` consecutive failures do, and `rise` consecutive successes bring it back.
    """

    def __init__(self, rise: int, fall: int, alive: bool = True,
                 successes: int = 0, failures: int | None = None) -> None:
        self.rise = rise
        self.fall = fall
        self.alive = alive
        self.successes = successes
        self.failures = fall - 1 if failures is None else failures

    def record(self, ok: bool) -> bool:
        """Count one result; True when it changed the liveness."""
        if ok:
            self.successes += 1
            self.failures = 0
            if not self.alive and self.successes >= self.rise:
                self.alive = True
                return True
        else:
            self.failures += 1
            self.successes = 0
            if self.alive and self.failures >= self.fall:
                self.alive = False
                return True
        return False
