"""The master's helper processes, all started, watched and restarted by one mechanism: the
Manager (shared state), the supervisor (health checks), the admin listener and the config
watcher are `ManagedChild`ren; the demo backends are plain subprocesses that are not
restarted (killing one is how you watch failover).

Helpers are started with the spawn method, so they inherit none of gunicorn's sockets,
threads or signal handlers, and they run in their own process group, so a Ctrl-C or a
process-group TERM (honcho, a terminal) reaches only the master, which stops them itself
after its workers have drained. Each is watched by a thread blocked in waitid() on its pid:
gunicorn's master reaps every child with waitpid(-1), so `Process.is_alive()` would lie and
the exit status would be lost to whichever waiter is first. Each helper is therefore watched
through a pidfd: it becomes readable when the helper dies; if gunicorn reaped it first, the
kernel still tells the holder of the pidfd how it ended (PIDFD_INFO_EXIT, Linux 6.15+), so a
`kill -9` is logged as "killed by SIGKILL" whoever reaps. Older kernels: the status is
reported as unknown when gunicorn wins that race; the restart happens all the same.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import logging
import multiprocessing
import multiprocessing.connection
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from gol7lb import logfmt
from gol7lb.logfmt import SwitchableFormatter

log = logging.getLogger("gol7lb.children")
SPAWN = multiprocessing.get_context("spawn")
PROJECT_ROOT = Path(__file__).resolve().parent.parent
_PR_SET_PDEATHSIG = 1
STOP_RESEND_SECONDS = 0.25


class StartupError(Exception):
    """Something the LB needs could not be set up; str() is the one line for the operator."""


def configure_child_logging() -> None:
    """Spawned children start with bare logging; match gunicorn's error-log format on stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(SwitchableFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Ask Linux to signal us when our parent (the gunicorn master) dies, even by kill -9.

    No-op where prctl is unavailable.
    """
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(0)


def set_process_title(role: str) -> None:
    """`gol7lb: supervisor` in ps and top (setproctitle, the package gunicorn uses too)."""
    try:
        from setproctitle import setproctitle
    except ImportError:
        return
    setproctitle(f"gol7lb: {role}")


# Signals a terminal or a process manager (honcho, a shell's Ctrl-C) sends to the master's
# whole process group. They are blocked while a helper is spawned, so it inherits them blocked
# and none can reach it before it has left that group.
GROUP_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM, signal.SIGQUIT})


def init_helper_process(role: str) -> None:
    """First thing in every helper the master spawns: its title, its own process group, and
    death with the master.

    A group signal that arrived while it started is pending (blocked by the spawner): it was
    meant for the master, so it is discarded (ignoring a pending signal drops it) before the
    signals are unblocked. SIGINT stays ignored; TERM and QUIT get their default action back
    until the helper sets its own handler."""
    set_process_title(role)
    with contextlib.suppress(OSError):
        os.setpgid(0, 0)
    for sig in GROUP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, GROUP_SIGNALS)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGQUIT, signal.SIG_DFL)
    die_with_parent()


def helper_main(role: str, on_term: Callable[[], object] | None = None) -> threading.Event:
    """The start of every helper's `run()`: init_helper_process(role) (its title, its own
    process group, death with the master), gunicorn's log format on stderr, and TERM handled.

    The master's death reaches a helper the way the master's stop does, as a TERM (PDEATHSIG,
    set by init_helper_process), so there is one way to end: TERM sets the returned event,
    which the helper's loop watches, and calls `on_term` (every time) when given."""
    init_helper_process(role)
    configure_child_logging()
    stop = threading.Event()

    def on_signal(*_: object) -> None:
        stop.set()
        if on_term is not None:
            on_term()

    signal.signal(signal.SIGTERM, on_signal)
    return stop


def describe_exit(code: int, status: int) -> str:
    """waitid()'s si_code and si_status in words: 'exit 1', 'killed by SIGKILL'."""
    if code == os.CLD_EXITED:
        return f"exit {status}"
    try:
        name = signal.Signals(status).name
    except ValueError:
        name = f"signal {status}"
    return f"killed by {name}" + (" (core dumped)" if code == os.CLD_DUMPED else "")


