"""Per-request cost of learning backend liveness: the generation check every request pays,
against a Manager read (one IPC round trip), the design this project avoids on the hot path.

Run: python benchmarks/liveness_cost.py
"""

from __future__ import annotations

import time
import timeit

from gol7lb.backends import parse_backend_url
from gol7lb.state import LivenessView, SharedCounters, connect_table, start_manager


def per_call_us(fn, number: int) -> float:
    best = min(timeit.repeat(fn, number=number, repeat=5))
    return best / number * 1e6


def main() -> None:
    manager = start_manager()
    try:
        table = connect_table(manager.address, bytes(manager._authkey))
        backends = [parse_backend_url(f"http://127.0.0.1:{8081 + i}") for i in range(3)]
        for b in backends:
            table[b.url] = {"url": b.url, "alive": True}
        counters = SharedCounters()
        view = LivenessView(backends, "round_robin", counters,
                            lambda: connect_table(manager.address, bytes(manager._authkey)))
        view.policy()  # first read
        cached = per_call_us(lambda: view.policy().order(counters.take_ticket()), 200_000)
        ipc = per_call_us(lambda: table.copy(), 2_000)
        started = time.perf_counter()
        counters.bump_generation()
        view.policy()
        refresh = (time.perf_counter() - started) * 1e6
        print(f"generation check + ticket + pick (every request): {cached:.2f} us")
        print(f"Manager read (one IPC round trip), per request if done naively: {ipc:.1f} us")
        print(f"refresh after a liveness change (once per change per worker): {refresh:.1f} us")
        print(f"ratio: {ipc / cached:.0f}x")
    finally:
        manager.shutdown()


if __name__ == "__main__":
    main()
