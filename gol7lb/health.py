"""One health check (TCP connect or HTTP GET) and the rise/fall bookkeeping of one backend.

HTTP checks go through the proxy's own upstream code (gol7lb.upstream: the same connect, the
same request head, the same llhttp response parser), so the LB has one HTTP client stack and a
check sees a backend exactly as the proxy will.
"""

from __future__ import annotations

import socket
import ssl
import time
from dataclasses import asdict, dataclass
from typing import Any, cast

from gol7lb.backends import Backend
from gol7lb.config import HealthSettings
from gol7lb.upstream import (
    ConnectFailed,
    UpstreamProtocolError,
    UpstreamResponse,
    open_connection,
    request_head,
)

MAX_CHECK_BODY = 64 * 1024  # expect_body is looked for in this much of the body
USER_AGENT = "gol7lb-health-check"


@dataclass(frozen=True)
class CheckResult:
    ok: bool
    detail: str  # "connected", "HTTP 200", or the reason it failed
    duration: float  # seconds
    at: float  # wall-clock time the check finished, for /status

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def tcp_check(backend: Backend, timeout: float, tls: ssl.SSLContext | None = None,
              prelude: bytes = b"") -> CheckResult:
    """A connect succeeds (for an https:// backend: and its TLS handshake, verified; for a
    pool that sends the PROXY protocol: after a LOCAL header, as the backend expects one)."""
    started = time.monotonic()
    try:
        open_connection(backend, timeout, timeout, tls, prelude).close()
        ok, detail = True, "connected"
    except ConnectFailed as e:
        ok, detail = False, str(e)
    except OSError as e:
        ok, detail = False, e.strerror or str(e)
    return CheckResult(ok, detail, time.monotonic() - started, time.time())


class _DeadlineSocket:
    """What UpstreamResponse reads from: each recv() may wait only for what is left of the
    check's time, so a backend that trickles bytes cannot stretch a check past its timeout."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock = sock
        self.deadline = deadline

    def settle(self) -> None:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("health check deadline passed")
        self.sock.settimeout(left)

    def recv(self, size: int) -> bytes:
        self.settle()
        return self.sock.recv(size)


def _http_verdict(backend: Backend, settings: HealthSettings, deadline: float,
                  timeout: float, tls: ssl.SSLContext | None,
                  prelude: bytes) -> tuple[bool, str]:
    """GET settings.path on a fresh connection (Connection: close), never following a redirect."""
    sock = open_connection(backend, timeout, timeout, tls, prelude)
    try:
        reader = _DeadlineSocket(sock, deadline)
        reader.settle()
        sock.sendall(request_head("GET", settings.path, {
            "Host": settings.host or backend.netloc,
            "User-Agent": USER_AGENT,
            "Accept": "*/*",
            "Connection": "close",
        }))
        # UpstreamResponse only ever calls recv() on what it is given.
        response = UpstreamResponse(cast(socket.socket, reader), "GET")
        response.read_head()
        if not any(lo <= response.status <= hi for lo, hi in settings.status_ranges):
            return False, f"HTTP {response.status} (expected {settings.expect_status})"
        if settings.expect_body:
            wanted = settings.expect_body.encode()
            body = bytearray()
            while len(body) < MAX_CHECK_BODY and wanted not in body:
                block = response.read_block()
                if not block:
                    break
                body += block
            if wanted not in body[:MAX_CHECK_BODY]:
                return False, f"body lacks {settings.expect_body!r}"
        return True, f"HTTP {response.status}"
    finally:
        sock.close()


def http_check(backend: Backend, settings: HealthSettings, tls: ssl.SSLContext | None = None,
               prelude: bytes = b"") -> CheckResult:
    """Pass when the status is in expect_status and, if expect_body is set, the first 64 KiB
    of the body contain it. Connect, send and read together take at most settings.timeout.
    `tls` and `prelude` as for tcp_check."""
    timeout = settings.timeout
    started = time.monotonic()
    try:
        ok, detail = _http_verdict(backend, settings, started + timeout, timeout, tls, prelude)
    except ConnectFailed as e:
        ok, detail = False, f"timed out after {timeout:g}s" if e.timed_out else str(e)
    except TimeoutError:
        ok, detail = False, f"timed out after {timeout:g}s"
    except UpstreamProtocolError as e:
        ok, detail = False, str(e)
    except OSError as e:
        ok, detail = False, e.strerror or str(e) or type(e).__name__
    except Exception as e:  # e.g. a path that is not latin-1: fail the check, keep the thread
        ok, detail = False, f"check failed: {e or type(e).__name__}"
    return CheckResult(ok, detail, time.monotonic() - started, time.time())


def run_check(backend: Backend, settings: HealthSettings, tls: ssl.SSLContext | None = None,
              prelude: bytes = b"") -> CheckResult:
    if settings.type == "http":
        return http_check(backend, settings, tls, prelude)
    return tcp_check(backend, settings.timeout, tls, prelude)


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


@dataclass(frozen=True)
class HealthRecord:
    """What is known of one backend's active checks. The supervisor publishes a new one after
    every check; the control state keeps one per running address and every snapshot carries
    them through the Manager (pickled: keep it small). The defaults are what a backend with no
    record yet is taken to be: up, never checked."""

    alive: bool = True
    successes: int = 0  # the rise/fall streaks, so a restarted supervisor carries on
    failures: int | None = None  # None: fall - 1 (up but unconfirmed, see HealthTracker)
    since: float | None = None  # when the liveness last flipped (None: unknown, e.g. restored)
    up_since: float = 0.0  # when it last came back up (0: up since the start): slow start
    checks: int = 0
    last_check: CheckResult | None = None

    @classmethod
    def initial(cls, alive: bool, rise: int, fall: int) -> HealthRecord:
        """What the supervisor starts a backend's checks from.

        At start every backend is up but unconfirmed (as in HAProxy: the first failed check
        takes it out). One that appears later (reload, API) is down until its first check
        passes.
        """
        return cls(alive, successes=0 if alive else rise - 1,
                   failures=fall - 1 if alive else 0, since=time.time())

    def tracker(self, rise: int, fall: int) -> HealthTracker:
        """The rise/fall state to carry on from."""
        return HealthTracker(rise, fall, self.alive, self.successes, self.failures)

    def last_check_dict(self) -> dict[str, Any] | None:
        """The last check as /status shows it."""
        return self.last_check.as_dict() if self.last_check else None
