"""Per-request cost of learning backend state: the generation check every request pays,
against a Manager read (one IPC round trip), the design this project avoids on the hot path.

Run: python benchmarks/liveness_cost.py
"""

from __future__ import annotations

import multiprocessing
import os
import tempfile
import time
import timeit

from gol7lb.backends import parse_backend_url
from gol7lb.balancer import PickContext
from gol7lb.config import Settings
from gol7lb.counters import SharedCounters
from gol7lb.hosts import HostTable
from gol7lb.manager import ControlClient, run_manager
from gol7lb.pooltable import build_table
from gol7lb.view import CachedView


def per_call_us(fn, number: int) -> float:
    best = min(timeit.repeat(fn, number=number, repeat=5))
    return best / number * 1e6


def main() -> None:
    directory = tempfile.mkdtemp(prefix="gol7lb-bench-")
    address = os.path.join(directory, "manager.sock")
    authkey = os.urandom(16)
    counters = SharedCounters()
    hosts = HostTable(worker_slots=4, lock_path=os.path.join(directory, "hosts.lock"))
    manager = multiprocessing.get_context("spawn").Process(
        target=run_manager, args=(address, authkey, counters, hosts,
                                  os.path.join(directory, "state.pickle")), daemon=True)
    manager.start()
    try:
        client = ControlClient(address, authkey)
        deadline = time.monotonic() + 20
        while True:
            try:
                client.call("snapshot")
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        backends = tuple(parse_backend_url(f"http://127.0.0.1:{8081 + i}") for i in range(3))
        client.call("publish_config", Settings(backends=backends), time.time())
        view = CachedView(counters, client, build_table, lambda: None)

        def pick() -> object:
            pool = view.current().pools["default"]
            return pool.policy.order(PickContext(counters.take_ticket()))[0]

        cached = per_call_us(pick, 200_000)
        ipc = per_call_us(client.snapshot, 2_000)
        started = time.perf_counter()
        counters.bump_generation()
        view.current()
        refresh = (time.perf_counter() - started) * 1e6
        print(f"generation check + ticket + pick (every request): {cached:.2f} us")
        print(f"Manager read (one IPC round trip), per request if done naively: {ipc:.1f} us")
        print(f"refresh after a change (once per change per worker): {refresh:.1f} us")
        print(f"ratio: {ipc / cached:.0f}x")
    finally:
        manager.terminate()
        manager.join(5)


if __name__ == "__main__":
    main()
