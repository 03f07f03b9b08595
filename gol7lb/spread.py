"""Keep client connections spread over workers that share one listening socket.

With one listener shared by every worker (reuse_port off: the master owns it, so a worker that
retires on HUP resets no connection), the kernel wakes whichever worker waits first, and one
worker was measured to collect 32 of 32 keep-alive connections. So each worker publishes how
many connections it holds, and one that holds clearly more than the least loaded live peer
stops accepting for a few milliseconds (EPOLLEXCLUSIVE then wakes a peer instead).

The table is created at import, in the master (gunicorn imports the worker class before it
forks), so every worker shares it. Lock-free: each worker writes only its own cell; a cell not
refreshed for STALE seconds (a worker that died) is ignored.
"""

from __future__ import annotations

import multiprocessing
import os
import time

SLOTS = 64
STALE = 2.0  # seconds without an update after which a cell is ignored
SLACK = 4  # connections a worker may hold above the least loaded peer before it defers
DEFER = 0.005  # seconds a loaded worker stops accepting before it looks again

_load = multiprocessing.RawArray("l", SLOTS)
_seen = multiprocessing.RawArray("d", SLOTS)


class Spread:
    """One worker's cell in the shared table."""

    def __init__(self, slot: int | None) -> None:
        """`slot` None (pre_fork found none free): a cell chosen by the process id."""
        self.slot = (os.getpid() if slot is None else slot) % SLOTS
        self._fewest = 0
        self._fewest_at = -1.0

    def publish(self, connections: int, now: float | None = None) -> None:
        _load[self.slot] = connections
        _seen[self.slot] = time.monotonic() if now is None else now

    def should_defer(self, connections: int, now: float) -> bool:
        """True when a live peer holds at least SLACK fewer connections than this worker."""
        if connections <= SLACK:
            return False
        if now - self._fewest_at > DEFER:  # a scan of the table at most once per DEFER
            fewest = 1 << 30
            for i in range(SLOTS):
                if i != self.slot and now - _seen[i] < STALE and _load[i] < fewest:
                    fewest = _load[i]
            self._fewest, self._fewest_at = fewest, now
        return connections > self._fewest + SLACK

    def leave(self) -> None:
        _seen[self.slot] = 0.0
        _load[self.slot] = 0
