"""The WSGI entry point: `gunicorn -c gunicorn.conf.py gol7lb.wsgi`.

The proxy is built lazily, once per worker, because gunicorn may import this module in the
master (preload) before the shared state exists.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Any

from gol7lb import hooks
from gol7lb.proxy import ProxyApp
from gol7lb.state import LivenessView, connect_table

_app: ProxyApp | None = None
_lock = threading.Lock()


def build_app() -> ProxyApp:
    rt = hooks.runtime()
    settings = rt.settings
    view = LivenessView(settings.backends, settings.algorithm, rt.counters,
                        lambda: connect_table(rt.address, rt.authkey))
    return ProxyApp(settings, view, rt.counters)


def application(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    global _app
    app = _app
    if app is None:
        with _lock:
            if _app is None:
                _app = build_app()
            app = _app
    return app(environ, start_response)
