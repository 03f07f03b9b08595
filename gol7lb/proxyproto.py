"""The PROXY protocol, v1 (text) and v2 (binary), as HAProxy specifies it
(https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt): parse what a TCP load balancer in
front of us sends first on a connection, and build what we send first to a backend.

Pure functions, no I/O: the worker's loop feeds `parse` the bytes it peeked at and reads
exactly `ProxyHeader.length` of them, so what follows (TLS or HTTP) stays in the socket.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"  # v2's 12 bytes; never a valid start of HTTP or v1
V1_PREFIX = b"PROXY "
V1_MAX = 107  # the longest v1 line, CRLF included (spec 2.1)
V2_FIXED = 16  # signature, version/command, family/transport, length
V2_MAX = V2_FIXED + 0xFFFF
_LOCAL, _PROXY = 0x0, 0x1
_TCP4, _TCP6 = 0x11, 0x21
_UNSPEC = 0x00
_UNIX = (0x31, 0x32)  # AF_UNIX stream/dgram: carries no IP address, like UNSPEC
_V4_BLOCK, _V6_BLOCK = 12, 36
_PORT = struct.Struct("!HH")

Address = tuple[str, int]


class ProxyHeaderError(ValueError):
    """The bytes are not a valid PROXY header: the connection is closed."""


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """A complete header. `source`/`destination` are None for v2 LOCAL, v1 UNKNOWN and the
    families that carry no IP address: the connection's own addresses then stand."""

    version: int  # 1 or 2
    length: int  # bytes the header takes on the wire
    source: Address | None = None
    destination: Address | None = None


def parse(data: bytes) -> ProxyHeader | None:
    """The header at the start of `data`; None while more bytes are needed to tell; raises
    ProxyHeaderError as soon as the bytes cannot start a valid header."""
    if data[:1] == SIGNATURE[:1]:
        if not SIGNATURE.startswith(data[:len(SIGNATURE)]):
            raise ProxyHeaderError("neither a PROXY v1 nor v2 signature")
        return _parse_v2(data) if len(data) >= V2_FIXED else None
    if not V1_PREFIX.startswith(data[:len(V1_PREFIX)]):
        raise ProxyHeaderError("neither a PROXY v1 nor v2 signature")
    end = data.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if len(data) >= V1_MAX or b"\n" in data[:V1_MAX]:
            raise ProxyHeaderError("PROXY v1 line without CRLF within 107 bytes")
        return None
    return _parse_v1(data[:end], end + 2)


def _parse_v1(line: bytes, length: int) -> ProxyHeader:
    try:
        text = line.decode("ascii")
    except UnicodeDecodeError:
        raise ProxyHeaderError("PROXY v1 line is not ASCII") from None
    parts = text.split(" ")
    if len(parts) >= 2 and parts[1] == "UNKNOWN":
        return ProxyHeader(1, length)  # the rest of the line is ignored (spec 2.1)
    if len(parts) != 6 or parts[1] not in ("TCP4", "TCP6"):
        raise ProxyHeaderError(f"malformed PROXY v1 line {text[:60]!r}")
    family = 4 if parts[1] == "TCP4" else 6
    source = (_v1_address(parts[2], family), _v1_port(parts[4]))
    destination = (_v1_address(parts[3], family), _v1_port(parts[5]))
    return ProxyHeader(1, length, source, destination)


def _v1_address(text: str, family: int) -> str:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise ProxyHeaderError(f"PROXY v1: {text[:45]!r} is not an IP address") from None
    if address.version != family:
        raise ProxyHeaderError(f"PROXY v1: {text!r} is not a TCP{family} address")
    return str(address)


def _v1_port(text: str) -> int:
    # Decimal digits, no sign, no leading zero (spec 2.1), 0..65535.
    if not (text.isascii() and text.isdigit()) or len(text) > 5 or \
            (text != "0" and text[0] == "0") or int(text) > 65535:
        raise ProxyHeaderError(f"PROXY v1: {text[:8]!r} is not a port")
    return int(text)


