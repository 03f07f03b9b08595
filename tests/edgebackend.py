"""A backend inside the test process for the edge tests: HTTP/1.1 with keep-alive, optionally
over TLS (a trustme certificate) and optionally expecting a PROXY protocol header first. It
records every connection (the PROXY header parsed, the SNI name, the client certificate, the
requests) and answers each request with a JSON body saying what it saw.
"""

from __future__ import annotations

import contextlib
import json
import socket
import ssl
import threading
from dataclasses import dataclass, field

from gol7lb import proxyproto


@dataclass
class Seen:
    """One accepted connection."""

    number: int
    proxy: proxyproto.ProxyHeader | None = None
    proxy_raw: bytes = b""
    sni: str | None = None
    client_cert: dict[str, object] | None = None
    requests: list[dict[str, str]] = field(default_factory=list)
    error: str = ""


class EdgeBackend:
    def __init__(self, tls: ssl.SSLContext | None = None, expect_proxy: bool = False,
                 close_each: bool = False) -> None:
        self.tls = tls
        self.expect_proxy = expect_proxy
        self.close_each = close_each  # answer with Connection: close (a handshake per request)
        self.connections: list[Seen] = []
        self._lock = threading.Lock()
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(128)
        self.port = self.listener.getsockname()[1]
        if tls is not None:
            tls.sni_callback = self._sni  # type: ignore[assignment]
        threading.Thread(target=self._accept, daemon=True).start()

    @staticmethod
    def _sni(tls_socket: ssl.SSLSocket, name: str | None, context: ssl.SSLContext) -> None:
        tls_socket.sni_seen = name  # type: ignore[attr-defined]

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            with self._lock:
                seen = Seen(len(self.connections))
                self.connections.append(seen)
            threading.Thread(target=self._serve, args=(sock, seen), daemon=True).start()

    def _serve(self, raw: socket.socket, seen: Seen) -> None:
        raw.settimeout(10)
        sock: socket.socket = raw
        try:
            if self.expect_proxy:
                data = b""
                while (header := proxyproto.parse(data)) is None:
                    byte = raw.recv(1)
                    if not byte:
                        return
                    data += byte
                seen.proxy, seen.proxy_raw = header, data
            if self.tls is not None:
                wrapped = self.tls.wrap_socket(raw, server_side=True)
                sock = wrapped
                seen.sni = getattr(wrapped, "sni_seen", None)
                cert = wrapped.getpeercert()
                seen.client_cert = dict(cert) if cert else None
            self._requests(sock, seen)
        except (OSError, ValueError) as e:
            seen.error = str(e) or type(e).__name__
        finally:
            with contextlib.suppress(OSError):
                sock.close()

    def _requests(self, sock: socket.socket, seen: Seen) -> None:
        buffer = b""
        while True:
            while b"\r\n\r\n" not in buffer:
                data = sock.recv(65536)
                if not data:
                    return
                buffer += data
            head, _, buffer = buffer.partition(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            length = int(headers.get("content-length", "0"))
            while len(buffer) < length:
                buffer += sock.recv(65536)
            buffer = buffer[length:]
            request = {"line": lines[0], **headers}
            seen.requests.append(request)
            body = json.dumps({"connection": seen.number, "request": request,
                               "proxy": seen.proxy_raw.decode("latin-1") if seen.proxy
                               and seen.proxy.version == 1 else None,
                               "source": list(seen.proxy.source) if seen.proxy
                               and seen.proxy.source else None,
                               "sni": seen.sni}).encode()
            close = self.close_each or headers.get("connection", "").lower() == "close"
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n%s\r\n%s" % (
                             len(body), b"Connection: close\r\n" if close else b"", body))
            if close:
                return

    def proxied(self) -> list[Seen]:
        """Connections that carried a request other than a health check."""
        with self._lock:
            return [c for c in self.connections
                    if any(r.get("user-agent") != "gol7lb-health-check" for r in c.requests)]

    def close(self) -> None:
        self.listener.close()
