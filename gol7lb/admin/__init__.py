"""The admin listener: /healthz for orchestrators, /status for people. Its own process, so a
slow or hostile admin client never takes a proxy worker's thread.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from gol7lb.children import configure_child_logging, init_helper_process
from gol7lb.config import Settings
from gol7lb.state import SharedCounters, connect_table

log = logging.getLogger("gol7lb.admin")


def status_document(settings: Settings, table: dict[str, Any], generation: int) -> dict[str, Any]:
    """The /status JSON: configured backends in order, with what the supervisor last saw."""
    backends = []
    for backend in settings.backends:
        record = table.get(backend.url) or {}
        backends.append({
            "url": backend.url,
            "alive": record.get("alive", True),
            "weight": backend.weight,
            "checked": bool(record),
            "since": record.get("since"),
            "consecutive_successes": record.get("successes", 0),
            "consecutive_failures": record.get("failures", 0),
            "checks": record.get("checks", 0),
            "last_check": record.get("last_check"),
        })
    return {
        "algorithm": settings.algorithm,
        "health": {"type": settings.health.type, "interval": settings.health.interval,
                   "timeout": settings.health.timeout, "rise": settings.health.rise,
                   "fall": settings.health.fall},
        "generation": generation,
        "healthy": sum(1 for b in backends if b["alive"]),
        "backends": backends,
    }


class AdminServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, sock: socket.socket, settings: Settings, address: Any, authkey: bytes,
                 counters: SharedCounters) -> None:
        super().__init__(sock.getsockname()[:2], AdminHandler, bind_and_activate=False)
        self.socket.close()
        self.socket = sock  # bound by the master, so bind errors stop the start, not this child
        self.settings = settings
        self.counters = counters
        self._connect = lambda: connect_table(address, authkey)
        self._local = threading.local()

    def table(self) -> Any:
        if getattr(self._local, "table", None) is None:
            self._local.table = self._connect()
        return self._local.table


class AdminHandler(BaseHTTPRequestHandler):
    server: AdminServer
    protocol_version = "HTTP/1.1"
    server_version = "gol7lb-admin"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        """Quiet: orchestrators poll /healthz every few seconds."""

    def _send(self, status: int, body: bytes,
              content_type: str = "text/plain; charset=utf-8") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802
        path = self.path.split("?", 1)[0]
        if path == "/healthz":
            self._send(200, b"ok\n")
        elif path == "/status":
            try:
                table = self.server.table().copy()
            except Exception as e:
                self.server._local.table = None
                log.error("admin cannot read backend state: %s", e)
                self._send(503, b"backend state unavailable\n")
                return
            document = status_document(self.server.settings, table,
                                       self.server.counters.generation)
            self._send(200, json.dumps(document, indent=2).encode() + b"\n", "application/json")
        else:
            self._send(404, b"not found: try /healthz or /status\n")

    do_HEAD = do_GET  # noqa: N815

    def _not_allowed(self) -> None:
        self.send_response(405)
        self.send_header("Allow", "GET, HEAD")
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _not_allowed  # noqa: N815


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


def run(settings: Settings, sock: socket.socket, address: Any, authkey: bytes,
        counters_array: Any) -> None:
    """Entry point of the admin process (spawned by the master, restarted if it dies)."""
    init_helper_process()
    configure_child_logging()
    server = AdminServer(sock, settings, address, authkey, SharedCounters(counters_array))
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    parent = os.getppid()

    def watch_parent() -> None:
        while os.getppid() == parent:
            threading.Event().wait(1.0)
        server.shutdown()

    threading.Thread(target=watch_parent, daemon=True).start()
    server.serve_forever(poll_interval=0.5)
    server.server_close()
    sys.exit(0)