def _parse_v2(data: bytes) -> ProxyHeader | None:
    version_command, family, size = data[12], data[13], int.from_bytes(data[14:16], "big")
    if version_command >> 4 != 2:
        raise ProxyHeaderError(f"PROXY v2: version {version_command >> 4}, expected 2")
    command = version_command & 0xF
    if command not in (_LOCAL, _PROXY):
        raise ProxyHeaderError(f"PROXY v2: unknown command {command}")
    length = V2_FIXED + size
    if len(data) < length:
        return None
    if command == _LOCAL or family == _UNSPEC or family in _UNIX:
        return ProxyHeader(2, length)  # addresses and TLVs skipped: the socket's own stand
    block = data[V2_FIXED:length]
    src: ipaddress.IPv4Address | ipaddress.IPv6Address
    dst: ipaddress.IPv4Address | ipaddress.IPv6Address
    if family == _TCP4:
        if size < _V4_BLOCK:
            raise ProxyHeaderError("PROXY v2: TCP4 address block too short")
        src, dst = ipaddress.IPv4Address(block[0:4]), ipaddress.IPv4Address(block[4:8])
        sport, dport = _PORT.unpack_from(block, 8)
    elif family == _TCP6:
        if size < _V6_BLOCK:
            raise ProxyHeaderError("PROXY v2: TCP6 address block too short")
        src, dst = ipaddress.IPv6Address(block[0:16]), ipaddress.IPv6Address(block[16:32])
        sport, dport = _PORT.unpack_from(block, 32)
    else:
        raise ProxyHeaderError(f"PROXY v2: unsupported family/transport 0x{family:02x}")
    return ProxyHeader(2, length, (str(src), sport), (str(dst), dport))  # TLVs skipped


# building -------------------------------------------------------------------------------------

def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text.split("%", 1)[0])  # a scope id is not sent
    except ValueError:
        return None


def build(version: str, source: Address | None, destination: Address | None) -> bytes:
    """The header ("v1", else v2) announcing a relayed TCP connection from `source` to
    `destination`; one without usable addresses (a Unix socket, a test client) says v1
    UNKNOWN / v2 LOCAL."""
    src = _ip(source[0]) if source else None
    dst = _ip(destination[0]) if destination else None
    if src is None or dst is None or source is None or destination is None:
        return build_local(version)
    if src.version != dst.version:  # as HAProxy does: both as IPv6 (IPv4-mapped)
        src, dst = _as_v6(src), _as_v6(dst)
    ports = (source[1], destination[1])
    if version == "v1":
        family = "TCP4" if src.version == 4 else "TCP6"
        return f"PROXY {family} {src} {dst} {ports[0]} {ports[1]}\r\n".encode("ascii")
    block = src.packed + dst.packed + _PORT.pack(*ports)
    family_byte = _TCP4 if src.version == 4 else _TCP6
    return SIGNATURE + bytes((0x20 | _PROXY, family_byte)) + len(block).to_bytes(2, "big") + \
        block


def build_local(version: str) -> bytes:
    """A header for a connection the LB opens on its own behalf (health checks): the
    backend uses the connection's real addresses (spec 2.1 UNKNOWN, 2.2 LOCAL)."""
    if version == "v1":
        return b"PROXY UNKNOWN\r\n"
    return SIGNATURE + bytes((0x20 | _LOCAL, _UNSPEC)) + b"\x00\x00"


def _as_v6(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> ipaddress.IPv6Address:
    if isinstance(address, ipaddress.IPv6Address):
        return address
    return ipaddress.IPv6Address(b"\x00" * 10 + b"\xff\xff" + address.packed)


def for_request(version: str, environ: Mapping[str, Any]) -> bytes:
    """The header for a backend connection opened for this WSGI request: from the client's
    address (REMOTE_ADDR/REMOTE_PORT: the inbound PROXY header's when there was one) to the
    address it reached (our worker's SERVER_NAME/SERVER_PORT; under gthread, whose SERVER_NAME
    is the Host or the bound address, the client socket's own)."""
    source = _address(environ.get("REMOTE_ADDR"), environ.get("REMOTE_PORT"))
    destination = None
    if "gol7lb.local_port" in environ:  # our worker: the socket's, or the inbound header's
        destination = _address(environ.get("SERVER_NAME"), environ.get("SERVER_PORT"))
    elif environ.get("gunicorn.socket") is not None:
        try:
            here = environ["gunicorn.socket"].getsockname()
            destination = _address(here[0], here[1])
        except (OSError, TypeError, IndexError):
            destination = None
    return build(version, source, destination)


def _address(host: Any, port: Any) -> Address | None:
    try:
        number = int(port)
    except (TypeError, ValueError):
        return None
    if not isinstance(host, str) or _ip(host) is None or not 0 <= number <= 65535:
        return None
    return host, number
