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
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from gol7lb import metrics
from gol7lb.backends import Backend
from gol7lb.headers import client_response_headers, connection_tokens
from gol7lb.serve import TunnelClosed
from gol7lb.upstream import (
    TIMED_OUT,
    ConnectFailed,
    UpstreamProtocolError,
    read_response_head,
    request_head,
)

if TYPE_CHECKING:
    from gol7lb.pooltable import PoolRuntime, PoolTable
    from gol7lb.proxy import Exchange, ProxyApp

log = logging.getLogger("gunicorn.error")
BLOCK = 64 * 1024


def is_upgrade(environ: dict[str, Any]) -> bool:
    """An Upgrade request the client wants tunnelled (Connection lists `upgrade`)."""
    return bool(environ.get("HTTP_UPGRADE")) and "upgrade" in connection_tokens(
        environ.get("HTTP_CONNECTION"))


def forward(app: ProxyApp, environ: dict[str, Any], start_response: Callable[..., Any],
            table: PoolTable, pool: PoolRuntime, exchange: Exchange, target: str,
            authority: str | None) -> Iterable[bytes]:
    """Send the upgrade request to a backend the pool's policy picks (another one if the
    connect fails); tunnel a 101, relay anything else as a normal answer."""
    client_sock = environ.get("gunicorn.socket")
    rid = exchange.rid
    if client_sock is None or environ.get("CONTENT_LENGTH") or environ.get(
            "HTTP_TRANSFER_ENCODING"):
        return app._error(start_response, exchange, 400, "upgrade request with a body",
                          [("Connection", "close")])
    headers = app.request_headers(environ, table, authority, client_sock, rid)
    headers["Upgrade"] = environ["HTTP_UPGRADE"]
    headers["Connection"] = "upgrade"
    head = request_head(exchange.method, target, headers)
    path = target.split("?", 1)[0]
    tried: set[str] = set()
    for _attempt in range(1 + table.settings.proxy.retries):
        # Not bounded by the per-worker thread share: a tunnel gives its thread back to the
        # pool (a new one is started), so it holds no serving thread.
        backend, _full = app._pick(table, pool, environ, path, tried, None, bounded=False)
        if backend is None:
            break
        tried.add(backend.id)
        exchange.backend_id = backend.id
        exchange.slot = table.slots.get(backend.id)
        upstream = table.upstreams[backend.id]
        try:
            sock = upstream.connect()
        except ConnectFailed as e:
            log.error("backend %s failed (connect-failure): %s (request %s)", backend.id, e,
                      rid)
            app._attempt_ended(exchange, table, failed=True)
            continue
        try:
            sock.sendall(head)
            response = read_response_head(sock, exchange.method)
        except TIMED_OUT:
            sock.close()
            app._attempt_ended(exchange, table, failed=True)
            return app._error(start_response, exchange, 504, "backend timed out",
                              [("Connection", "close")])
        except (OSError, UpstreamProtocolError) as e:
            sock.close()
            app._attempt_ended(exchange, table, failed=True)
            log.error("backend %s failed the upgrade: %s (request %s)", backend.id,
                      str(e) or type(e).__name__, rid)
            return app._error(start_response, exchange, 502, "bad gateway",
                              [("Connection", "close")])
        if response.status != 101:
            return app._respond(start_response, response, sock, upstream, client_sock,
                                exchange, None)
        exchange.status = 101
        exchange.answered = True
        _switch(environ, response, sock, client_sock, backend, exchange,
                table.settings.proxy.client_idle_timeout)
    if not tried:
        return app._error(start_response, exchange, 503, "no healthy backend",
                          [("Retry-After", table.retry_after), ("Connection", "close")])
    return app._error(start_response, exchange, 502, "no backend accepted the connection",
                      [("Connection", "close")])


def _switch(environ: dict[str, Any], response: Any, sock: socket.socket,
            client_sock: socket.socket, backend: Backend, exchange: Exchange,
            idle: float) -> None:
    """Send the 101 to the client, then copy bytes both ways; always ends in TunnelClosed.

    The tunnel counts as a request in flight to its backend until it closes (a drain waits
    for it), and in `gol7lb_websocket_connections`.
    """
    rid = exchange.rid
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
        if exchange.slot is not None:
            exchange.app.cells.detach(exchange.slot)
            exchange.detached = True
    gauge = metrics.WEBSOCKET_CONNECTIONS.labels(backend.id)
    gauge.inc()
    sent = 0
    try:
        client_sock.settimeout(idle)
        sock.settimeout(idle)
        client_sock.sendall(head + response.leftover)
        early = environ.get("gol7lb.early_data", b"")
        if early:
            sock.sendall(early)
        sent = pump(client_sock, sock, idle)
    except OSError as e:
        log.info("tunnel to %s ended: %s (request %s)", backend.id, str(e) or type(e).__name__,
                 rid)
    finally:
        gauge.dec()
        sock.close()
        with contextlib.suppress(OSError):
            client_sock.shutdown(socket.SHUT_RDWR)
        exchange.finish(sent)
    raise TunnelClosed()


def pump(a: socket.socket, b: socket.socket, idle: float) -> int:
    """Copy bytes both ways until both directions closed, an error, or `idle` s of silence;
    returns the bytes sent to `a` (the client: the access log's byte count).

    A side that closes its sending half gets its peer's sending half closed too (half-close
    passes through), so a WebSocket close handshake completes in both directions.
    """
    to_a = 0
    peer = {a.fileno(): (a, b), b.fileno(): (b, a)}
    poller = select.poll()
    open_ends = 0
    for fd in peer:
        poller.register(fd, select.POLLIN)
        open_ends += 1
    while open_ends:
        events = poller.poll(idle * 1000)
        if not events:
            return to_a  # both sides silent for client_idle_timeout
        for fd, _event in events:
            src, dst = peer[fd]
            data = src.recv(BLOCK)
            if data:
                dst.sendall(data)
                if dst is a:
                    to_a += len(data)
                continue
            poller.unregister(fd)
            open_ends -= 1
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)
    return to_a
