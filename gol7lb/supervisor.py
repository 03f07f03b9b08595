"""The supervisor process: one thread per backend runs its health checks and publishes the
results to the Manager; the generation counter moves only when some backend's liveness flips.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from typing import Any

import requests

from gol7lb.backends import Backend
from gol7lb.children import configure_child_logging, init_helper_process
from gol7lb.config import Settings
from gol7lb.health import CheckResult, HealthTracker, run_check
from gol7lb.state import SharedCounters, connect_table

log = logging.getLogger("gol7lb.supervisor")
def record_for(backend: Backend, tracker: HealthTracker, result: CheckResult | None,
               since: float, checks: int) -> dict[str, Any]:
    return {
        "url": backend.url,
        "weight": backend.weight,
        "alive": tracker.alive,
        "successes": tracker.successes,
        "failures": tracker.failures,
        "since": since,
        "checks": checks,
        "last_check": result.as_dict() if result else None,
    }


class Publisher:
    """Writes records to the Manager table and bumps the generation after liveness changes."""

    def __init__(self, table: Any, counters: SharedCounters) -> None:
        self.table = table
        self.counters = counters
        self._lock = threading.Lock()  # the generation has one writer: serialise our threads

    def publish(self, record: dict[str, Any], changed: bool) -> None:
        self.table[record["url"]] = record
        if changed:
            with self._lock:
                self.counters.bump_generation()


class BackendChecker(threading.Thread):
    """Checks one backend on its own schedule, so a black-holed one cannot delay the others."""

    def __init__(self, backend: Backend, settings: Settings, publisher: Publisher,
                 previous: dict[str, Any] | None, stop: threading.Event,
                 failed: threading.Event) -> None:
        super().__init__(name=f"check {backend.url}", daemon=True)
        self.backend = backend
        self.health = settings.health
        self.publisher = publisher
        self.stop = stop
        self.failed = failed
        if previous:  # a restarted supervisor carries on from the last published state
            self.tracker = HealthTracker(self.health.rise, self.health.fall, previous["alive"],
                                         previous["successes"], previous["failures"])
            self.since = previous["since"]
            self.checks = previous["checks"]
        else:
            self.tracker = HealthTracker(self.health.rise, self.health.fall)
            self.since = time.time()
            self.checks = 0

    def run(self) -> None:
        session = requests.Session()
        session.trust_env = False  # never route health checks through an environment proxy
        next_at = time.monotonic()
        try:
            while not self.stop.is_set():
                result = run_check(self.backend, self.health, session)
                self.checks += 1
                changed = self.tracker.record(result.ok)
                if changed:
                    self.since = time.time()
                    state = "UP" if self.tracker.alive else "DOWN"
                    level = logging.INFO if self.tracker.alive else logging.WARNING
                    log.log(level, "backend %s is %s (%s)", self.backend.url, state, result.detail)
                self.publisher.publish(
                    record_for(self.backend, self.tracker, result, self.since, self.checks),
                    changed)
                next_at = max(next_at + self.health.interval, time.monotonic())
                self.stop.wait(next_at - time.monotonic())
        except Exception as e:  # the Manager went away: exit so the master restarts us
            log.error("supervisor cannot publish health of %s: %s", self.backend.url, e)
            self.failed.set()
            self.stop.set()
        finally:
            session.close()


def run(settings: Settings, address: Any, authkey: bytes, counters_array: Any) -> None:
    """Entry point of the supervisor process (started with the spawn method by the master)."""
    init_helper_process()
    configure_child_logging()
    stop = threading.Event()
    failed = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    parent = os.getppid()

    table = connect_table(address, authkey)
    previous = table.copy()
    publisher = Publisher(table, SharedCounters(counters_array))
    checkers = [BackendChecker(b, settings, publisher, previous.get(b.url), stop, failed)
                for b in settings.backends]
    for checker in checkers:
        checker.start()
    log.info("supervisor checking %d backends (%s every %gs, timeout %gs, rise %d, fall %d)",
             len(checkers), settings.health.type, settings.health.interval,
             settings.health.timeout, settings.health.rise, settings.health.fall)
    while not stop.wait(0.5):
        if os.getppid() != parent:
            log.warning("supervisor: the master is gone; exiting")
            break
    stop.set()
    for checker in checkers:
        checker.join(timeout=settings.health.timeout + 1)
    sys.exit(1 if failed.is_set() else 0)
