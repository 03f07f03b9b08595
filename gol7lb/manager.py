"""The Manager process that serves the control state, and every other process's bounded
client of it."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import struct
import sys
import threading
import time
import weakref
from multiprocessing import AuthenticationError
from multiprocessing.connection import Connection, answer_challenge, deliver_challenge
from multiprocessing.managers import BaseManager
from typing import Any

from gol7lb.children import helper_main
from gol7lb.control import ControlError, ControlState, Snapshot
from gol7lb.counters import SharedCounters
from gol7lb.hosts import HostTable

log = logging.getLogger("gol7lb.manager")  # the Manager process

# --- the Manager -----------------------------------------------------------------------------
#
# The control state is served by a `multiprocessing` Manager (a `BaseManager` server process).
# Its own proxies cannot be used: a proxy reads its socket with no timeout (and its finaliser
# connects again, unbounded, to drop its reference), so a frozen Manager froze every caller.
# ControlClient speaks the Manager's wire protocol itself (`create` once, then
# `accept_connection` and `(ident, method, args, kwds)` requests, as `BaseProxy` does) over a
# socket on which every operation has a kernel timeout and every answer is awaited with
# `Connection.poll`.

EXPOSED = ("publish_config", "record_error", "clear_error", "add_backend", "remove_backend",
           "set_drained", "publish_health", "eject", "expire_ejections", "set_discovered",
           "snapshot")
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
