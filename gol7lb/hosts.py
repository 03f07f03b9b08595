"""Per-backend runtime counters keyed by address, shared by every worker (Caddy's host table).

Each backend address owns a *host slot* (assigned by the control state in the Manager and kept
across reloads); each worker owns a *worker slot* (assigned by the master before fork). The
counters live in one anonymous shared-memory array laid out [host slot][worker slot][field],
so every cell has exactly one writing process and no cross-process lock is ever taken: a
worker killed mid-request cannot freeze anybody. Readers (the admin listener, the balancer's
least-connections view) sum a host's cells over all worker slots.

Passive health's cells live here too, one row per host shared by every worker: the failure
streak, and the ejection (until when, how many in a row); its decisions are outlier.py's.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import threading
import time
from collections.abc import Iterator
from multiprocessing.sharedctypes import RawArray
from typing import Any, NamedTuple

IN_FLIGHT, REQUESTS, FAILURES = range(3)
_FIELDS = 3
# Shared by every worker: consecutive failures and since when (monotonic ms); the end of the
# current or last ejection (Unix ms) and how many ejections in a row (the cooldown doubles).
STREAK, STREAK_START, EJECTED_UNTIL, EJECTIONS = range(4)
SHARED_FIELDS = 4
HOST_SLOTS = 1024  # addresses tracked at once (backends of every pool, past and present)


class HostTotals(NamedTuple):
    in_flight: int
    requests: int
    failures: int


class PoolPeers(NamedTuple):
    """Host slots of one pool holding a backend: all of them, and those that may take
    requests by the last snapshot (up, not drained); the shared cells say who is ejected."""

    members: tuple[int, ...]
    available: tuple[int, ...]


class HostTable:
    """The shared array; created by the master before any worker or helper exists."""

    def __init__(self, worker_slots: int, host_slots: int = HOST_SLOTS,
                 array: Any | None = None, shared: Any | None = None,
                 lock_path: str = "") -> None:
        self.worker_slots = worker_slots
        self.host_slots = host_slots
        self.array = array if array is not None else RawArray(
            ctypes.c_int64, host_slots * worker_slots * _FIELDS)
        # Passive-health streaks: written by every worker without a lock on purpose; a lost
        # update only moves an ejection by one failure, and no writer can freeze the others.
        # Ejections are written under a byte-range lock (rare), read by every pick.
        self.shared = shared if shared is not None else RawArray(
            ctypes.c_int64, host_slots * SHARED_FIELDS)
        self.lock_path = lock_path  # byte-range locks for max_connections, one byte a slot
        self._row = worker_slots * _FIELDS

    def __reduce__(self) -> tuple[Any, ...]:
        """Spawned helpers receive the same shared memory, not a copy."""
        return (HostTable, (self.worker_slots, self.host_slots, self.array, self.shared,
                            self.lock_path))

    def totals(self, host_slot: int) -> HostTotals:
        base = host_slot * self._row
        row = self.array[base:base + self._row]
        return HostTotals(max(0, sum(row[IN_FLIGHT::_FIELDS])), sum(row[REQUESTS::_FIELDS]),
                          sum(row[FAILURES::_FIELDS]))

    def in_flight(self, host_slot: int) -> int:
        base = host_slot * self._row
        return max(0, sum(self.array[base + IN_FLIGHT:base + self._row:_FIELDS]))

    def clear_in_flight(self, worker_slot: int) -> None:
        """After a worker died: its requests are no longer in flight (master only, once it
        has reaped the worker, so the cells have no writer left)."""
        offset = worker_slot * _FIELDS + IN_FLIGHT
        for host_slot in range(self.host_slots):
            self.array[host_slot * self._row + offset] = 0

    def reset_host(self, host_slot: int) -> None:
        """Zero a reclaimed slot before a new address takes it (control state only)."""
        base = host_slot * self._row
        self.array[base:base + self._row] = [0] * self._row
        self.forget_passive(host_slot)

    def forget_passive(self, host_slot: int) -> None:
        """No streak, no ejection, no history: for an address that left (control state)."""
        base = host_slot * SHARED_FIELDS
        self.shared[base:base + SHARED_FIELDS] = [0] * SHARED_FIELDS

    def ejected_until(self, host_slot: int) -> float | None:
        """The end of the host's ejection (Unix time), or None when it is not ejected."""
        until = self.shared[host_slot * SHARED_FIELDS + EJECTED_UNTIL]
        return until / 1000 if until > time.time() * 1000 else None

    def ejected(self, host_slot: int, now: float) -> bool:
        return self.shared[host_slot * SHARED_FIELDS + EJECTED_UNTIL] > now * 1000

    def note_failure(self, host_slot: int, window: float) -> int:
        """One more consecutive failure (a streak older than `window` seconds starts over);
        returns the streak."""
        base = host_slot * SHARED_FIELDS
        now = int(time.monotonic() * 1000)
        shared = self.shared
        streak = shared[base + STREAK]
        if streak == 0 or now - shared[base + STREAK_START] > window * 1000:
            shared[base + STREAK_START] = now
            streak = 0
        streak += 1
        shared[base + STREAK] = streak
        return streak

    def note_success(self, host_slot: int) -> None:
        index = host_slot * SHARED_FIELDS + STREAK
        if self.shared[index]:
            self.shared[index] = 0

    def for_worker(self, worker_slot: int | None) -> WorkerCells:
        return WorkerCells(self, worker_slot)


