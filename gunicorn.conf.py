"""gunicorn settings for GoL7-LB. Thin on purpose: the logic lives in gol7lb/hooks.py.

Run: gunicorn -c gunicorn.conf.py gol7lb.wsgi

gunicorn runs this file again on SIGHUP. Then it must not validate or exit (a SystemExit
here would take the master down): the `on_reload` hook validates the new configuration and
keeps the running one if it is bad.
"""

import os
import sys

from gol7lb import rundir

rundir.prepare()  # before anything imports prometheus_client: it reads its directory at import

from gol7lb import admin, cpus, hooks, logfmt  # noqa: E402
from gol7lb.config import ConfigError, env_int, load_settings  # noqa: E402
from gol7lb.tls import TLSServer  # noqa: E402

if hooks.boot() is None:  # the first read, at start: a bad setting stops the start here
    try:
        _settings = load_settings()
        _port = env_int(os.environ, "PORT", 8080, 1, 65535)
        _workers = env_int(os.environ, "WEB_CONCURRENCY", cpus.default_workers(), 1, 512)
        hooks.check_listen_port(_port)
        _redirect = _settings.tls.redirect_port
        if _redirect == _port:
            raise ConfigError(f"invalid setting tls.redirect_port = {_redirect}: it is PORT; "
                              "choose another port for the plain-HTTP redirects")
        if _redirect:
            hooks.check_listen_port(_redirect)
        admin.check_bind(_settings.admin.bind, _settings.admin.address)
        # HTTPS: the contexts are built here, before any fork, so every worker shares their
        # session-ticket keys; a pair that does not load stops the start naming its file.
        _tls = TLSServer.from_settings(_settings) if _settings.tls.enabled else None
    except ConfigError as _error:
        sys.stderr.write(f"gol7lb: {_error}\n")
        sys.exit(2)
    hooks.configure(_settings, _port, _workers, _tls)
    logfmt.apply(_settings.log)  # before gunicorn logs "Starting gunicorn"

_boot = hooks.boot()
bind = [f"0.0.0.0:{_boot.port}"]
if _boot.tls is not None and _boot.settings.tls.redirect_port:  # plain HTTP: 308 to HTTPS
    bind.append(f"0.0.0.0:{_boot.settings.tls.redirect_port}")
workers = _boot.workers
worker_class = "gol7lb.worker.ProxyWorker"
threads = 32
# One listening socket, opened by the master and shared by the workers: a worker that retires
# (SIGHUP, max age) closes only its copy, so no queued connection is ever reset, and a second
# instance on the same port cannot bind. (gunicorn's reuse_port gives each worker a socket of
# its own, whose queue dies with it.)
reuse_port = False
keepalive = 5  # seconds an idle client connection is kept open
worker_connections = 1000
graceful_timeout = 30
timeout = 30  # a worker that stops heart-beating (not a slow request) is replaced
# This is the edge: never trust X-Forwarded-* from clients to change wsgi.url_scheme.
forwarded_allow_ips = ""
accesslog = None  # the proxy writes its own access log (log.access), with pool and backend
logger_class = logfmt.GunicornLogger  # error lines as JSON too when log.format = "json"
_control_socket = rundir.socket_address("gunicorn.ctl", abstract=False)
if _control_socket is None:  # its path would not fit in a Unix socket address (107 bytes)
    control_socket_disable = True  # hooks.on_starting says so in the log
else:
    control_socket = _control_socket  # one per instance, never shared

on_starting = hooks.on_starting
pre_fork = hooks.pre_fork
post_fork = hooks.post_fork
post_worker_init = hooks.post_worker_init
child_exit = hooks.child_exit
on_reload = hooks.on_reload
on_exit = hooks.on_exit
