"""Upgrade tunnelling (WebSocket, and any `Upgrade` with `Connection: upgrade`).

The upgrade request goes to a backend like any other, through the one attempt loop (attempts.py)
(Upgrade and Connection: upgrade kept, the rest of the hop-by-hop set removed). A `101` goes
back to the client, then bytes are copied both ways until either side closes; a silent tunnel
is closed after `proxy.client_idle_timeout`, never by `proxy.read_timeout`. Any other answer
is relayed as a normal response and the client connection is closed after it.

The tunnel holds the thread that served the request. Under ProxyWorker the thread tells the
pool (`gol7lb.detach` in the environ) so a new thread takes its place; under gthread it holds
one of the `threads` for its lifetime.
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import ssl
from typing import TYPE_CHECKING, Any, NoReturn

from gol7lb import metrics
from gol7lb.backends import Backend
from gol7lb.headers import client_response_headers, connection_tokens
from gol7lb.serve import TunnelClosed
from gol7lb.upstream import tls_buffered

if TYPE_CHECKING:
    from gol7lb.exchange import Exchange

log = logging.getLogger("gol7lb.tunnel")
BLOCK = 64 * 1024


def is_upgrade(environ: dict[str, Any]) -> bool:
    """An Upgrade request the client wants tunnelled (Connection lists `upgrade`)."""
    return bool(environ.get("HTTP_UPGRADE")) and "upgrade" in connection_tokens(
        environ.get("HTTP_CONNECTION"))


def switch(environ: dict[str, Any], response: Any, sock: socket.socket,
           client_sock: socket.socket, backend: Backend, exchange: Exchange,
           idle: float) -> NoReturn:
    """Send the 101 to the client, then copy bytes both ways; always ends in TunnelClosed.

    The tunnel counts as a request in flight to its backend until it closes (a drain waits
    for it), and in `gol7lb_websocket_connections`.
    """
    rid = exchange.rid
    exchange.status = 101
    exchange.answered = True
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
    response.release()
    detach = environ.get("gol7lb.detach")
    if detach is not None:
        detach()
        exchange.detach()
    try:
        gauge = metrics.WEBSOCKET_CONNECTIONS.labels(backend.id)
        gauge.inc()
    except OSError:  # no descriptor for prometheus_client's file: the tunnel still works
        gauge = None
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
        if gauge is not None:
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
    passes through), so a WebSocket close handshake completes in both directions. A TLS side
    cannot half-close (ssl's shutdown() drops the TLS layer): once its peer closes, the
    tunnel ends. Bytes a TLS side already decrypted (`pending()`) count as readable.
    """
    to_a = 0
    peer = {a.fileno(): (a, b), b.fileno(): (b, a)}
    poller = select.poll()
    reading = set(peer)
    for fd in peer:
        poller.register(fd, select.POLLIN)
    while reading:
        # A TLS side may hold decrypted bytes its socket no longer shows (pending()).
        events = [(fd, 0) for fd in reading if tls_buffered(peer[fd][0])] or \
            poller.poll(idle * 1000)
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
            reading.discard(fd)
            if isinstance(dst, ssl.SSLSocket):  # its shutdown() would drop the TLS layer
                return to_a
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)
    return to_a

