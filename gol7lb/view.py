"""A process's view of the shared state: it touches the Manager only when the generation
counter has moved. GenerationFollower for helpers, CachedView (with back-off and a fallback)
for workers."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Generic, TypeVar

from gol7lb.control import Snapshot
from gol7lb.counters import GENERATION, SharedCounters
from gol7lb.manager import ControlClient

log = logging.getLogger("gol7lb.manager")  # GenerationFollower's outage line, as before
view_log = logging.getLogger("gol7lb.state")  # a process that reads the shared state

MANAGER_RETRY_SECONDS = 0.1  # after a failed Manager read, serve the last snapshot this long
MANAGER_RETRY_MAX_SECONDS = 2.0  # ... doubling while it keeps failing, up to this
FIRST_READ_SECONDS = 5.0  # how long a new worker waits for its first state read
REFRESH_WAIT_SECONDS = 0.1  # a request waits this long at most for a refresh under way


T = TypeVar("T")


class GenerationFollower(Generic[T]):
    """Follows the shared generation counter for a helper (or the master): `poll()` reads the
    state (`read`, a bounded Manager call) only when the counter moved since the last good
    read, and hands what it read to `on_change`. The counter is read before the state, so a
    change made during a read is never skipped. A failed read is tried again at the next
    poll; it is logged once per outage as `<who> cannot read shared state` (who=None: not at
    all). A worker's view with its back-off and fallback is CachedView."""

    def __init__(self, generation: Callable[[], int], read: Callable[[], T],
                 on_change: Callable[[T], object], who: str | None = None) -> None:
        self.generation = generation
        self.read = read
        self.on_change = on_change
        self.who = who
        self.seen = -1
        self.failing = False

    def moved(self) -> bool:
        return self.generation() != self.seen

    def poll(self) -> bool:
        """Read and apply the state if the generation moved; whether it did both."""
        generation = self.generation()
        if generation == self.seen:
            return False
        try:
            value = self.read()
        except Exception as e:  # the Manager is restarting or frozen: next time
            if self.who is not None and not self.failing:
                log.error("%s cannot read shared state: %s", self.who, e or type(e).__name__)
            self.failing = True
            return False
        self.failing = False
        self.seen = generation
        self.on_change(value)
        return True

    def start(self, interval: float, name: str) -> threading.Thread:
        """Poll every `interval` seconds in a daemon thread, for a process that follows the
        state for nothing else."""

        def run() -> None:
            while True:
                self.poll()
                time.sleep(interval)

        thread = threading.Thread(target=run, name=name, daemon=True)
        thread.start()
        return thread


class CachedView(Generic[T]):
    """A worker's (or helper's) cached state: one shared-memory read per use, IPC only when
    the generation moved. `build(snapshot, previous)` turns a snapshot into what the caller
    serves from (the proxy builds its policies; the view holds data only)."""

    def __init__(self, counters: SharedCounters, client: ControlClient,
                 build: Callable[[Snapshot, T | None], T], fallback: Callable[[], T]) -> None:
        self.counters = counters
        self.client = client
        self._build = build
        self._snapshot: Snapshot | None = None
        self._seen = -1
        self._refresh_lock = threading.Lock()
        self._next_retry = 0.0
        self._retry_delay = 0.0
        self._failing = False
        self._current: T | None = None
        deadline = time.monotonic() + FIRST_READ_SECONDS
        while self._current is None and time.monotonic() < deadline:
            if not self._read(timeout=max(0.05, deadline - time.monotonic())):
                time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))
        if self._current is None:  # the Manager is down: serve the configuration we started with
            view_log.error("no shared state after %gs; serving the start-up configuration with "
                      "every backend assumed up", FIRST_READ_SECONDS)
            self._current = fallback()

    def current(self) -> T:
        if self.counters.array[GENERATION] != self._seen:
            self._refresh()
        return self._current  # type: ignore[return-value]

    def stale(self) -> bool:
        """Whether the shared state moved since the last read (one shared-memory read)."""
        return bool(self.counters.array[GENERATION] != self._seen)

    def peek(self) -> T:
        """The state in hand, never refreshed here (no IPC): for a caller that must not wait,
        such as the worker's event loop; the requests keep it current."""
        return self._current  # type: ignore[return-value]

    def rebuild(self) -> T:
        """Build again from the snapshot in hand (no IPC): for state that changes with time
        alone, like a slow-start ramp."""
        if self._snapshot is not None and self._refresh_lock.acquire(blocking=False):
            try:
                self._current = self._build(self._snapshot, self._current)
            finally:
                self._refresh_lock.release()
        return self._current  # type: ignore[return-value]

    def _refresh(self) -> None:
        """One thread reads; the others wait for it briefly (a read takes well under a
        millisecond), so a request that comes after a change is served by the new state;
        only when the Manager is slow do they go on with the previous snapshot."""
        if not self._refresh_lock.acquire(timeout=REFRESH_WAIT_SECONDS):
            return
        try:
            if self.counters.array[GENERATION] != self._seen and \
                    time.monotonic() >= self._next_retry:
                self._read()
        finally:
            self._refresh_lock.release()

    def _read(self, timeout: float | None = None) -> bool:
        generation = self.counters.array[GENERATION]  # read before the state: never skip one
        try:
            snapshot = self.client.snapshot(timeout)
        except Exception as e:  # the Manager is gone, restarting or frozen: keep the last one
            # a frozen Manager costs the reading thread a whole call bound: back off
            self._retry_delay = min(MANAGER_RETRY_MAX_SECONDS,
                                    max(MANAGER_RETRY_SECONDS, 2 * self._retry_delay))
            self._next_retry = time.monotonic() + self._retry_delay
            if self._current is not None and not self._failing:
                view_log.error("cannot read shared state from the manager (%s); serving from the "
                          "last known state until it is back", e or type(e).__name__)
            self._failing = True
            return False
        self._retry_delay = 0.0
        if self._failing:
            view_log.info("shared state readable again")
            self._failing = False
        self._current = self._build(snapshot, self._current)
        self._snapshot = snapshot
        self._seen = generation
        return True
