"""Shared state: the Manager-held backend table, lock-free counters in shared memory, and the
worker-side snapshot that touches the Manager only when the generation counter has moved.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from multiprocessing.managers import BaseManager, DictProxy
from multiprocessing.sharedctypes import RawArray
from typing import Any

from gol7lb.backends import Backend
from gol7lb.balancer import Policy, make_policy
from gol7lb.children import init_helper_process

log = logging.getLogger("gunicorn.error")

# Slots of the shared counter array; 8 slots (64 bytes) apart so writers do not share a cache line.
GENERATION = 0  # written by the supervisor only; bumped after every liveness change
ROTATION = 8  # round-robin tickets, drawn by every worker
_SLOTS = 16
MANAGER_RETRY_SECONDS = 1.0  # after a failed Manager read, serve the last snapshot this long

class SharedCounters:
    """Counters in anonymous shared memory, inherited by forked workers, read without locks.

    Locks are avoided on purpose: a process killed while holding a multiprocessing lock
    would freeze every reader. The generation has a single writer (the supervisor).
    Tickets are drawn with a racy read-increment-write; a rare lost update only means two
    concurrent requests get the same ticket, which a lock would not make more correct.
    """

    def __init__(self, array: Any | None = None) -> None:
        self.array = array if array is not None else RawArray(ctypes.c_uint64, _SLOTS)

    @property
    def generation(self) -> int:
        return self.array[GENERATION]

    def bump_generation(self) -> int:
        value = (self.array[GENERATION] + 1) & 0xFFFFFFFFFFFFFFFF
        self.array[GENERATION] = value
        return value

    def take_ticket(self) -> int:
        array = self.array
        ticket = array[ROTATION]
        array[ROTATION] = (ticket + 1) & 0xFFFFFFFFFFFFFFFF
        return ticket


# --- the Manager ---------------------------------------------------------------------------

_TABLE: dict[str, dict[str, Any]] = {}


def _backend_table() -> dict[str, dict[str, Any]]:
    """Runs inside the Manager's server process: the one table every client shares."""
    return _TABLE


class StateManager(BaseManager):
    """A Manager serving one dict: backend URL -> its liveness record."""


StateManager.register("backend_table", callable=_backend_table, proxytype=DictProxy)


def start_manager() -> StateManager:
    """Start the Manager in a fresh interpreter (spawn), so it inherits nothing of gunicorn."""
    manager = StateManager(ctx=multiprocessing.get_context("spawn"))
    manager.start(initializer=init_helper_process)
    return manager


def connect_table(address: Any, authkey: bytes) -> Any:
    """A new connection and proxy to the shared table, owned by the calling process."""
    manager = StateManager(address=address, authkey=authkey)
    manager.connect()
    return manager.backend_table()


def healthy_backends(
    backends: Sequence[Backend], table: Mapping[str, Mapping[str, Any]]
) -> list[Backend]:
    """Configured backends that the table does not mark down (unknown ones count as up)."""
    return [b for b in backends if table.get(b.url, {}).get("alive", True)]


class LivenessView:
    """A worker's cached liveness: one shared-memory read per request, IPC only on change."""

    def __init__(
        self,
        backends: Sequence[Backend],
        algorithm: str,
        counters: SharedCounters,
        table_factory: Callable[[], Any],
    ) -> None:
        self.backends = tuple(backends)
        self.algorithm = algorithm
        self.counters = counters
        self._table_factory = table_factory
        self._table: Any = None
        self._seen = -1  # generation the cached policy was built from; -1 forces the first read
        self._policy: Policy = make_policy(algorithm, self.backends)
        self._refresh_lock = threading.Lock()
        self._next_retry = 0.0

    def policy(self) -> Policy:
        if self.counters.array[GENERATION] != self._seen:
            self._refresh()
        return self._policy

    def _refresh(self) -> None:
        # One thread refreshes; the others keep serving from the previous snapshot meanwhile.
        if not self._refresh_lock.acquire(blocking=False):
            return
        try:
            now = time.monotonic()
            if now < self._next_retry:
                return
            generation = self.counters.array[GENERATION]  # read before the table: never skip one
            try:
                if self._table is None:
                    self._table = self._table_factory()
                snapshot = self._table.copy()
            except Exception as e:  # the Manager is gone or restarting: keep the last snapshot
                self._table = None
                self._next_retry = now + MANAGER_RETRY_SECONDS
                log.error("cannot read backend state from the manager (%s); serving from the "
                          "last known state", e)
                return
            self._policy = make_policy(self.algorithm, healthy_backends(self.backends, snapshot))
            self._seen = generation
        finally:
            self._refresh_lock.release()
