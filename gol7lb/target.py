"""Request-target and authority checks shared by every worker class.

Routes match the normalised path (RFC 3986 6.2.2: unreserved escapes decoded, section 5.2.4
dot segments removed, repeated slashes merged), because backends resolve `/a/../admin`,
`/%61dmin` and `//admin` to `/admin` and a route must see what the backend will serve. The
target itself is forwarded byte for byte. A path that backends disagree on (an encoded `/`,
`\\` or dot segment, a backslash, NUL, `..;`, a `..` after an empty segment, a broken escape)
cannot be matched safely at all: `AmbiguousTarget`, answered with 400.

`valid_authority` is the one Host check (RFC 9112 3.2, RFC 3986 3.2 without userinfo): the
lean worker's parser refuses a bad Host before any thread runs, the proxy does it for gunicorn's
workers and for the authority of an absolute-form target.
"""

from __future__ import annotations

import ipaddress
import re
import string
from itertools import product

UNRESERVED = frozenset(string.ascii_letters + string.digits + "-._~")
# escapes that make a path mean different things to different backends
_REFUSED_ESCAPES = frozenset({0x00, 0x2F, 0x5C})  # NUL, "/", "\"


class AmbiguousTarget(ValueError):
    """A request path that is refused with 400 rather than routed (see the module doc)."""


def _escape_table() -> dict[str, str | None]:
    """Every two-digit hex escape (either case) -> its normal form: the character when it is
    unreserved, else "%XX" upper-cased; None for the refused ones."""
    table: dict[str, str | None] = {}
    for high, low in product(string.hexdigits, repeat=2):
        code = int(high + low, 16)
        char = chr(code)
        if code in _REFUSED_ESCAPES:
            table[high + low] = None
        else:
            table[high + low] = char if char in UNRESERVED else "%" + (high + low).upper()
    return table


_ESCAPES = _escape_table()
_DOT_SEGMENTS = frozenset({".", ".."})


def normalise_path(path: str) -> str:
    """The path routes match: unchanged (the same object) when there is nothing to normalise,
    else escapes decoded or upper-cased, slashes merged, dot segments removed.

    Raises AmbiguousTarget for the paths listed in the module doc.
    """
    if "%" not in path and "//" not in path and "/." not in path and "\\" not in path:
        return path  # the common case: four scans in C, nothing built
    if "\\" in path:
        raise AmbiguousTarget("backslash in the path")
    if not path.startswith("/"):
        return path
    out: list[str] = []
    after_empty = False  # an empty segment ("//") came before: a later ".." is ambiguous
    segments = path[1:].split("/")
    last = len(segments) - 1
    trailing = False
    for i, segment in enumerate(segments):
        encoded = "%" in segment
        if encoded:
            segment = _decode(segment)
        base = segment.partition(";")[0] if ";" in segment else segment
        if base in _DOT_SEGMENTS:
            if encoded:
                raise AmbiguousTarget("percent-encoded dot segment")
            if base != segment:
                raise AmbiguousTarget("dot segment with a parameter")
            if base == "..":
                if after_empty:
                    raise AmbiguousTarget("'..' after an empty segment")
                if out:
                    out.pop()
            trailing = i == last
        elif not segment:
            after_empty = after_empty or i != last
            trailing = i == last
        else:
            out.append(segment)
            trailing = False
    if not out:
        return "/"
    return "/" + "/".join(out) + ("/" if trailing else "")


def _decode(segment: str) -> str:
    """Unreserved escapes decoded, others upper-cased; AmbiguousTarget for refused or broken
    ones."""
    first, *rest = segment.split("%")
    parts = [first]
    for piece in rest:
        normal = _ESCAPES.get(piece[:2], "")
        if not normal:
            raise AmbiguousTarget("encoded NUL, '/' or '\\'" if normal is None
                                  else "'%' that is not a percent-escape")
        parts.append(normal)
        parts.append(piece[2:])
    return "".join(parts)


# RFC 3986 reg-name (unreserved, pct-encoded, sub-delims), IPv4 included; no userinfo.
_REG_NAME = re.compile(r"(?:[A-Za-z0-9\-._~!$&'()*+,;=]|%[0-9A-Fa-f]{2})+")
_VALID: dict[str, bool] = {}  # authorities already judged; clients choose them, so bounded
_VALID_CACHE_SIZE = 4096


def valid_authority(value: str) -> bool:
    """Host header or absolute-form authority: host[:port] with host a reg-name, an IPv4
    address or a bracketed IPv6 address, port digits up to 65535 (RFC 3986 allows an empty
    port after ":"). The empty string is valid (RFC 9112 3.2: a target without authority);
    an empty host with a port is not."""
    verdict = _VALID.get(value)
    if verdict is None:
        verdict = _judge(value)
        if len(_VALID) < _VALID_CACHE_SIZE:
            _VALID[value] = verdict
    return verdict


def _judge(value: str) -> bool:
    value = value.strip(" \t")  # optional whitespace around a field value (RFC 9110 5.5)
    if not value:
        return True
    if value.startswith("["):
        literal, bracket, port = value[1:].partition("]")
        if not bracket or (port and not port.startswith(":")):
            return False
        try:
            ipaddress.IPv6Address(literal)
        except ValueError:
            return False
        return _valid_port(port[1:]) if port else True
    host, colon, port = value.partition(":")
    if not host or not _REG_NAME.fullmatch(host):
        return False
    return _valid_port(port) if colon else True


def _valid_port(port: str) -> bool:
    return port == "" or (port.isascii() and port.isdigit() and len(port) <= 5
                          and int(port) <= 65535)