def describe_wait_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        return describe_exit(os.CLD_KILLED, os.WTERMSIG(status))
    return describe_exit(os.CLD_EXITED, os.WEXITSTATUS(status))


# linux/pidfd.h: PIDFD_GET_INFO = _IOWR(0xFF, 11, struct pidfd_info) with its 64-byte first
# version; exit_code (a wait status) is the s32 at offset 60 when PIDFD_INFO_EXIT is set.
_PIDFD_INFO_SIZE = 64
_PIDFD_GET_INFO = (3 << 30) | (_PIDFD_INFO_SIZE << 16) | (0xFF << 8) | 11
_PIDFD_INFO_EXIT = 1 << 3


def pidfd_exit_status(pidfd: int) -> int | None:
    """How a process ended, from its pidfd, even after someone else reaped it; None when the
    kernel cannot tell (before Linux 6.15, or not reaped yet)."""
    info = bytearray(_PIDFD_INFO_SIZE)
    struct.pack_into("=Q", info, 0, _PIDFD_INFO_EXIT)
    try:
        fcntl.ioctl(pidfd, _PIDFD_GET_INFO, info, True)
    except OSError:
        return None
    (mask,) = struct.unpack_from("=Q", info, 0)
    if not mask & _PIDFD_INFO_EXIT:
        return None
    code: int = struct.unpack_from("=i", info, 60)[0]
    return code


class ManagedChild:
    """One helper process, re-created from the same target and arguments on every restart."""

    def __init__(self, name: str, target: Callable[..., None], args: Sequence[Any]) -> None:
        self.name = name
        self.target = target
        self.args = tuple(args)
        self.process: Any = None
        self.pidfd: int | None = None
        self.started_at = 0.0
        self.quick_deaths = 0

    def start(self) -> None:
        # A spawned child starts with the module defaults: hand it the master's log format
        # and levels, or its first lines (before it reads the shared state) are text in a
        # JSON log.
        self.process = SPAWN.Process(target=_run_with_log_settings,
                                     args=(logfmt.current_format(), logfmt.current_levels(),
                                           self.target, *self.args),
                                     name=f"gol7lb-{self.name}", daemon=True)
        # Group signals blocked in this thread while it spawns: the child inherits the mask,
        # so a Ctrl-C or a TERM to the group while it is still importing waits until
        # init_helper_process() has left the group and drops it (the master's other threads
        # still take the signal).
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, GROUP_SIGNALS)
        try:
            self.process.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        self.started_at = time.monotonic()
        try:
            self.pidfd = os.pidfd_open(self.process.pid)
        except (OSError, AttributeError):  # gone already, or no pidfd on this platform
            self.pidfd = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def wait_exit(self) -> str:
        """Block until the process is gone; how it ended."""
        pidfd = self.pidfd
        if pidfd is None:
            multiprocessing.connection.wait([self.process.sentinel])
            return "exit status unknown"
        try:
            select.select([pidfd], [], [])  # readable once the process has exited
            try:
                result = os.waitid(os.P_PIDFD, pidfd, os.WEXITED | os.WNOHANG)
            except ChildProcessError:  # gunicorn's reaper got there first
                result = None
            if result is not None:
                return describe_exit(result.si_code, result.si_status)
            status = pidfd_exit_status(pidfd)
            return "exit status unknown" if status is None else describe_wait_status(status)
        finally:
            os.close(pidfd)
            if self.pidfd == pidfd:
                self.pidfd = None

    def restart_delay(self) -> float:
        """Back off only when the child keeps dying right after it starts."""
        self.quick_deaths = self.quick_deaths + 1 if time.monotonic() - self.started_at < 5 else 0
        return min(30.0, 0.25 * 2 ** self.quick_deaths) if self.quick_deaths else 0.0

    def stop(self, timeout: float) -> None:
        """TERM, repeated every STOP_RESEND_SECONDS: a helper still starting holds it blocked
        and drops it with any group signal pending (init_helper_process), so one TERM could
        be lost. KILL when it is still there after `timeout`."""
        process = self.process
        if process is None or process.pid is None:
            return
        deadline = time.monotonic() + timeout
        while True:
            signal_pid(process.pid, signal.SIGTERM)
            left = deadline - time.monotonic()
            if multiprocessing.connection.wait([process.sentinel],
                                               max(0.0, min(STOP_RESEND_SECONDS, left))):
                break
            if left <= STOP_RESEND_SECONDS:
                log.warning("%s (pid %s) did not stop within %gs; killing it", self.name,
                            process.pid, timeout)
                signal_pid(process.pid, signal.SIGKILL)
                multiprocessing.connection.wait([process.sentinel], 2.0)
                break
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(process.pid, os.WNOHANG)  # reap it ourselves if gunicorn has not