class WorkerCells:
    """One worker's writing handle: its threads serialise on an in-process lock only, except
    for a backend with a `max_connections` cap, where the check and the increment also hold
    that host's byte-range lock (fcntl), which the kernel drops if the process dies."""

    def __init__(self, table: HostTable, worker_slot: int | None) -> None:
        self.table = table
        self.array = table.array
        self.shared = table.shared
        self.enabled = worker_slot is not None and 0 <= worker_slot < table.worker_slots
        self._offset = (worker_slot or 0) * _FIELDS
        self._row = table._row
        self._lock = threading.Lock()
        # Opened now, not on the first capped request: a worker out of file descriptors
        # must still be able to take its locks (an EMFILE there would fail the request).
        self._lock_fd: int | None = None
        if table.lock_path and self.enabled:
            self._lock_file()
        # This worker's own requests in flight per host slot (the per-worker share bound).
        self.local = [0] * table.host_slots

    def try_begin(self, host_slot: int, limit: int, share: int) -> bool:
        """begin() unless the host is ejected (passive health), this worker already has
        `share` requests in flight to it, or it has `limit` (0: none) in flight over all
        workers."""
        if self.local[host_slot] >= share:
            return False
        ejected_until = self.shared[host_slot * SHARED_FIELDS + EJECTED_UNTIL]
        if ejected_until and ejected_until > time.time() * 1000:
            return False
        if not limit or not self.enabled:
            self.begin(host_slot)
            return True
        with self._lock:
            fd = self._lock_file()
            fcntl.lockf(fd, fcntl.LOCK_EX, 1, host_slot)
            try:
                if self.table.in_flight(host_slot) >= limit:
                    return False
                cell = host_slot * self._row + self._offset
                self.array[cell + IN_FLIGHT] += 1
                self.array[cell + REQUESTS] += 1
                self.local[host_slot] += 1
                return True
            finally:
                fcntl.lockf(fd, fcntl.LOCK_UN, 1, host_slot)

    @contextlib.contextmanager
    def ejection_lock(self) -> Iterator[None]:
        """Held while an ejection is decided and set (outlier.try_eject): the thread lock, and
        in several processes one byte-range lock (the byte after the hosts'), so two workers
        completing streaks at once cannot both take the last share."""
        table = self.table
        with self._lock:
            if not table.lock_path:  # one process (tests, benchmarks): the thread lock is enough
                yield
                return
            fd = self._lock_file()
            fcntl.lockf(fd, fcntl.LOCK_EX, 1, table.host_slots)
            try:
                yield
            finally:
                fcntl.lockf(fd, fcntl.LOCK_UN, 1, table.host_slots)

    def _lock_file(self) -> int:
        if self._lock_fd is None:
            self._lock_fd = os.open(self.table.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        return self._lock_fd

    def begin(self, host_slot: int) -> None:
        """A request goes to this host: one more in flight, one more request."""
        cell = host_slot * self._row + self._offset
        array = self.array
        with self._lock:
            self.local[host_slot] += 1
            if self.enabled:
                array[cell + IN_FLIGHT] += 1
                array[cell + REQUESTS] += 1

    def detach(self, host_slot: int) -> None:
        """The request became a tunnel that holds no serving thread: it stays in flight but
        leaves this worker's share (end() then gets local=False)."""
        with self._lock:
            self.local[host_slot] -= 1

    def end(self, host_slot: int, failed: bool, local: bool = True) -> None:
        cell = host_slot * self._row + self._offset
        array = self.array
        with self._lock:
            if local:
                self.local[host_slot] -= 1
            if self.enabled:
                array[cell + IN_FLIGHT] -= 1
                if failed:
                    array[cell + FAILURES] += 1
