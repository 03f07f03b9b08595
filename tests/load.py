"""Bounded client load against a local LB, counting every outcome (for reload and kill tests)."""

from __future__ import annotations

import threading
import time
from collections import Counter

import requests


class Load:
    """Requests from a few threads for a bounded time; `fresh=True` opens a new connection per
    request (what a reload's listener hand-over must not reset), else keep-alive sessions."""

    def __init__(self, url: str, threads: int = 4, seconds: float = 30.0,
                 fresh: bool = False) -> None:
        self.url = url
        self.fresh = fresh
        self.stop = threading.Event()
        self.ok = 0
        self.failures: list[str] = []
        self.ports: Counter[int] = Counter()
        self.deadline = time.monotonic() + seconds
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]
        self.lock = threading.Lock()

    def _run(self) -> None:
        with requests.Session() as session:
            while not self.stop.is_set() and time.monotonic() < self.deadline:
                try:
                    if self.fresh:
                        response = requests.get(self.url, timeout=10,
                                                headers={"Connection": "close"})
                    else:
                        response = session.get(self.url, timeout=10)
                    outcome = None if response.status_code == 200 else str(response.status_code)
                except requests.RequestException as e:
                    outcome = f"{type(e).__name__}: {e}"
                with self.lock:
                    if outcome is None:
                        self.ok += 1
                        self.ports[int(response.headers["X-Backend-Port"])] += 1
                    else:
                        self.failures.append(outcome)

    def wait_for(self, count: int, timeout: float = 10.0) -> None:
        """Until at least `count` more requests succeeded (proof the load is flowing)."""
        target = self.ok + count
        deadline = time.monotonic() + timeout
        while self.ok < target:
            assert time.monotonic() < deadline, f"load stalled: {self.failures[:3]}"
            time.sleep(0.02)

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join()
