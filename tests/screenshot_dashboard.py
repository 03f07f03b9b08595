"""Take docs/dashboard.png: the dashboard of a live LB, in headless Chromium, after a few minutes
of traffic over three weighted backends, one drained and one stopped on the way.

    python -m tests.screenshot_dashboard [docs/dashboard.png] [--seconds 180]

Not a test (pytest does not collect it). It starts everything on free ports and stops it all.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import tempfile
import threading
import time
from pathlib import Path

import requests

from tests.conftest import FAST_HEALTH
from tests.procs import LB, ROOT, free_port, start_backend
from tests.test_dashboard import Browser


def traffic(lb: LB, stop: threading.Event, started: float, period: float) -> None:
    """About 40-110 requests a second in all, rising and falling; some slower ones."""
    with requests.Session() as session:
        n = 0
        while not stop.is_set():
            elapsed = time.monotonic() - started
            rate = 25 + 20 * math.sin(2 * math.pi * elapsed / period)  # per thread
            path = "/sleep/0.05" if n % 10 == 0 else "/"
            with contextlib.suppress(requests.RequestException):
                session.get(lb.url + path, timeout=5)
            n += 1
            stop.wait(1 / rate)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default=str(ROOT / "docs" / "dashboard.png"))
    parser.add_argument("--seconds", type=float, default=180.0)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="gol7lb-shot-"))
    backends = [start_backend(free_port(), tmp) for _ in range(3)]
    a, b, c = backends
    lb = LB({"GOL7LB_BACKENDS": f"http://127.0.0.1:{a.port} weight=3, "
                                f"http://127.0.0.1:{b.port} weight=2, http://127.0.0.1:{c.port}",
             **FAST_HEALTH}, log=tmp / "lb.log").wait_ready()
    browser = Browser(tmp)
    stop = threading.Event()
    try:
        browser.driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
            "width": 1200, "height": 700, "deviceScaleFactor": 1, "mobile": False})
        browser.open(lb.admin_url + "/")
        started = time.monotonic()
        threads = [threading.Thread(target=traffic, args=(lb, stop, started, args.seconds / 2))
                   for _ in range(3)]
        for t in threads:
            t.start()
        time.sleep(args.seconds * 0.4)
        requests.post(f"{lb.admin_url}/backends/127.0.0.1:{c.port}/drain", timeout=10)
        time.sleep(args.seconds * 0.25)
        b.stop()
        time.sleep(args.seconds * 0.35)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        browser.driver.save_screenshot(args.out)
        print(f"saved {args.out}: {browser.states()}")
    finally:
        stop.set()
        left = browser.quit()
        for proc in (lb, *backends):
            proc.stop()
        assert not left, left


if __name__ == "__main__":
    main()
