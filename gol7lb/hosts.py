"""Per-backend runtime counters keyed by address, shared by every worker (Caddy's host table).

Each backend address owns a *host slot* (assigned by the control state in the Manager and kept
across reloads); each worker owns a *worker slot* (assigned by the master before fork). The
counters live in one anonymous shared-memory array laid out [host slot][worker slot][field],
so every cell has exactly one writing process and no cross-process lock is ever taken: a
worker killed mid-request cannot freeze anybody. Readers (the admin listener, the balancer's
least-connections view) sum a host's cells over all worker slots.
"""

from __future__ import annotations

import ctypes
import threading
from multiprocessing.sharedctypes import RawArray
from typing import Any, NamedTuple

IN_FLIGHT, REQUESTS, FAILURES = range(3)
_FIELDS = 3
HOST_SLOTS = 1024  # addresses tracked at once (backends of every pool, past and present)


class HostTotals(NamedTuple):
    in_flight: int
    requests: int
    failures: int


class HostTable:
    """The shared array; created by the master before any worker or helper exists."""

    def __init__(self, worker_slots: int, host_slots: int = HOST_SLOTS,
                 array: Any | None = None) -> None:
        self.worker_slots = worker_slots
        self.host_slots = host_slots
        self.array = array if array is not None else RawArray(
            ctypes.c_int64, host_slots * worker_slots * _FIELDS)
        self._row = worker_slots * _FIELDS

    def __reduce__(self) -> tuple[Any, ...]:
        """Spawned helpers receive the same shared memory, not a copy."""
        return (HostTable, (self.worker_slots, self.host_slots, self.array))

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

    def for_worker(self, worker_slot: int | None) -> WorkerCells:
        return WorkerCells(self, worker_slot)


class WorkerCells:
    """One worker's writing handle: its threads serialise on an in-process lock only."""

    def __init__(self, table: HostTable, worker_slot: int | None) -> None:
        self.table = table
        self.array = table.array
        self.enabled = worker_slot is not None and 0 <= worker_slot < table.worker_slots
        self._offset = (worker_slot or 0) * _FIELDS
        self._row = table._row
        self._lock = threading.Lock()

    def begin(self, host_slot: int) -> None:
        """A request goes to this host: one more in flight, one more request."""
        if not self.enabled:
            return
        cell = host_slot * self._row + self._offset
        array = self.array
        with self._lock:
            array[cell + IN_FLIGHT] += 1
            array[cell + REQUESTS] += 1

    def end(self, host_slot: int, failed: bool) -> None:
        if not self.enabled:
            return
        cell = host_slot * self._row + self._offset
        array = self.array
        with self._lock:
            array[cell + IN_FLIGHT] -= 1
            if failed:
                array[cell + FAILURES] += 1
