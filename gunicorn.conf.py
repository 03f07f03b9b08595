"""gunicorn settings for GoL7-LB. Thin on purpose: the logic lives in gol7lb/hooks.py.

Run: gunicorn -c gunicorn.conf.py gol7lb.wsgi
"""

import os
import sys

from gol7lb import hooks
from gol7lb.config import ConfigError, env_int, load_settings

try:
    hooks.configure(load_settings())
    _port = env_int(os.environ, "PORT", 8080, 1, 65535)
    workers = env_int(os.environ, "WEB_CONCURRENCY", max(2, os.cpu_count() or 1), 1, 512)
except ConfigError as _error:
    sys.stderr.write(f"gol7lb: {_error}\n")
    sys.exit(2)

bind = [f"0.0.0.0:{_port}"]
# gthread: keep-alive client connections wait in a poller, not in a thread, and each worker
# owns its own SO_REUSEPORT listener so the kernel spreads connections evenly (README).
worker_class = "gol7lb.worker.ProxyWorker"
threads = 32
reuse_port = True
keepalive = 5  # seconds an idle client connection is kept open
worker_connections = 1000
graceful_timeout = 30
timeout = 30  # a worker that stops heart-beating (not a slow request) is replaced
# This is the edge: never trust X-Forwarded-* from clients to change wsgi.url_scheme.
forwarded_allow_ips = ""
accesslog = None

on_starting = hooks.on_starting
post_fork = hooks.post_fork
on_reload = hooks.on_reload
on_exit = hooks.on_exit
