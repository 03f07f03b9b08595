"""The TLS client side towards `https://` backends: one `ssl.SSLContext` per configuration
(`proxy.upstream_ca`, `upstream_verify`, `upstream_cert`, `upstream_key`), never one per
request or connection, and the handshake that opens each backend connection.

A context is kept while those settings and the files' modification times stay the same, so
a reload that changes nothing TLS-related keeps it (and its session cache), and a changed CA
or client certificate file is picked up by the next configuration. Verification follows the
backend URL's host name (SNI is that name; an IP address is checked against the certificate's
IP SANs and sends no SNI, as RFC 6066 asks).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import ssl
import threading
from typing import TYPE_CHECKING

from gol7lb.errors import ConfigError

if TYPE_CHECKING:  # config imports this module
    from gol7lb.config import ProxySettings

log = logging.getLogger("gol7lb.proxy")

_Key = tuple[str, bool, str, str, tuple[int, ...]]
_lock = threading.Lock()
_cached: tuple[_Key, ssl.SSLContext] | None = None


def _key(proxy: ProxySettings) -> _Key:
    mtimes = []
    for path in (proxy.upstream_ca, proxy.upstream_cert, proxy.upstream_key):
        try:
            mtimes.append(os.stat(path).st_mtime_ns if path else 0)
        except OSError:
            mtimes.append(-1)
    return (proxy.upstream_ca, proxy.upstream_verify, proxy.upstream_cert, proxy.upstream_key,
            tuple(mtimes))


def build_context(proxy: ProxySettings) -> ssl.SSLContext:
    """A client context for backends; ConfigError naming the setting and file if one of them
    does not load."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # TLS 1.2+, hostname checks on
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if proxy.upstream_verify:
        try:
            if proxy.upstream_ca:
                context.load_verify_locations(cafile=proxy.upstream_ca)
            else:
                context.load_default_certs(ssl.Purpose.SERVER_AUTH)
        except (OSError, ValueError) as e:
            raise ConfigError(f"invalid setting proxy.upstream_ca = {proxy.upstream_ca!r}: "
                              f"cannot load it: {_why(e)}") from None
    else:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if proxy.upstream_cert:
        try:
            context.load_cert_chain(proxy.upstream_cert, proxy.upstream_key or None)
        except (OSError, ValueError) as e:
            raise ConfigError(
                f"invalid setting proxy.upstream_cert = {proxy.upstream_cert!r} (key "
                f"{proxy.upstream_key or 'in the same file'!r}): cannot load the pair: "
                f"{_why(e)}") from None
    context.set_alpn_protocols(["http/1.1"])
    return context


def _why(error: BaseException) -> str:
    if isinstance(error, ssl.SSLError):
        return error.reason or str(error)
    if isinstance(error, OSError):
        return error.strerror or str(error)
    return str(error)


def check(proxy: ProxySettings, origin: str) -> None:
    """Refuse a configuration whose backend TLS files do not load (at start and on reload)."""
    try:
        build_context(proxy)
    except ConfigError as e:
        raise ConfigError(f"{e} ({origin})") from None


def context(proxy: ProxySettings) -> ssl.SSLContext:
    """This process's context for the configuration: the same object while it is unchanged.
    A file that stopped loading since the configuration was checked keeps the last good
    context (logged); with none at all, the ConfigError goes to the caller."""
    global _cached
    key = _key(proxy)
    with _lock:
        cached = _cached
        if cached is not None and cached[0] == key:
            return cached[1]
        try:
            built = build_context(proxy)
        except ConfigError as e:
            if cached is None:
                raise
            log.error("%s; keeping the previous TLS settings for backends", e)
            return cached[1]
        _cached = (key, built)
        return built


def handshake(sock: socket.socket, context: ssl.SSLContext, host: str) -> ssl.SSLSocket:
    """Wrap a connected socket and complete the handshake within the socket's timeout.
    Raises ssl.SSLError (a verification failure is ssl.SSLCertVerificationError) or OSError;
    the socket is closed then."""
    try:
        return context.wrap_socket(sock, server_hostname=host)
    except BaseException:
        with contextlib.suppress(OSError):
            sock.close()
        raise


def failure_reason(error: ssl.SSLError) -> str:
    """Words for the log and /status: `TLS handshake failed: certificate verify failed:
    Hostname mismatch, certificate is not valid for 'x'.`"""
    if isinstance(error, ssl.SSLCertVerificationError):
        detail = error.verify_message or error.reason or "certificate verify failed"
        return f"TLS handshake failed: certificate verify failed: {detail}"
    if error.reason:  # WRONG_VERSION_NUMBER: a plain-HTTP backend, say
        return f"TLS handshake failed: {error.reason.replace('_', ' ').lower()}"
    return f"TLS handshake failed: {error.strerror or error}"
