"""Shared state: the control state held by the Manager, lock-free counters in shared memory, and
the worker-side view that touches the Manager only when the generation counter has moved.

The Manager process holds one `ControlState`: the running configuration (the file's, plus the
admin API's runtime changes), the host slot of every backend address, health records and
drain flags. Every change goes through its methods, so the Manager process is the single
writer of the generation counter that tells everybody else to re-read. It persists what
cannot be re-derived (configuration, runtime changes, slots, liveness, drains) to a file in
the instance's private directory, so a Manager killed and restarted by the master carries on
where it stopped.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import pickle
import socket
import struct
import sys
import threading
import time
import weakref
from collections.abc import Callable, Collection
from dataclasses import dataclass, field, replace
from multiprocessing import AuthenticationError
from multiprocessing.connection import Connection, answer_challenge, deliver_challenge
from multiprocessing.managers import BaseManager
from multiprocessing.sharedctypes import RawArray
from typing import Any, Generic, TypeVar

from gol7lb import logfmt, metrics
from gol7lb.backends import Backend
from gol7lb.children import helper_main
from gol7lb.config import Pool, Settings
from gol7lb.hosts import HostTable

log = logging.getLogger("gol7lb.manager")  # the Manager process
view_log = logging.getLogger("gol7lb.state")  # a process that reads the shared state

# Slots of the shared counter array; 8 slots (64 bytes) apart so writers do not share a cache line.
GENERATION = 0  # written by the Manager process only; bumped after every change of its state
HEARTBEAT = 16  # the supervisor's last sign of life, CLOCK_MONOTONIC milliseconds
ROTATIONS = 24  # then one rotation cell per pool slot: tickets drawn by every worker
POOL_SLOTS = 1024  # pools with a rotation at once (running ones, then those that left)
_SLOTS = ROTATIONS + 8 * POOL_SLOTS
MANAGER_RETRY_SECONDS = 0.1  # after a failed Manager read, serve the last snapshot this long
MANAGER_RETRY_MAX_SECONDS = 2.0  # ... doubling while it keeps failing, up to this
FIRST_READ_SECONDS = 5.0  # how long a new worker waits for its first state read
REFRESH_WAIT_SECONDS = 0.1  # a request waits this long at most for a refresh under way


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
    health: dict[str, dict[str, Any]]  # backend id -> the supervisor's record
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

    def alive(self, backend_id: str) -> bool:
        return bool(self.health.get(backend_id, {}).get("alive", True))


def new_health_record(alive: bool, rise: int, fall: int) -> dict[str, Any]:
    """What the supervisor starts a backend's checks from.

    At start every backend is up but unconfirmed (as in HAProxy: the first failed check
    takes it out). One that appears later (reload, API) is down until its first check passes.
    """
    return {"alive": alive, "successes": 0 if alive else rise - 1,
            "failures": fall - 1 if alive else 0, "since": time.time(), "checks": 0,
            "last_check": None}


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
        self.records: dict[str, dict[str, Any]] = {}  # latest check per backend (not persisted)
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
            self.records[backend_id] = {"alive": alive, "last_check": None}
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
            self.records[backend_id] = new_health_record(alive, rise, fall)
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

    def publish_health(self, backend_id: str, record: dict[str, Any], changed: bool) -> None:
        """One check result from the supervisor; the generation moves only on a flip."""
        with self._lock:
            if backend_id not in self.records:  # removed meanwhile: a late result
                return
            self.records[backend_id] = record
            if changed or self.alive.get(backend_id) != record["alive"]:
                self.alive[backend_id] = record["alive"]
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
                health={k: dict(v) for k, v in self.records.items()},
                pool_slots=dict(self.pool_slots),
                drained=frozenset(self.drained),
                ejected=dict(self.ejected),
                ejection_ended=dict(self.ejection_ended),
                discovered_from=self._discovered_from(),
                discovery={k: dict(v) for k, v in self.discovery.items()},
            )


# --- the Manager -----------------------------------------------------------------------------
#
# The control state is served by a `multiprocessing` Manager (a `BaseManager` server process).
# Its own proxies cannot be used: a proxy reads its socket with no timeout (and its finaliser
# connects again, unbounded, to drop its reference), so a frozen Manager froze every caller.
# ControlClient speaks the Manager's wire protocol itself (`create` once, then
# `accept_connection` and `(ident, method, args, kwds)` requests, as `BaseProxy` does) over a
# socket on which every operation has a kernel timeout and every answer is awaited with
# `Connection.poll`.

EXPOSED = ("publish_config", "record_error", "add_backend", "remove_backend", "set_drained",
           "publish_health", "eject", "expire_ejections", "set_discovered", "snapshot")
CALL_SECONDS = 2.0  # a call's default bound: connect, authenticate, ask, answer
_TYPEID = "control"


class ManagerUnavailable(ConnectionError):
    """The Manager did not answer in time, or cannot be reached (it is frozen or restarting)."""


class ManagerFailure(Exception):
    """A call failed inside the Manager for a reason that is not a refused change."""


def _set_socket_timeout(sock: socket.socket, seconds: float) -> None:
    """SO_RCVTIMEO and SO_SNDTIMEO: a blocked read, write or connect gives up after `seconds`
    (multiprocessing's Connection uses plain read/write on the fd, which honour them)."""
    seconds = max(seconds, 0.001)
    timeval = struct.pack("ll", int(seconds), int(seconds % 1 * 1_000_000))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)


