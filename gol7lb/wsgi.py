"""The WSGI entry point: `gunicorn -c gunicorn.conf.py gol7lb.wsgi`.

The proxy is built once per worker, right after the fork (gunicorn's `post_worker_init`
hook calls `build_app`), and it reads the shared state before the first request: a new
worker never serves from a configuration or a liveness older than the current one. If the
hook did not run (another server configuration), the first request builds it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Any

from gol7lb import hooks
from gol7lb.manager import ControlClient
from gol7lb.pooltable import PoolTable, build_table
from gol7lb.proxy import ProxyApp
from gol7lb.view import CachedView

WORKER_CALL_SECONDS = 1.0
_app: ProxyApp | None = None
_lock = threading.Lock()


def build_app() -> ProxyApp:
    global _app
    with _lock:
        if _app is None:
            rt = hooks.runtime()
            # a request thread may be the one that re-reads: keep its worst wait short
            client = ControlClient(rt.address, rt.authkey, timeout=WORKER_CALL_SECONDS)
            view: CachedView[PoolTable] = CachedView(
                rt.counters, client, build_table, lambda: build_table(rt.startup_snapshot(), None))
            _app = ProxyApp(view, rt.counters, rt.hosts.for_worker(rt.worker_slot), client,
                            rt.threads)
        return _app


def application(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    app = _app or build_app()
    return app(environ, start_response)
