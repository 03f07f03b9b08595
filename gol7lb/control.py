"""The control state held by the Manager process, the snapshot every reader gets of it, and
its persistence.

The Manager process holds one `ControlState`: the running configuration (the file's, plus the
admin API's runtime changes), the host slot of every backend address, health records and
drain flags. Every change goes through its methods, so the Manager process is the single
writer of the generation counter that tells everybody else to re-read. It persists what
cannot be re-derived (configuration, runtime changes, slots, liveness, drains) to a file in
the instance's private directory, so a Manager killed and restarted by the master carries on
where it stopped.
"""

from __future__ import annotations

import logging
import os
import pickle
import threading
import time
from collections.abc import Collection
from dataclasses import dataclass, field, replace
from typing import Any

from gol7lb import logfmt, metrics
from gol7lb.backends import Backend
from gol7lb.config import Pool, Settings
from gol7lb.counters import POOL_SLOTS, SharedCounters
from gol7lb.health import HealthRecord
from gol7lb.hosts import HostTable

log = logging.getLogger("gol7lb.manager")  # the Manager process

class ControlError(Exception):
    """A refused runtime change; `status` is the HTTP status the admin API answers with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(status, message)
        self.status = status
        self.message = message

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class Snapshot:
    """Everything a worker, the supervisor or the admin listener needs, read in one IPC call."""

    generation: int  # the shared generation counter when this was taken
    config_generation: int  # successful configuration loads since start
    loaded_at: float
    last_error: str | None
    settings: Settings
    pools: dict[str, Pool]  # the running pools: the file's plus the admin API's changes
    sources: dict[str, str]  # backend id -> "config" | "api"
    slots: dict[str, int]  # backend id -> host slot in the shared HostTable
    health: dict[str, HealthRecord]  # backend id -> the supervisor's record
    pool_slots: dict[str, int] = field(default_factory=dict)  # pool name -> rotation slot
    drained: frozenset[str] = field(default_factory=frozenset)
    ejected: dict[str, float] = field(default_factory=dict)  # backend id -> until (Unix time)
    ejection_ended: dict[str, float] = field(default_factory=dict)  # id -> when (slow start)
    discovered_from: dict[str, str] = field(default_factory=dict)  # backend id -> DNS name
    discovery: dict[str, dict[str, Any]] = field(default_factory=dict)  # spec key -> state

    def backends(self) -> dict[str, Backend]:
        """Every running backend by id (a backend in several pools once, as first listed)."""
        found: dict[str, Backend] = {}
        for pool in self.pools.values():
            for backend in pool.backends:
                found.setdefault(backend.id, backend)
        return found

    def health_of(self, backend_id: str) -> HealthRecord:
        """Its record, or that of a backend never checked (up)."""
        return self.health.get(backend_id) or _UNCHECKED

    def alive(self, backend_id: str) -> bool:
        return self.health_of(backend_id).alive


_UNCHECKED = HealthRecord()


class ControlState:
    """Lives in the Manager process; every method runs under one lock."""

    _PERSISTED = ("settings", "config_generation", "loaded_at", "last_error", "added", "removed",
                  "slots", "alive", "drained", "ejected", "ejection_ended",
                  "discovered", "discovery", "pool_slots")

    def __init__(self, counters: SharedCounters, hosts: HostTable, path: str) -> None:
        self._counters = counters
        self._hosts = hosts
        self._path = path
        self._lock = threading.Lock()
        self.settings: Settings | None = None
        self.config_generation = 0
        self.loaded_at = 0.0
        self.last_error: str | None = None
        self.added: dict[str, list[Backend]] = {}  # pool -> backends the API added
        self.removed: set[str] = set()  # ids the API removed from every pool
        self.slots: dict[str, int] = {}
        self.pool_slots: dict[str, int] = {}  # pool name -> rotation cell, kept across reloads
        self.alive: dict[str, bool] = {}
        self.drained: set[str] = set()
        self.ejected: dict[str, float] = {}  # passive health: id -> ejected until (Unix time)
        self.ejection_ended: dict[str, float] = {}
        self.discovered: dict[str, list[Backend]] = {}  # spec key -> its last good answer
        self.discovery: dict[str, dict[str, Any]] = {}  # spec key -> name, error, when
        self.records: dict[str, HealthRecord] = {}  # latest check per backend (not persisted)
        if self._load():
            self._counters.bump_generation()  # a restarted Manager: everybody re-reads

    # persistence ----------------------------------------------------------------------------

    def _load(self) -> bool:
        try:
            with open(self._path, "rb") as f:
                data = pickle.load(f)
        except FileNotFoundError:
            return False
        except Exception as e:  # a torn or foreign file: start empty, the master re-publishes
            log.error("manager: cannot read saved state %s: %s", self._path, e)
            return False
        for name in self._PERSISTED:
            setattr(self, name, data.get(name, getattr(self, name)))
        for backend_id, alive in self.alive.items():
            self.records[backend_id] = HealthRecord(alive)
        return True

    def _save(self) -> None:
        data = {name: getattr(self, name) for name in self._PERSISTED}
        tmp = f"{self._path}.tmp"
        with open(tmp, "wb") as f:
            pickle.dump(data, f, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(tmp, self._path)

    def _changed(self) -> None:
        self._save()
        self._counters.bump_generation()

    # the running pools ----------------------------------------------------------------------

    def _pools(self) -> dict[str, Pool]:
        if self.settings is None:
            return {}
        pools = {}
        for name, pool in self.settings.pools.items():
            backends = [b for b in pool.backends if b.id not in self.removed]
            ids = {b.id for b in backends}
            for spec in pool.discover:
                for backend in self.discovered.get(spec.key, ()):
                    if backend.id not in ids and backend.id not in self.removed:
                        backends.append(backend)
                        ids.add(backend.id)
            backends += [b for b in self.added.get(name, ()) if b.id not in ids]
            pools[name] = replace(pool, backends=tuple(backends))
        return pools

    def _discovered_from(self) -> dict[str, str]:
        found: dict[str, str] = {}
        for key, backends in self.discovered.items():
            name = self.discovery.get(key, {}).get("name", key)
            for backend in backends:
                found.setdefault(backend.id, name)
        return found

    def _running_ids(self) -> set[str]:
        return {b.id for pool in self._pools().values() for b in pool.backends}

    def _sources(self) -> dict[str, str]:
        api = {b.id for backends in self.added.values() for b in backends}
        fixed = {b.id for pool in (self.settings.pools.values() if self.settings else ())
                 for b in pool.backends}
        dns = set(self._discovered_from()) - fixed
        return {i: ("api" if i in api else "dns" if i in dns else "config")
                for i in self._running_ids()}

    def _assign_slot(self, backend_id: str) -> None:
        if backend_id in self.slots:
            return
        used = set(self.slots.values())
        free = next((i for i in range(self._hosts.host_slots) if i not in used), None)
        if free is None:  # reclaim the slot of an address that left and has nothing in flight
            running = self._running_ids()
            for old_id, slot in list(self.slots.items()):
                if old_id not in running and self._hosts.in_flight(slot) == 0:
                    del self.slots[old_id]
                    self._hosts.reset_host(slot)
                    free = slot
                    break
        if free is None:
            raise ControlError(507, f"too many backend addresses (at most "
                                    f"{self._hosts.host_slots} at once)")
        self.slots[backend_id] = free

    def _assign_pool_slot(self, name: str, running: Collection[str]) -> None:
        """A pool keeps its rotation cell for its name (across reloads, like a host slot); a
        new name gets a free one, else that of a pool which left (not in `running`), its
        rotation restarted."""
        if name in self.pool_slots:
            return
        used = set(self.pool_slots.values())
        free = next((i for i in range(POOL_SLOTS) if i not in used), None)
        if free is None:
            gone = next(old for old in self.pool_slots if old not in running)
            free = self.pool_slots.pop(gone)
            self._counters.reset_rotation(free)
        self.pool_slots[name] = free

    def _adopt(self, backend_id: str, alive: bool) -> None:
        """Give a new address a slot and a health record; one that stays keeps both."""
        self._assign_slot(backend_id)
        if backend_id not in self.records:
            health = self.settings.health if self.settings else None
            rise, fall = (health.rise, health.fall) if health else (1, 1)
            self.records[backend_id] = HealthRecord.initial(alive, rise, fall)
            self.alive[backend_id] = alive

    def _forget_gone(self) -> None:
        running = self._running_ids()
        for backend_id in list(self.records):
            if backend_id not in running:
                del self.records[backend_id]
                self.alive.pop(backend_id, None)
                self.ejected.pop(backend_id, None)
                if backend_id in self.slots:  # back one day: with no streak or ejection
                    self._hosts.forget_passive(self.slots[backend_id])

    # writers ---------------------------------------------------------------------------------

    def publish_config(self, settings: Settings, loaded_at: float) -> int:
        """A validated configuration takes over; the API's runtime changes end (as HAProxy's
        do when it reloads its file). Returns the new configuration generation."""
        with self._lock:
            if len(settings.pools) > POOL_SLOTS:
                raise ControlError(507, f"too many pools ({len(settings.pools)}; at most "
                                        f"{POOL_SLOTS})")
            logfmt.apply(settings.log)  # this process's own log lines follow it
            first = self.settings is None
            self.settings = settings
            self.config_generation += 1
            self.loaded_at = loaded_at
            self.last_error = None
            self.added = {}
            self.removed = set()
            keys = {spec.key for pool in settings.pools.values() for spec in pool.discover}
            self.discovered = {k: v for k, v in self.discovered.items() if k in keys}
            self.discovery = {k: v for k, v in self.discovery.items() if k in keys}
            for name in settings.pools:
                self._assign_pool_slot(name, settings.pools)
            for backend_id in self._running_ids():
                self._adopt(backend_id, alive=first)
            self._forget_gone()
            self._changed()
            return self.config_generation

    def record_error(self, message: str) -> None:
        with self._lock:
            self.last_error = message
            self._changed()

    def clear_error(self, message: str) -> None:
        """The error `message` no longer holds (a refused certificate was fixed): forget it,
        unless another error came since."""
        with self._lock:
            if self.last_error == message:
                self.last_error = None
                self._changed()

    def add_backend(self, pool: str, backend: Backend) -> None:
        with self._lock:
            pools = self._pools()
            if pool not in pools:
                raise ControlError(404, f"no pool named {pool!r}: pools are "
                                        + ", ".join(sorted(pools)))
            if any(b.id == backend.id for b in pools[pool].backends):
                raise ControlError(409, f"backend {backend.id} is already in pool {pool!r}")
            # An address the API removed from the file's pools comes back as the API says:
            # in this pool only, with this weight (the file's entries stay removed until the
            # next reload).
            self.added.setdefault(pool, []).append(backend)
            self._adopt(backend.id, alive=False)
            self._changed()

    def remove_backend(self, backend_id: str) -> None:
        with self._lock:
            self._require(backend_id)
            self.removed.add(backend_id)
            for name in list(self.added):
                self.added[name] = [b for b in self.added[name] if b.id != backend_id]
            self.drained.discard(backend_id)
            self._forget_gone()
            self._changed()

    def set_drained(self, backend_id: str, drained: bool) -> None:
        with self._lock:
            self._require(backend_id)
            if drained:
                self.drained.add(backend_id)
            else:
                self.drained.discard(backend_id)
            self._changed()

    def _require(self, backend_id: str) -> None:
        if backend_id not in self._running_ids():
            raise ControlError(404, f"no backend {backend_id!r} (ids are host:port, as in "
                                    "/status)")

    def eject(self, backend_id: str, until: float) -> None:
        """Passive health: a worker saw `passive_fails` consecutive failures and ejected the
        backend in shared memory until `until` (it applied max_ejected_percent and the
        cooldown there, hosts.py). Recorded here for /status, metrics, its end (the
        supervisor's clock) and the slow start after it."""
        with self._lock:
            if self.settings is None or backend_id not in self._running_ids():
                return
            metrics.EJECTIONS.labels(backend_id).inc()
            now = time.time()
            log.warning("passive health: ejected %s for %.1fs (%d consecutive failures)",
                        backend_id, until - now, self.settings.health.passive_fails)
            if until <= now or self.ejected.get(backend_id) == until:
                return
            self.ejected[backend_id] = until
            self._changed()

    def set_discovered(self, key: str, name: str, backends: list[Backend] | None,
                       error: str | None) -> None:
        """A DNS answer for one discovery entry. `backends` None (the name did not resolve):
        the last known addresses stay, and the error is shown; new addresses are checked
        before they take traffic, vanished ones leave (their requests in flight finish)."""
        with self._lock:
            if self.settings is None:
                return
            now = time.time()
            status = self.discovery.setdefault(key, {"name": name})
            status.update(name=name, checked_at=now, error=error)
            if backends is None:
                self._save()
                return
            status["resolved_at"] = now
            status["addresses"] = sorted(b.id for b in backends)
            previous = {b.id: b for b in self.discovered.get(key, [])}
            current = {b.id: b for b in backends}
            self.discovered[key] = backends
            if previous == current:
                self._save()
                return
            for backend_id in current:
                if backend_id not in previous:
                    self._adopt(backend_id, alive=False)
            self._forget_gone()
            self._changed()

    def expire_ejections(self) -> None:
        """Ejections whose time is up end (the supervisor asks every quarter second)."""
        with self._lock:
            now = time.time()
            ended = [i for i, until in self.ejected.items() if until <= now]
            for backend_id in ended:
                del self.ejected[backend_id]
                self.ejection_ended[backend_id] = now
                log.info("passive health: %s is back after its ejection", backend_id)
            if ended:
                self._changed()

    def publish_health(self, backend_id: str, record: HealthRecord, changed: bool) -> None:
        """One check result from the supervisor; the generation moves only on a flip."""
        with self._lock:
            if backend_id not in self.records:  # removed meanwhile: a late result
                return
            self.records[backend_id] = record
            if changed or self.alive.get(backend_id) != record.alive:
                self.alive[backend_id] = record.alive
                self._changed()

    # readers ---------------------------------------------------------------------------------

    def snapshot(self) -> Snapshot | None:
        with self._lock:
            if self.settings is None:
                return None
            return Snapshot(
                generation=self._counters.generation,
                config_generation=self.config_generation,
                loaded_at=self.loaded_at,
                last_error=self.last_error,
                settings=self.settings,
                pools=self._pools(),
                sources=self._sources(),
                slots=dict(self.slots),
                health=dict(self.records),
                pool_slots=dict(self.pool_slots),
                drained=frozenset(self.drained),
                ejected=dict(self.ejected),
                ejection_ended=dict(self.ejection_ended),
                discovered_from=self._discovered_from(),
                discovery={k: dict(v) for k, v in self.discovery.items()},
            )
