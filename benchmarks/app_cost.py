"""CPU per request of the proxy app alone (no worker, no client sockets), in-process, against
one real nginx backend: what each operator feature costs on the hot path.

Run: bash benchmarks/setup.sh && python benchmarks/app_cost.py

Prints the CPU microseconds per request (best of 3 runs of 5,000 requests) with everything as
shipped, without the access log, without metrics, and without both; and as shipped with a
local rate limit on every request (a budget that never runs out, so each request pays the
check and goes on).
"""

from __future__ import annotations

import atexit
import io
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:  # ours, so removed when the run ends
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="gol7lb-metrics-")
    atexit.register(shutil.rmtree, os.environ["PROMETHEUS_MULTIPROC_DIR"], True)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_targets import start_backend  # noqa: E402

from gol7lb.accesslog import AccessLog  # noqa: E402
from gol7lb.backends import parse_backend_url  # noqa: E402
from gol7lb.config import Settings  # noqa: E402
from gol7lb.control import Snapshot  # noqa: E402
from gol7lb.counters import SharedCounters  # noqa: E402
from gol7lb.hosts import HostTable  # noqa: E402
from gol7lb.pooltable import build_table  # noqa: E402
from gol7lb.proxy import ProxyApp  # noqa: E402
from gol7lb.ratelimit import RateLimitSpec, install  # noqa: E402


class FixedView:
    """The pool table of one snapshot, as a worker's cached view would serve it."""

    def __init__(self, snapshot: Snapshot) -> None:
        self.table = build_table(snapshot, None)

    def current(self):  # noqa: ANN201
        return self.table

    def rebuild(self):  # noqa: ANN201
        return self.table


def app_for(port: int, tmp: Path, access_log: bool, metrics: bool,
            rate_limit: bool = False) -> ProxyApp:
    backends = (parse_backend_url(f"http://127.0.0.1:{port}"),)
    settings = Settings(backends=backends)
    if rate_limit:  # the buckets as workers share them: with the cross-process byte locks
        install(str(tmp / "ratelimit.lock"))
        settings = Settings(backends=backends, rate_limit="all",
                            rate_limits=(RateLimitSpec("all", 1e9, 1.0, 10**9),))
    backend_id = backends[0].id
    snapshot = Snapshot(1, 1, 0.0, None, settings, settings.pools, {backend_id: "config"},
                        {backend_id: 0}, {backend_id: {"alive": True}})
    hosts = HostTable(4, lock_path=str(tmp / "hosts.lock"))
    app = ProxyApp(FixedView(snapshot), SharedCounters(), hosts.for_worker(0), None, 32,  # type: ignore[arg-type]
                   access_log=AccessLog(os.open(os.devnull, os.O_WRONLY)))
    if not access_log:
        app.access_log.write = lambda *args, **kwargs: None  # type: ignore[method-assign]
    if not metrics:
        app.recorder.record = lambda *args, **kwargs: None  # type: ignore[method-assign]
    return app


def cpu_per_request(app: ProxyApp, count: int = 5000) -> float:
    def one() -> None:
        environ = {"REQUEST_METHOD": "GET", "RAW_URI": "/", "PATH_INFO": "/",
                   "REMOTE_ADDR": "127.0.0.1", "wsgi.url_scheme": "http", "HTTP_HOST": "x",
                   "SERVER_PORT": "8080", "wsgi.input": io.BytesIO(b""),
                   "HTTP_USER_AGENT": "wrk", "HTTP_ACCEPT": "*/*"}
        body = app(environ, lambda status, headers: None)
        for _ in body:
            pass
        getattr(body, "close", lambda: None)()

    for _ in range(500):
        one()
    best = float("inf")
    for _ in range(3):
        started = time.process_time()
        for _ in range(count):
            one()
        best = min(best, (time.process_time() - started) / count * 1e6)
    return best


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="gol7lb-app-cost-") as tmp_text:
        tmp = Path(tmp_text)
        backend = start_backend(tmp, 0, workers=1)
        try:
            for name, log, metrics, limit in (
                    ("as shipped", True, True, False), ("no access log", False, True, False),
                    ("no metrics", True, False, False), ("neither", False, False, False),
                    ("rate limit", True, True, True)):
                cost = cpu_per_request(app_for(backend.port, tmp, log, metrics, limit))
                print(f"{name:<14} {cost:6.1f} us CPU per request (proxy app only)")
        finally:
            backend.proc.stop()


if __name__ == "__main__":
    main()
