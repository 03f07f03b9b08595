"""What one attempt's failure means, decided in one place: the client's status and whether it
may go to another backend (`proxy.retry_on`). Every Outcome is the backend's failure, so each
counts for passive health (Envoy's outlier detection: connect failure, timeout, reset,
502/503/504 from it); a client's broken body never becomes one, and neither does the LB's own
lack of resources (LocalResourceError: no descriptor for a backend socket).

Each failure also names its access-log response flag (Envoy's short codes; docs/operations.md,
Access log): UF connect failure, UT timeout, UR reset/closed before answering, UPE invalid answer,
U5 a 502/503/504 from the backend.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Collection
from dataclasses import dataclass
from typing import Literal

from gol7lb.upstream import CLOSED, TIMED_OUT, ConnectFailed, UpstreamProtocolError

# What failed: each kind but bad-response is also a `proxy.retry_on` condition.
OutcomeKind = Literal["connect-failure", "timeout", "reset", "502", "503", "504", "bad-response"]


@dataclass(frozen=True, slots=True)
class Outcome:
    kind: OutcomeKind
    status: int  # what the client gets when no other backend takes the request
    message: str  # the client's error body (and the log's reason)
    flag: str  # the access log's response flag


def classify_error(error: BaseException) -> Outcome:
    """An exception from connecting, sending the request or reading the response head."""
    if isinstance(error, ConnectFailed):
        if error.timed_out:
            return Outcome("connect-failure", 504, "backend connect timed out", "UF")
        return Outcome("connect-failure", 502, "no backend accepted the connection", "UF")
    if isinstance(error, TIMED_OUT):
        return Outcome("timeout", 504, "backend timed out", "UT")
    if isinstance(error, CLOSED):  # a reset, or an EOF (TLS: one without close_notify)
        return Outcome("reset", 502, "bad gateway", "UR")
    if isinstance(error, UpstreamProtocolError | OSError):
        return Outcome("bad-response", 502, "bad gateway", "UPE")
    raise error


_STATUS_KINDS: dict[int, OutcomeKind] = {502: "502", 503: "503", 504: "504"}
RETRY_STATUSES = frozenset(_STATUS_KINDS)


def classify_status(status: int) -> Outcome | None:
    """A backend's own 502/503/504 is a failure for retry_on and passive health; the client
    gets the backend's answer when no other backend takes the request."""
    kind = _STATUS_KINDS.get(status)
    if kind is not None:
        return Outcome(kind, status, f"backend answered {status}", "U5")
    return None


def may_retry(outcome: Outcome, retry_on: Collection[str], replayable: bool,
              idempotent_without_body: bool) -> bool:
    """Whether another backend may take the request after this outcome.

    A connect failure reached no backend, so it is always safe; anything later needs the
    request to be sent again whole (no body, or a body kept in `retry_buffer`). A reset of an
    idempotent request without a body is retried even when `reset` is not listed, as nginx
    does by default: the backend died under it and nothing else can have happened twice.
    """
    if outcome.kind == "connect-failure":
        return outcome.kind in retry_on
    if outcome.kind == "reset" and idempotent_without_body:
        return True
    return replayable and outcome.kind in retry_on


class Episode:
    """A condition worth one log line when it begins, not one per occurrence (an LB out of
    descriptors, metrics files it cannot write): it ends after `quiet` seconds without one."""

    def __init__(self, quiet: float = 10.0) -> None:
        self.quiet = quiet
        self._last = -float("inf")
        self._lock = threading.Lock()

    def begins(self) -> bool:
        """Note one occurrence; True when it starts a new episode (then log it)."""
        now = time.monotonic()
        with self._lock:
            new = now - self._last > self.quiet
            self._last = now
        return new
