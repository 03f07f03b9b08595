"""The supervisor process: one thread per backend runs its health checks and publishes the
results to the control state; the generation counter moves only when some backend's liveness
flips. It follows the running configuration (reloads, backends added or removed through the
admin API): a backend that stays keeps its checker and its rise/fall state.

If the Manager goes away it keeps checking and publishes again once the Manager is back, so
health checking never stops for good.
"""

from __future__ import annotations

import contextlib
import logging
import os
import ssl
import sys
import threading
import time

from gol7lb import logfmt, metrics, proxyproto, upstreamtls
from gol7lb.backends import Backend
from gol7lb.children import helper_main
from gol7lb.config import HealthSettings
from gol7lb.control import Snapshot
from gol7lb.counters import SharedCounters
from gol7lb.health import CheckResult, HealthRecord, run_check
from gol7lb.manager import ControlClient
from gol7lb.view import GenerationFollower

log = logging.getLogger("gol7lb.supervisor")
RECONCILE_SECONDS = 0.25  # how often the generation counter is looked at (a shared-memory read)


class BackendChecker(threading.Thread):
    """Checks one backend on its own schedule, so a black-holed one cannot delay the others."""

    def __init__(self, backend: Backend, health: HealthSettings, client: ControlClient,
                 record: HealthRecord, stop: threading.Event) -> None:
        super().__init__(name=f"check {backend.id}", daemon=True)
        self.backend = backend
        self.health = health
        self.client = client
        self.stop = stop
        self.tls: ssl.SSLContext | None = None  # https:// backends (set by the Supervisor)
        self.prelude = b""  # a PROXY LOCAL header, for a backend whose pool sends them
        self.retired = threading.Event()
        self.tracker = record.tracker(health.rise, health.fall)
        self.since = record.since or time.time()
        self.up_since = record.up_since
        self.checks = record.checks
        self.unpublished = False
        self._checks_ok = metrics.HEALTH_CHECKS.labels(backend.id, "ok")
        self._checks_fail = metrics.HEALTH_CHECKS.labels(backend.id, "fail")
        self._duration = metrics.HEALTH_CHECK_DURATION.labels(backend.id)

    def update(self, backend: Backend, health: HealthSettings) -> None:
        """A reload kept this address: new weight or health settings, same rise/fall state."""
        self.backend = backend
        self.health = health
        self.tracker.rise, self.tracker.fall = health.rise, health.fall

    def run(self) -> None:
        next_at = time.monotonic()
        while not (self.stop.is_set() or self.retired.is_set()):
            result = run_check(self.backend, self.health, self.tls, self.prelude)
            self.checks += 1
            (self._checks_ok if result.ok else self._checks_fail).inc()
            self._duration.observe(result.duration)
            changed = self.tracker.record(result.ok)
            if changed:
                self.since = time.time()
                if self.tracker.alive:
                    self.up_since = self.since
                state = "UP" if self.tracker.alive else "DOWN"
                level = logging.INFO if self.tracker.alive else logging.WARNING
                log.log(level, "backend %s is %s (%s)", self.backend.id, state, result.detail)
            self._publish(result, changed)
            next_at = max(next_at + self.health.interval, time.monotonic())
            if self.retired.wait(max(0.0, next_at - time.monotonic())):
                break

    def _publish(self, result: CheckResult | None, changed: bool) -> None:
        tracker = self.tracker
        record = HealthRecord(tracker.alive, tracker.successes, tracker.failures, self.since,
                              self.up_since, self.checks, result)
        try:
            self.client.call("publish_health", self.backend.id, record,
                             changed or self.unpublished)
            self.unpublished = False
        except Exception as e:  # the Manager is restarting: publish again after the next check
            if not self.unpublished:
                log.error("supervisor cannot publish health of %s: %s", self.backend.id,
                          e or type(e).__name__)
            self.unpublished = True


class Supervisor:
    """Keeps one checker per running backend address."""

    def __init__(self, client: ControlClient, counters: SharedCounters,
                 stop: threading.Event | None = None) -> None:
        self.client = client
        self.counters = counters
        self.stop = stop or threading.Event()
        self.checkers: dict[str, BackendChecker] = {}
        self._snapshot: Snapshot | None = None
        self._follower = GenerationFollower(lambda: counters.generation, client.snapshot,
                                            self.apply, "supervisor")

    def reconcile(self) -> None:
        if self._follower.moved():
            self._follower.poll()
        else:
            self._expire_ejections()

    def _expire_ejections(self) -> None:
        """Passive-health ejections end on time: the supervisor is the clock that ends them."""
        snapshot = self._snapshot
        if snapshot is None or not snapshot.ejected:
            return
        if min(snapshot.ejected.values()) <= time.time():
            try:
                self.client.call("expire_ejections")
            except Exception as e:
                log.error("supervisor cannot end ejections: %s", e or type(e).__name__)

    def apply(self, snapshot: Snapshot) -> None:
        self._snapshot = snapshot
        logfmt.apply(snapshot.settings.log)
        health = snapshot.settings.health
        running = snapshot.backends()
        tls, preludes = _edge(snapshot)
        for backend_id in list(self.checkers):
            if backend_id not in running:
                self.checkers.pop(backend_id).retired.set()
        for backend_id, backend in running.items():
            checker = self.checkers.get(backend_id)
            fresh = checker is None
            if checker is None:
                record = snapshot.health_of(backend_id)
                checker = BackendChecker(backend, health, self.client, record, self.stop)
                self.checkers[backend_id] = checker
            else:
                checker.update(backend, health)
            checker.tls = tls if backend.tls else None
            checker.prelude = preludes.get(backend_id, b"")
            if fresh:
                checker.start()

    def run(self) -> None:
        while not self.stop.is_set():
            self.counters.beat()
            self.reconcile()
            self.stop.wait(RECONCILE_SECONDS)
        self.stop.set()
        for checker in self.checkers.values():
            checker.retired.set()
        deadline = time.monotonic() + 2.0
        for checker in self.checkers.values():
            checker.join(timeout=max(0.0, deadline - time.monotonic()))


def _edge(snapshot: Snapshot) -> tuple[ssl.SSLContext | None, dict[str, bytes]]:
    """The configuration's TLS context for https:// backends (None when there is none), and
    the PROXY header a check sends to each backend of a pool with `send_proxy_protocol`: a
    LOCAL one (v1 UNKNOWN), which tells the backend to use the connection's own addresses."""
    pools = snapshot.pools.values()
    tls = None
    if any(b.tls for pool in pools for b in pool.backends):
        try:
            tls = upstreamtls.context(snapshot.settings.proxy)
        except Exception as e:  # checks then fail with the reason; the supervisor goes on
            log.error("no TLS context for https backends: %s", e)
    preludes: dict[str, bytes] = {}
    for pool in pools:
        if pool.send_proxy_protocol:
            for backend in pool.backends:
                preludes.setdefault(backend.id, proxyproto.build_local(pool.send_proxy_protocol))
    return tls, preludes


def run(address: str, authkey: bytes, counters: SharedCounters) -> None:
    """Entry point of the supervisor process (spawned by the master, restarted if it dies)."""
    stop = helper_main("supervisor")
    supervisor = Supervisor(ControlClient(address, authkey), counters, stop)
    with contextlib.suppress(Exception):  # log settings may have changed since the spawn
        logfmt.apply(supervisor.client.snapshot().settings.log)
    log.info("supervisor started (pid %d)", os.getpid())
    supervisor.run()
    sys.exit(0)
