"""The admin listener: /healthz for orchestrators, /status and /metrics for people and
Prometheus, the runtime API (drain, enable, add, remove backends) and the dashboard page.

Its own process, so a slow or hostile admin client never takes a proxy worker's thread. The
socket is bound by the master, so a busy admin port stops the start instead of this child.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading

from gol7lb.admin.server import AdminServer
from gol7lb.children import configure_child_logging, init_helper_process
from gol7lb.hosts import HostTable
from gol7lb.state import ControlClient, SharedCounters


def bind_listener(address: tuple[str, int]) -> socket.socket:
    """Bind in the master; OSError reaches the caller so a busy port is a start-up error."""
    host, port = address
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(64)
    except OSError:
        sock.close()
        raise
    return sock


def run(sock: socket.socket, address: str, authkey: bytes, counters: SharedCounters,
        hosts: HostTable) -> None:
    """Entry point of the admin process (spawned by the master, restarted if it dies)."""
    init_helper_process("admin listener")
    configure_child_logging()
    server = AdminServer(sock, ControlClient(address, authkey), counters, hosts)
    stopping = threading.Event()

    def on_term(*_: object) -> None:  # the master may send TERM more than once
        if not stopping.is_set():
            stopping.set()
            threading.Thread(target=server.shutdown).start()

    signal.signal(signal.SIGTERM, on_term)
    parent = os.getppid()

    def watch_parent() -> None:
        while os.getppid() == parent:
            threading.Event().wait(1.0)
        server.shutdown()

    threading.Thread(target=watch_parent, daemon=True).start()
    server.serve_forever(poll_interval=0.5)
    server.server_close()
    sys.exit(0)
