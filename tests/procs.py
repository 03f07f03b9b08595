"""Real processes for tests: start on free loopback ports, stop by PID, prove nothing is left."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
# The worker class LBs run with (conftest sets it from `pytest --lb-worker`): "lean" (ours,
# gunicorn.conf.py's default), "gthread" (gunicorn's gthread with our stop behaviours) or
# "stock" (gunicorn's gthread as it comes).
WORKER_CLASS = "lean"
WORKER_ARGS = {"lean": [], "gthread": ["--worker-class", "gol7lb.gthread.ThreadProxyWorker"],
               "stock": ["--worker-class", "gthread"]}


def _ephemeral_range() -> tuple[int, int]:
    """The kernel's range for outgoing connections' local ports (Linux's default if unreadable)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def _port_block() -> range:
    """This test process's own slice of the ports outside the ephemeral range.

    A port the kernel hands out for `bind(0)` comes from the ephemeral range, where the
    other pytest-xdist process's clients and the LB's own upstream connections also take
    their local ports: between `free_port()` and the server's `bind` another socket could
    take it ("Address already in use"). Ports below the ephemeral range are never given to
    outgoing connections, and each xdist process counts through its own slice, so two test
    processes never pick the same port.
    """
    low = 10000
    high = max(low + 2000, _ephemeral_range()[0])
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
    name = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    index = int(name[2:]) if name[2:].isdigit() else 0
    size = (high - low) // max(count, 1)
    start = low + (index % max(count, 1)) * size
    return range(start, start + size)


_PORTS = _port_block()
_next_port = _PORTS.start + (os.getpid() % 97) * 7 % len(_PORTS)


def free_port() -> int:
    """A port nobody listens on now, from this test process's own slice (see _port_block)."""
    global _next_port
    for _ in range(len(_PORTS)):
        port = _next_port
        _next_port = _PORTS.start + (port + 1 - _PORTS.start) % len(_PORTS)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError(f"no free port in {_PORTS}")


def wait_for_port(port: int, host: str = "127.0.0.1", timeout: float = 15.0) -> None:
    """Block until something accepts on host:port, or fail the test."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"nothing listens on {host}:{port} after {timeout}s")


def port_closed(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return False
    except OSError:
        return True


class Proc:
    """A started process and all its descendants, remembered by PID so they can be checked."""

    def __init__(self, argv: Sequence[str], env: dict[str, str] | None = None,
                 cwd: Path | None = None, log: Path | None = None,
                 new_session: bool = False, port: int = 0, unset: Sequence[str] = ()) -> None:
        full_env = dict(os.environ)
        full_env.update(env or {})
        for name in unset:  # not set at all, as opposed to set to ""
            full_env.pop(name, None)
        full_env.setdefault("PYTHONUNBUFFERED", "1")
        self.log_path = log
        out = open(log, "wb") if log else None  # noqa: SIM115
        self.popen = subprocess.Popen(
            list(argv), env=full_env, cwd=str(cwd or ROOT),
            stdout=out or subprocess.DEVNULL, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=new_session,  # its own process group, as a terminal gives it
        )
        if out:
            out.close()
        self.pid = self.popen.pid
        self.seen: set[int] = {self.pid}
        self.port = port  # what it listens on (0: no port the tests use)

    def tree(self) -> list[psutil.Process]:
        """The live process and its descendants; also remembers their PIDs for later checks."""
        try:
            root = psutil.Process(self.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []
        self.seen.update(p.pid for p in procs)
        return procs

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    def signal(self, sig: int) -> None:
        self.tree()
        self.popen.send_signal(sig)

    def wait(self, timeout: float) -> int:
        return self.popen.wait(timeout=timeout)

    def stop(self, timeout: float = 20.0) -> int | None:
        """TERM, then KILL whatever of the tree is still there; returns the exit status."""
        self.tree()
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=5)
        kill_pids(self.seen)
        return self.popen.returncode

    def leftovers(self, timeout: float = 5.0) -> list[int]:
        """PIDs of the tree that are still alive (zombies count as gone) after waiting a little."""
        deadline = time.monotonic() + timeout
        while True:
            alive = [pid for pid in self.seen if pid_alive(pid)]
            if not alive or time.monotonic() > deadline:
                return alive
            time.sleep(0.1)


def pid_alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def kill_pids(pids: set[int]) -> None:
    for pid in pids:
        if pid_alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def start_backend(port: int, tmp_path: Path | None = None, host: str = "127.0.0.1") -> Proc:
    """The demo backend as a real process, waited for until it listens."""
    log = tmp_path / f"backend-{port}.log" if tmp_path else None
    proc = Proc([sys.executable, "-m", "backend", str(port), "--host", host], log=log,
                port=port)
    wait_for_port(port, host)
    return proc


class LB(Proc):
    """A real `gunicorn -c gunicorn.conf.py gol7lb.wsgi`, on free ports, control socket off."""

    def __init__(self, env: dict[str, str], log: Path, extra_args: Sequence[str] = (),
                 new_session: bool = False, unset: Sequence[str] = ()) -> None:
        port = int(env.setdefault("PORT", str(free_port())))
        admin = env.setdefault("GOL7LB_ADMIN_BIND", f"127.0.0.1:{free_port()}")
        if "WEB_CONCURRENCY" not in unset:
            env.setdefault("WEB_CONCURRENCY", "2")
        worker = WORKER_ARGS[WORKER_CLASS]
        super().__init__([sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py",
                          "gol7lb.wsgi", "--no-control-socket", *worker, *extra_args],
                         env=env, log=log, new_session=new_session, port=port, unset=unset)
        self.admin_port = int(admin.rpartition(":")[2]) if admin else None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def wait_ready(self, timeout: float = 30.0) -> LB:
        """Until the workers accept (and the admin listener, when on)."""
        deadline = time.monotonic() + timeout
        ports = [self.port] + ([self.admin_port] if self.admin_port else [])
        for port in ports:
            while port_closed(port):
                if self.popen.poll() is not None:
                    raise AssertionError(
                        f"LB exited with {self.popen.returncode}:\n{self.output()}")
                if time.monotonic() > deadline:
                    raise AssertionError(f"LB not ready after {timeout}s:\n{self.output()}")
                time.sleep(0.05)
        if self.admin_port:  # and every helper is up: /healthz says 200 only then
            while not self._healthy():
                if self.popen.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"LB not healthy after {timeout}s:\n{self.output()}")
                time.sleep(0.05)
        self.tree()
        return self

    def _healthy(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.admin_port), timeout=5) as s:
                s.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
                answer = b""
                while chunk := s.recv(4096):
                    answer += chunk
                return answer.startswith(b"HTTP/1.1 200")
        except OSError:
            return False


# Helper processes are spawned (a fresh interpreter each): on a busy machine they have been
# seen to take 15 s to log their first line after the LB already serves.
HELPERS_START = 60.0


def wait_until(condition, timeout: float = 10.0, interval: float = 0.05):  # noqa: ANN001, ANN201
    """Poll `condition()` until it returns something truthy, and return that; fail the test
    after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(interval)


def seconds_until(condition, timeout: float, interval: float = 0.05) -> float:  # noqa: ANN001
    """Seconds it took for `condition()` to hold (for tests that bound it); fails the test
    after `timeout` seconds."""
    started = time.monotonic()
    wait_until(condition, timeout, interval)
    return time.monotonic() - started


def lb_status(lb: LB) -> dict:
    """The admin listener's /status document."""
    import requests

    return requests.get(lb.admin_url + "/status", timeout=10).json()


def alive_map(lb: LB) -> dict[int, bool]:
    """Each backend's port -> whether /status calls it alive."""
    return {int(b["url"].rsplit(":", 1)[1]): b["alive"] for b in lb_status(lb)["backends"]}


def backend_entry(lb: LB, port: int) -> dict:
    """The /status entry of the backend on 127.0.0.1:port."""
    return next(b for b in lb_status(lb)["backends"] if b["id"] == f"127.0.0.1:{port}")


def workers_of(lb: Proc) -> list[psutil.Process]:
    """The LB master's gunicorn worker processes (not its helpers)."""
    workers = []
    for proc in psutil.Process(lb.pid).children():
        try:
            if "gunicorn" in " ".join(proc.cmdline()):
                workers.append(proc)
        except psutil.Error:  # a worker that just exited
            continue
    return workers


def kill_once_checked(lb: LB, backend: Proc) -> int:
    """Kill a backend once its first health check passed, so it stays "up" until the next
    (tests set a long interval): the LB meets it dead on the request path. Its port."""
    wait_until(lambda: backend_entry(lb, backend.port)["last_check"] is not None, timeout=30)
    backend.popen.kill()
    backend.popen.wait()
    return backend.port
