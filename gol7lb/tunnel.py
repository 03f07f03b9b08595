"""Upgrade tunnelling (WebSocket, and any `Upgrade` with `Connection: upgrade`).

The upgrade request goes to a backend like any other (Upgrade and Connection: upgrade kept,
the rest of the hop-by-hop set removed). A `101` goes back to the client, then bytes are copied
both ways until either side closes; a silent tunnel is closed after
`proxy.client_idle_timeout`, never by `proxy.read_timeout`. Any other answer is relayed as a
normal response and the client connection is closed after it.

The tunnel holds the thread that served the request. Under ProxyWorker the thread tells the
pool (`gol7lb.detach` in the environ) so a new thread takes its place; under gthread it holds
one of the `threads` for its lifetime.
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from gol7lb.backends import Backend
from gol7lb.headers import client_response_headers, connection_tokens
from gol7lb.serve import TunnelClosed
from gol7lb.upstream import ConnectFailed, UpstreamProtocolError, read_response_head, request_head

if TYPE_CHECKING:
    from gol7lb.proxy import ProxyApp

log = logging.getLogger("gunicorn.error")
BLOCK = 64 * 1024


def tunnel_opened(backend: str) -> None:
    """Metrics call site: gol7lb_websocket_connections{backend}.inc() (the lead's metrics)."""


def tunnel_closed(backend: str) -> None:
    """Metrics call site: gol7lb_websocket_connections{backend}.dec() (the lead's metrics)."""


def is_upgrade(environ: dict[str, Any]) -> bool:
    """An Upgrade request the client wants tunnelled (Connection lists `upgrade`)."""
    return bool(environ.get("HTTP_UPGRADE")) and "upgrade" in connection_tokens(
        environ.get("HTTP_CONNECTION"))


def forward(app: ProxyApp, environ: dict[str, Any], start_response: Callable[..., Any],
            method: str, target: str, headers: dict[str, str], attempts: Sequence[Backend],
            client_sock: socket.socket | None, rid: str) -> Iterable[bytes]:
    """Send the upgrade request to the first backend that accepts a connection; tunnel a 101."""
    if client_sock is None or environ.get("CONTENT_LENGTH") or environ.get(
            "HTTP_TRANSFER_ENCODING"):
        return app._error(start_response, 400, rid, "upgrade request with a body",
                          [("Connection", "close")])
    headers["Upgrade"] = environ["HTTP_UPGRADE"]
    headers["Connection"] = "upgrade"
    head = request_head(method, target, headers)
    for backend in attempts:
        pool = app.pools[backend.url]
        try:
            sock = pool.connect()
        except ConnectFailed as e:
            log.error("backend %s: connect failed: %s (request %s)", backend.url, e, rid)
            continue
        try:
            sock.sendall(head)
            response = read_response_head(sock, method)
        except TimeoutError:
            sock.close()
            return app._error(start_response, 504, rid, "backend timed out",
                              [("Connection", "close")])
        except (OSError, UpstreamProtocolError) as e:
            sock.close()
            log.error("backend %s failed the upgrade: %s (request %s)", backend.url,
                      str(e) or type(e).__name__, rid)
            return app._error(start_response, 502, rid, "bad gateway", [("Connection", "close")])
        if response.status != 101:
            return app._respond(start_response, response, sock, pool, client_sock, rid)
        _switch(environ, response, sock, client_sock, backend, rid, app)
    return app._error(start_response, 502, rid, "no backend accepted the connection",
                      [("Connection", "close")])


def _switch(environ: dict[str, Any], response: Any, sock: socket.socket,
            client_sock: socket.socket, backend: Backend, rid: str, app: ProxyApp) -> None:
    """Send the 101 to the client, then copy bytes both ways; always ends in TunnelClosed."""
    idle = app.settings.proxy.client_idle_timeout
    try:
        kept = client_response_headers(response.headers, rid)
    except ValueError:
        kept = [("X-Request-ID", rid)]
    upgrade = next((v for n, v in response.headers if n.lower() == "upgrade"),
                   environ["HTTP_UPGRADE"])
    lines = [f"HTTP/1.1 101 {response.reason or 'Switching Protocols'}",
             f"Upgrade: {upgrade}", "Connection: Upgrade"]
    lines += [f"{name}: {value}" for name, value in kept]
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    detach = environ.get("gol7lb.detach")
    if detach is not None:
        detach()
    tunnel_opened(backend.netloc)
    try:
        client_sock.settimeout(idle)
        sock.settimeout(idle)
        client_sock.sendall(head + response.leftover)
        early = environ.get("gol7lb.early_data", b"")
        if early:
            sock.sendall(early)
        pump(client_sock, sock, idle)
    except OSError as e:
        log.info("tunnel to %s ended: %s (request %s)", backend.url, str(e) or type(e).__name__,
                 rid)
    finally:
        tunnel_closed(backend.netloc)
        sock.close()
        with contextlib.suppress(OSError):
            client_sock.shutdown(socket.SHUT_RDWR)
    raise TunnelClosed()


def pump(a: socket.socket, b: socket.socket, idle: float) -> None:
    """Copy bytes both ways until both directions closed, an error, or `idle` s of silence.

    A side that closes its sending half gets its peer's sending half closed too (half-close
    passes through), so a WebSocket close handshake completes in both directions.
    """
    peer = {a.fileno(): (a, b), b.fileno(): (b, a)}
    poller = select.poll()
    open_ends = 0
    for fd in peer:
        poller.register(fd, select.POLLIN)
        open_ends += 1
    while open_ends:
        events = poller.poll(idle * 1000)
        if not events:
            return  # both sides silent for client_idle_timeout
        for fd, _event in events:
            src, dst = peer[fd]
            data = src.recv(BLOCK)
            if data:
                dst.sendall(data)
                continue
            poller.unregister(fd)
            open_ends -= 1
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)
