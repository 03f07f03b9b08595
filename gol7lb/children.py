"""The master's helper processes: the supervisor and the admin listener (restarted when they
die) and the demo backends (not restarted: killing one is how you watch failover).

Helpers are started with the spawn method, so they inherit none of gunicorn's sockets,
threads or signal handlers. Their liveness is watched through `Process.sentinel`, because
gunicorn's master reaps every child with waitpid(-1) and `is_alive()` would lie.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger("gunicorn.error")
LOG_FORMAT = "[%(asctime)s] [%(process)d] [%(levelname)s] %(message)s"


def configure_child_logging() -> None:
    """Spawned children start with bare logging; match gunicorn's error-log format on stderr."""
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format=LOG_FORMAT,
                        datefmt="%Y-%m-%d %H:%M:%S %z")



_PR_SET_PDEATHSIG = 1


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


def init_helper_process() -> None:
    """First thing in every helper the master spawns.

    Ctrl-C reaches the whole process group; helpers ignore it because the master stops them
    itself, after its workers have drained.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with_parent()


SPAWN = multiprocessing.get_context("spawn")
PROJECT_ROOT = Path(__file__).resolve().parent.parent


class StartupError(Exception):
    """Something the LB needs could not be set up; str() is the one line for the operator."""


class ManagedChild:
    """One helper process, re-created from the same target and arguments on every restart."""

    def __init__(self, name: str, target: Callable[..., None], args: Sequence[Any]) -> None:
        self.name = name
        self.target = target
        self.args = tuple(args)
        self.process: Any = None
        self.started_at = 0.0
        self.quick_deaths = 0

    def start(self) -> None:
        self.process = SPAWN.Process(target=self.target, args=self.args,
                                     name=f"gol7lb-{self.name}", daemon=True)
        self.process.start()
        self.started_at = time.monotonic()

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def restart_delay(self) -> float:
        """Back off only when the child keeps dying right after it starts."""
        self.quick_deaths = self.quick_deaths + 1 if time.monotonic() - self.started_at < 5 else 0
        return min(30.0, 0.25 * 2 ** self.quick_deaths)

    def stop(self, timeout: float) -> None:
        process = self.process
        if process is None or process.pid is None:
            return
        _signal(process.pid, signal.SIGTERM)
        if not multiprocessing.connection.wait([process.sentinel], timeout):
            _signal(process.pid, signal.SIGKILL)
            multiprocessing.connection.wait([process.sentinel], 2.0)
        process.join(0)  # reap it ourselves if gunicorn has not


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


class ChildWatcher(threading.Thread):
    """A thread in the master that restarts a helper whose sentinel fires, unless stopping."""

    def __init__(self, children: Sequence[ManagedChild]) -> None:
        super().__init__(name="gol7lb-child-watcher", daemon=True)
        self.children = list(children)
        self._stopping = threading.Event()
        self._lock = threading.Lock()

    def start_children(self) -> None:
        for child in self.children:
            child.start()
            log.info("started %s (pid %s)", child.name, child.pid)
        self.start()

    def run(self) -> None:
        while not self._stopping.is_set():
            by_sentinel = {c.process.sentinel: c for c in self.children if c.process}
            ready = multiprocessing.connection.wait(list(by_sentinel), timeout=1.0)
            for sentinel in ready:
                child = by_sentinel[sentinel]
                with self._lock:
                    if self._stopping.is_set():
                        return
                    child.process.join(0)
                    delay = child.restart_delay()
                    log.error("%s (pid %s) died (exit %s); restarting in %.2fs", child.name,
                              child.pid, child.process.exitcode, delay)
                if self._stopping.wait(delay):
                    return
                with self._lock:
                    if self._stopping.is_set():
                        return
                    child.start()
                    log.info("restarted %s (pid %s)", child.name, child.pid)

    def stop(self, timeout: float = 5.0) -> None:
        with self._lock:
            self._stopping.set()
            for child in self.children:
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
                _signal(proc.pid, signal.SIGTERM)
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
