"""Lock-free counters in anonymous shared memory: the generation counter every process
follows, the supervisor's heartbeat and one rotation cell per pool slot."""

from __future__ import annotations

import ctypes
import time
from multiprocessing.sharedctypes import RawArray
from typing import Any

# Slots of the shared counter array; 8 slots (64 bytes) apart so writers do not share a cache line.
GENERATION = 0  # written by the Manager process only; bumped after every change of its state
HEARTBEAT = 16  # the supervisor's last sign of life, CLOCK_MONOTONIC milliseconds
ROTATIONS = 24  # then one rotation cell per pool slot: tickets drawn by every worker
POOL_SLOTS = 1024  # pools with a rotation at once (running ones, then those that left)
_SLOTS = ROTATIONS + 8 * POOL_SLOTS


class SharedCounters:
    """Counters in anonymous shared memory, inherited by forked workers, read without locks.

    Locks are avoided on purpose: a process killed while holding a multiprocessing lock
    would freeze every reader. Each slot has a single writing process, except the rotations:
    tickets are drawn with a racy read-increment-write, and a rare lost update only means two
    concurrent requests get the same ticket, which a lock would not make more correct. Each
    pool draws from its own rotation cell (its pool slot, given by the control state), so
    traffic to one pool never skews another's rotation.
    """

    def __init__(self, array: Any | None = None) -> None:
        self.array = array if array is not None else RawArray(ctypes.c_uint64, _SLOTS)

    def __reduce__(self) -> tuple[Any, ...]:
        return (SharedCounters, (self.array,))

    @property
    def generation(self) -> int:
        return self.array[GENERATION]

    def bump_generation(self) -> int:
        value = (self.array[GENERATION] + 1) & 0xFFFFFFFFFFFFFFFF
        self.array[GENERATION] = value
        return value

    def take_ticket(self, cell: int = ROTATIONS) -> int:
        """The next ticket of one pool's rotation; `cell` is rotation_cell(its pool slot)."""
        array = self.array
        ticket = array[cell]
        array[cell] = (ticket + 1) & 0xFFFFFFFFFFFFFFFF
        return ticket

    def reset_rotation(self, pool_slot: int) -> None:
        """A reclaimed pool slot starts its rotation afresh (control state only)."""
        self.array[rotation_cell(pool_slot)] = 0

    def beat(self) -> None:
        self.array[HEARTBEAT] = int(time.monotonic() * 1000)

    def heartbeat_age(self) -> float | None:
        """Seconds since the supervisor's last heartbeat; None if it never beat."""
        last = self.array[HEARTBEAT]
        return None if last == 0 else time.monotonic() - last / 1000


def rotation_cell(pool_slot: int) -> int:
    """Where a pool slot's rotation lives: a cache line of its own, so workers drawing tickets
    for different pools do not contend."""
    return ROTATIONS + 8 * pool_slot
