"""The admin listener: /healthz for orchestrators, /status and /metrics for people and
Prometheus, the runtime API (drain, enable, add, remove backends) and the dashboard page.

Its own process, so a slow or hostile admin client never takes a proxy worker's thread. The
socket is bound by the master, so a busy admin port stops the start instead of this child.
"""

from __future__ import annotations

import socket
import sys
import threading

from gol7lb.admin.server import AdminServer
from gol7lb.children import helper_main
from gol7lb.config import ConfigError
from gol7lb.counters import SharedCounters
from gol7lb.hosts import HostTable
from gol7lb.manager import ControlClient


def bind_listener(address: tuple[str, int], backlog: int = 64) -> socket.socket:
    """Bind in the master; OSError reaches the caller so a busy port is a start-up error.
    With backlog 0 the socket is bound but not listening (a probe)."""
    host, port = address
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        if backlog:
            sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    return sock


def check_bind(bind: str, address: tuple[str, int] | None) -> None:
    """Refuse to start, before gunicorn does anything, when the admin address cannot be bound
    (a second instance, mostly): one line and exit 2, like a PORT clash."""
    if address is None:
        return
    try:
        bind_listener(address, backlog=0).close()
    except OSError as e:
        raise bind_error(bind, e) from None


def bind_error(bind: str, error: OSError) -> ConfigError:
    return ConfigError(f"admin.bind {bind!r} (GOL7LB_ADMIN_BIND) cannot be bound: "
                       f"{error.strerror or error}; another GoL7-LB instance or another server "
                       "may listen there: stop it, or set another address with "
                       "GOL7LB_ADMIN_BIND (\"\" turns the admin listener off)")


def run(sock: socket.socket, address: str, authkey: bytes, counters: SharedCounters,
        hosts: HostTable) -> None:
    """Entry point of the admin process (spawned by the master, restarted if it dies)."""
    stop = helper_main("admin listener")
    server = AdminServer(sock, ControlClient(address, authkey), counters, hosts)

    def shutdown_on_stop() -> None:  # however many TERMs the master sends: one shutdown
        stop.wait()
        server.shutdown()

    threading.Thread(target=shutdown_on_stop, daemon=True).start()
    server.serve_forever(poll_interval=0.5)
    server.server_close()
    sys.exit(0)
