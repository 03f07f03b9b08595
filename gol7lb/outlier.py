"""Passive health in one place: failure streaks that complete eject a backend, within
max_ejected_percent, for a cooldown that doubles on repeats; the Manager is told afterwards.

The cells (streaks, ejections) live in hosts.py's shared table, one row per host shared by
every worker. The worker whose failure completes a streak ejects the backend at once, and
every worker's next pick skips it: no IPC on the way. The Manager is told afterwards
(ControlState.eject), for /status, metrics and slow start; the supervisor ends ejections on
time (ControlState.expire_ejections).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence

from gol7lb.hosts import (
    EJECTED_UNTIL,
    EJECTIONS,
    SHARED_FIELDS,
    STREAK,
    HostTable,
    PoolPeers,
    WorkerCells,
)
from gol7lb.manager import ControlClient
from gol7lb.pooltable import PoolTable

log = logging.getLogger("gol7lb.proxy")  # the worker's request path logs these, as before

MAX_COOLDOWN_FACTOR = 10  # the cooldown doubles on repeats up to this many times the first
EJECT_RETRY_SECONDS = 0.5  # telling the Manager of an ejection again while it is away


def try_eject(cells: WorkerCells, host_slot: int, pools: Sequence[PoolPeers], max_percent: int,
              cooldown: float, now: float) -> float | None:
    """Eject the host from every worker for `cooldown` seconds (doubling on repeats, up to
    10x) unless it is out already, or that would leave more than `max_percent` of a pool
    holding it ejected, or none of its available backends. Returns the end (Unix time),
    or None. Counting and setting hold the ejection lock (WorkerCells.ejection_lock), so two
    workers completing streaks at once cannot both take the last share."""
    with cells.ejection_lock():
        return _eject_locked(cells.table, host_slot, pools, max_percent, cooldown, now)


def _eject_locked(table: HostTable, host_slot: int, pools: Sequence[PoolPeers], max_percent: int,
                  cooldown: float, now: float) -> float | None:
    """try_eject's decision, under the ejection lock."""
    if table.ejected(host_slot, now):
        return None  # another worker completed its streak first
    for peers in pools:
        out = sum(1 for slot in peers.members if table.ejected(slot, now))
        left = any(slot != host_slot and not table.ejected(slot, now)
                   for slot in peers.available)
        if (out + 1) * 100 > max_percent * len(peers.members) or not left:
            return None
    base = host_slot * SHARED_FIELDS
    shared = table.shared
    times = shared[base + EJECTIONS]
    if now * 1000 - shared[base + EJECTED_UNTIL] > MAX_COOLDOWN_FACTOR * cooldown * 1000:
        times = 0  # healthy for long enough since the last one: forget earlier ejections
    until: float = now + cooldown * min(MAX_COOLDOWN_FACTOR, 2 ** times)
    shared[base + EJECTED_UNTIL] = int(until * 1000)
    shared[base + EJECTIONS] = min(times + 1, 8)  # 2**4 is past the cap already
    shared[base + STREAK] = 0  # the next streak starts after the ejection
    return until


def passive_failure(cells: WorkerCells, client: ControlClient | None, slot: int | None,
                    backend_id: str, table: PoolTable) -> None:
    """One more consecutive failure; the one that completes the streak ejects the backend
    in shared memory at once, so no worker sends it another request (a streak that
    max_ejected_percent holds back tries again on each further failure)."""
    health = table.settings.health
    if not health.passive_fails or slot is None:
        return
    streak = cells.table.note_failure(slot, health.passive_window)
    if streak < health.passive_fails:
        return
    until = try_eject(cells, slot, table.peers(backend_id), health.max_ejected_percent,
                      health.passive_cooldown, time.time())
    if until is None:
        if streak == health.passive_fails:
            log.warning("passive health: not ejecting %s: it is out already, or its pool "
                        "would keep too few backends (max_ejected_percent %d)",
                        backend_id, health.max_ejected_percent)
    elif client is not None:
        threading.Thread(target=tell_manager, args=(client, backend_id, until),
                         daemon=True).start()


def tell_manager(client: ControlClient, backend_id: str, until: float = 0.0) -> None:
    """Off the request path: tell the Manager (for /status, metrics and the end of the
    ejection), again while it is unreachable and the ejection lasts."""
    failed = False
    while True:
        try:
            client.call("eject", backend_id, until)
            return
        except Exception as e:
            if not failed:
                log.error("cannot tell the manager %s is ejected: %s", backend_id,
                          e or type(e).__name__)
            failed = True
        if time.time() + EJECT_RETRY_SECONDS >= until:
            return
        time.sleep(EJECT_RETRY_SECONDS)