_CONTROL: ControlState | None = None


def _control() -> ControlState:
    """Runs inside the Manager's server process: the one state every client shares."""
    assert _CONTROL is not None
    return _CONTROL


class StateManager(BaseManager):
    """A Manager serving one ControlState."""


StateManager.register(_TYPEID, callable=_control, exposed=EXPOSED)


def run_manager(address: str, authkey: bytes, counters: SharedCounters, hosts: HostTable,
                state_path: str) -> None:
    """Entry point of the Manager process, started (and restarted) by the master.

    It listens on a fixed Unix socket (a path in the instance's private directory, or an
    abstract name when that path would be too long), so clients reconnect to a restarted
    Manager at the same address.
    """
    global _CONTROL
    helper_main("manager", on_term=lambda: sys.exit(0))
    _CONTROL = ControlState(counters, hosts, state_path)
    if not address.startswith("\0"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(address)  # left behind by a Manager that was killed
    server = StateManager(address=address, authkey=authkey).get_server()
    log.info("manager serving shared state on %s (pid %d)",
             address.replace("\0", "@", 1), os.getpid())
    server.serve_forever()


class ControlClient:
    """A process's handle on the control state. Every call is bounded (`timeout`, by default
    the client's): it raises ManagerUnavailable when the Manager does not answer in time, and
    the connection it used is dropped, so the next call connects afresh (to a restarted
    Manager too). Idle connections are shared by the process's threads."""

    def __init__(self, address: str, authkey: bytes, timeout: float = CALL_SECONDS) -> None:
        self.address = address
        self.authkey = authkey
        self.timeout = timeout
        self._idle: list[tuple[Connection, str]] = []  # with the control object's id
        self._lock = threading.Lock()
        _CLIENTS.add(self)

    def _after_fork(self) -> None:
        """In a forked child: the parent's connections are not ours to use (two processes on
        one socket would mix their answers), nor its lock, which a thread may have held."""
        idle, self._idle, self._lock = self._idle, [], threading.Lock()
        for conn, _ident in idle:
            self._drop(conn)  # the child's copy of the fd only

    def _handshake(self, deadline: float) -> Connection:
        """A new authenticated connection to the Manager's server, bounded by `deadline`."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            _set_socket_timeout(sock, deadline - time.monotonic())  # connect, handshake
            sock.connect(self.address)
            _set_socket_timeout(sock, deadline - time.monotonic())
            # Connection(fd) as multiprocessing's own SocketClient builds it: Client() has no
            # way to bound its connect or its handshake.
            conn = Connection(sock.detach())
        finally:
            sock.close()
        try:
            answer_challenge(conn, self.authkey)
            deliver_challenge(conn, self.authkey)
        except BaseException:
            conn.close()
            raise
        return conn

    def _request(self, conn: Connection, request: tuple[Any, ...], deadline: float,
                 bound: float) -> Any:
        """Send one Manager request and wait for its answer until `deadline`."""
        conn.send(request)
        if not conn.poll(max(0.0, deadline - time.monotonic())):
            raise ManagerUnavailable(f"no answer from the manager in {bound:.2g}s")
        kind, result = conn.recv()
        if kind == "#RETURN":
            return result
        if kind == "#ERROR" and isinstance(result, ControlError):
            raise result
        raise ManagerFailure(f"{request[1]} failed in the manager: "
                             f"{str(result).strip().splitlines()[-1:] or kind}")

    def _connect(self, deadline: float, bound: float) -> tuple[Connection, str]:
        """A connection the Manager serves calls on, and the control object's id there (as a
        Manager proxy makes them: `create` on one connection, `accept_connection` on the
        next). The id is asked for anew on every connection: a restarted Manager has a new
        one."""
        with self._handshake(deadline) as first:
            ident, _exposed = self._request(first, (None, "create", (_TYPEID,), {}),
                                            deadline, bound)
        conn = self._handshake(deadline)
        try:
            self._request(conn, (None, "accept_connection", ("gol7lb-client",), {}),
                          deadline, bound)
            with socket.socket(fileno=os.dup(conn.fileno())) as dup:
                _set_socket_timeout(dup, self.timeout)  # guards each read of a long answer
        except BaseException:
            conn.close()
            raise
        return conn, ident

    def call(self, method: str, *args: Any, timeout: float | None = None) -> Any:
        bound = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + bound
        with self._lock:
            idle = self._idle.pop() if self._idle else None
        conn: Connection | None = None
        try:
            try:
                conn, ident = idle if idle is not None else self._connect(deadline, bound)
                result = self._request(conn, (ident, method, args, {}), deadline, bound)
            except (BrokenPipeError, ConnectionResetError):
                if idle is None or conn is not idle[0]:
                    raise
                # A kept connection to a Manager that has since died (and was restarted): the
                # request never left, so it goes once more on a new connection, and every other
                # kept connection, to the same dead process, goes too.
                self._drop(conn)
                self._drop_idle()
                conn, ident = self._connect(deadline, bound)
                result = self._request(conn, (ident, method, args, {}), deadline, bound)
        except ControlError:
            if conn is not None:  # a refused change: the connection is fine
                with self._lock:
                    self._idle.append((conn, ident))
            raise
        except ManagerUnavailable:
            self._drop(conn)
            raise
        except (OSError, EOFError, AuthenticationError) as e:
            self._drop(conn)
            if not isinstance(e, (BlockingIOError, TimeoutError)):
                self._drop_idle()  # the Manager went away: its other connections are dead too
            if isinstance(e, (BlockingIOError, TimeoutError)):
                raise ManagerUnavailable(f"no answer from the manager in {bound:.2g}s") from None
            raise ManagerUnavailable(f"manager unreachable: {e or type(e).__name__}") from None
        except BaseException:
            self._drop(conn)
            raise
        with self._lock:
            self._idle.append((conn, ident))
        return result

    def _drop_idle(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn, _ident in idle:
            self._drop(conn)

    @staticmethod
    def _drop(conn: Connection | None) -> None:
        if conn is not None:
            with contextlib.suppress(OSError):
                conn.close()

    def snapshot(self, timeout: float | None = None) -> Snapshot:
        snapshot: Snapshot | None = self.call("snapshot", timeout=timeout)
        if snapshot is None:
            raise ConnectionError("the manager has no configuration yet")
        return snapshot


_CLIENTS: weakref.WeakSet[ControlClient] = weakref.WeakSet()


def _forget_connections_after_fork() -> None:
    for client in list(_CLIENTS):
        client._after_fork()


os.register_at_fork(after_in_child=_forget_connections_after_fork)

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
    serves from (the proxy builds its policies; state.py holds data only)."""

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
