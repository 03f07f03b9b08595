"""What mirroring costs the request thread, measured on the real code.

Run: python benchmarks/mirror_cost.py

Per mirrored request, the request thread samples it, takes the shadow pool's pick context,
builds the copy's head and puts it on the worker's queue (mirror.py); the sending happens
on the mirror's threads. A request that is not sampled pays only the sampling. The figures
are in docs/performance.md.
"""

from __future__ import annotations

import queue
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's gol7lb
from gol7lb.balancer import PickContext  # noqa: E402
from gol7lb.metrics import RequestRecorder  # noqa: E402
from gol7lb.mirror import Copy, Mirror  # noqa: E402
from gol7lb.upstream import request_head  # noqa: E402

HEADERS = {"Host": "shop.example", "User-Agent": "curl/8.5.0", "Accept": "*/*",
           "X-Forwarded-For": "10.0.0.7", "X-Forwarded-Proto": "http",
           "X-Forwarded-Host": "shop.example", "X-Forwarded-Port": "80",
           "X-Request-ID": "0123456789abcdef0123456789abcdef", "Content-Length": "64"}


def per_call_us(fn: object, count: int = 20000) -> float:
    best = float("inf")
    for _ in range(3):
        started = time.thread_time()
        for _ in range(count):
            fn()  # type: ignore[operator]
        best = min(best, time.thread_time() - started)
    return best / count * 1e6


def costs() -> tuple[float, float]:
    """Microseconds on the request thread: (a request not sampled, a sampled one)."""
    mirror = Mirror(RequestRecorder(), threads=0, size=10**6)
    mirror._started = True  # no sender threads: only the request thread's part is measured
    body = b"x" * 64
    context = PickContext()

    def submit() -> None:
        if mirror.sampled(100.0):
            mirror.submit(Copy(None, context, {}, "POST",  # type: ignore[arg-type]
                               request_head("POST", "/items?x=1", HEADERS), body))

    not_sampled = per_call_us(lambda: mirror.sampled(10.0) and None)
    mirror._queue = queue.Queue(10**6)
    return not_sampled, per_call_us(submit)


def main() -> None:
    not_sampled, sampled = costs()
    print(f"| not sampled (percent = 10, the other 90 %) | {not_sampled:.2f} us |")
    print(f"| sampled: head, copy, queue | {sampled:.2f} us |")

if __name__ == "__main__":
    main()
