"""Processes of the benchmark: start on free loopback ports, measure a tree, stop by PID."""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import psutil


def free_port() -> int:
    """A loopback port nobody listens on right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(port: int, path: str = "/", timeout: float = 2.0) -> tuple[int, bytes]:
    """One GET to 127.0.0.1:port; returns (status, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


class StartError(RuntimeError):
    """A target did not come up; the message says why (for the report)."""


class Proc:
    """A started process and its descendants, remembered by PID so they can be stopped."""

    def __init__(self, name: str, argv: Sequence[str], log: Path, cwd: Path | None = None,
                 env: dict[str, str] | None = None, stop_signal: int = signal.SIGTERM) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log
        self.stop_signal = stop_signal
        full_env = dict(os.environ)
        full_env.update(env or {})
        full_env.setdefault("PYTHONUNBUFFERED", "1")
        with open(log, "wb") as out:
            self.popen = subprocess.Popen(
                self.argv, env=full_env, cwd=str(cwd) if cwd else None,
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )
        self.pid = self.popen.pid
        # pid -> create_time, so a PID reused by an unrelated process is never signalled.
        self.seen: dict[int, float] = {}
        self.tree()
        self.killed = False  # True when stop() had to SIGKILL something
        self.killed_what: list[str] = []

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tree(self) -> list[psutil.Process]:
        """The live root and its descendants; also remembers their PIDs for the final stop."""
        try:
            root = psutil.Process(self.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []
        for p in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                self.seen.setdefault(p.pid, p.create_time())
        return procs

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.strip().splitlines()[-lines:])

    def stop(self, timeout: float = 15.0, grace: float = 5.0) -> int | None:
        """The stop signal to the root; after it exits, descendants get `grace` seconds to
        go too; then KILL whatever of the tree is still there (listed in `killed_what`)."""
        self.tree()
        if self.popen.poll() is None:
            try:
                self.popen.send_signal(self.stop_signal)
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.killed = True
                self.killed_what.append(f"root {self.pid} ({timeout:g} s after the signal)")
                self.popen.kill()
                self.popen.wait(timeout=5)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(
                pid_alive(pid, created) for pid, created in self.seen.items()):
            time.sleep(0.05)
        for pid, created in self.seen.items():
            if pid_alive(pid, created):
                self.killed = True
                self.killed_what.append(f"{pid} ({describe(pid)}) {grace:g} s after the root")
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        return self.popen.returncode

    def leftovers(self, timeout: float = 5.0) -> list[int]:
        """PIDs of the tree still alive (zombies count as gone) after waiting a little."""
        deadline = time.monotonic() + timeout
        while True:
            alive = [pid for pid, created in sorted(self.seen.items())
                     if pid_alive(pid, created)]
            if not alive or time.monotonic() > deadline:
                return alive
            time.sleep(0.1)


def describe(pid: int) -> str:
    try:
        return " ".join(psutil.Process(pid).cmdline())[:120] or psutil.Process(pid).name()
    except psutil.Error:
        return "gone"


def pid_alive(pid: int, created: float | None = None) -> bool:
    """The process runs (a zombie counts as gone) and, if given, was created at `created`."""
    try:
        p = psutil.Process(pid)
        if created is not None and abs(p.create_time() - created) > 0.01:
            return False
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_http_ok(proc: Proc, port: int, timeout: float, path: str = "/") -> None:
    """Block until GET path answers 200; StartError (with the log's tail) if it never does."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if not proc.alive():
            raise StartError(f"{proc.name} exited with status {proc.popen.returncode} "
                             f"before answering; log tail:\n{proc.log_tail()}")
        try:
            status, _ = http_get(port, path, timeout=1.0)
            if status == 200:
                return
            last = f"HTTP {status}"
        except OSError as exc:
            last = f"{type(exc).__name__}: {exc}"
        time.sleep(0.1)
    raise StartError(f"{proc.name} did not answer 200 on {path} within {timeout:.0f} s "
                     f"(last: {last}); log tail:\n{proc.log_tail()}")


def tree_cpu_seconds(procs: list[psutil.Process]) -> float:
    """user+system CPU of every live process, plus what each has reaped from dead children."""
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        total += t.user + t.system + t.children_user + t.children_system
    return total


def tree_rss(procs: list[psutil.Process]) -> int:
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return total


class RssSampler:
    """Samples the summed RSS of a process tree every `interval` s in a thread; keeps the peak."""

    def __init__(self, proc: Proc, interval: float = 0.2) -> None:
        self.proc = proc
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while True:
            self.peak = max(self.peak, tree_rss(self.proc.tree()))
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.peak = max(self.peak, tree_rss(self.proc.tree()))