def _run_with_log_settings(fmt: logfmt.LogFormat, levels: tuple[str, ...],
                           target: Callable[..., None], *args: Any) -> None:
    logfmt.set_format(fmt)
    logfmt.set_levels(levels)
    target(*args)


def signal_pid(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


class ChildWatcher:
    """One thread per helper in the master: restarts it when it dies, unless stopping."""

    def __init__(self, children: Sequence[ManagedChild]) -> None:
        self.children = list(children)
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._shutting_down = False  # a plain flag: set from a signal handler

    def shutting_down(self) -> None:
        """The master got TERM, INT or QUIT: from now on a helper that ends is not restarted
        (the master stops them all after its workers). Safe in a signal handler."""
        self._shutting_down = True

    def _restarts(self) -> bool:
        return not (self._shutting_down or self._stopping.is_set())

    def start_child(self, child: ManagedChild) -> None:
        """Start one helper now (in start-up order) and watch it from then on."""
        child.start()
        log.info("started %s (pid %s)", child.name, child.pid)
        threading.Thread(target=self._watch, args=(child,), name=f"gol7lb-watch-{child.name}",
                         daemon=True).start()

    def _watch(self, child: ManagedChild) -> None:
        while True:
            how = child.wait_exit()
            with self._lock:
                if not self._restarts():
                    if not self._stopping.is_set():
                        log.info("%s (pid %s) ended while the master shuts down (%s)",
                                 child.name, child.pid, how)
                    return
                delay = child.restart_delay()
                log.error("%s (pid %s) died (%s); restarting%s", child.name, child.pid, how,
                          f" in {delay:.2f}s" if delay else "")
            if self._stopping.wait(delay):
                return
            with self._lock:
                if not self._restarts():
                    return
                child.start()
                log.info("restarted %s (pid %s)", child.name, child.pid)

    def stop(self, timeout: float = 5.0) -> None:
        with self._lock:
            self._stopping.set()
            for child in reversed(self.children):  # the Manager, started first, stops last
                child.stop(timeout)


class DemoBackends:
    """The three demo backends started when no backend is configured."""

    def __init__(self, ports: Sequence[int], host: str = "127.0.0.1") -> None:
        self.ports = list(ports)
        self.host = host
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, timeout: float = 10.0) -> None:
        for port in self.ports:
            if _port_taken(self.host, port):
                raise StartupError(
                    f"demo backend port {self.host}:{port} is in use: free it, or configure "
                    "backends with GOL7LB_BACKENDS or a [[backends]] table in GOL7LB_CONFIG")
        for port in self.ports:
            self.procs.append(subprocess.Popen(
                [sys.executable, "-m", "backend", str(port), "--host", self.host],
                cwd=PROJECT_ROOT, stdin=subprocess.DEVNULL, start_new_session=True,
                preexec_fn=die_with_parent,  # noqa: PLW1509 - no threads exist yet
            ))
        deadline = time.monotonic() + timeout
        for port, proc in zip(self.ports, self.procs, strict=True):
            while not _port_taken(self.host, port):
                if proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise StartupError(f"demo backend on {self.host}:{port} did not start")
                time.sleep(0.05)
        log.info("no backend configured: started demo backends on %s (pids %s)",
                 ", ".join(f"{self.host}:{p}" for p in self.ports),
                 ", ".join(str(p.pid) for p in self.procs))

    def stop(self, timeout: float = 5.0) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                signal_pid(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(2.0)
        if self.procs:
            log.info("stopped demo backends")
        self.procs = []


def _port_taken(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False
