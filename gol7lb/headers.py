"""Header rewriting at the proxy boundary: hop-by-hop removal, X-Forwarded-*, request id."""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Mapping

# RFC 9110 section 7.6.1, plus the non-standard ones that are hop-by-hop in practice.
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-connection", "te", "transfer-encoding", "upgrade",
    "proxy-authorization", "proxy-authenticate", "trailer",
})
# Set by this proxy; what the client sent under these names is replaced, not trusted.
FORWARDED_SET = frozenset({"x-forwarded-proto", "x-forwarded-host", "x-forwarded-port"})
# gunicorn writes its own Date and Server; passing the backend's too would repeat them.
RESPONSE_DROPPED = HOP_BY_HOP | {"date", "server", "x-request-id"}
REQUEST_ID = "X-Request-ID"
# RFC 9110 section 5.1 and 5.5: what a response header may hold when it goes to the client.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_FIELD_VALUE = re.compile(r"[\t\x20-\x7e\x80-\xff]*")
MAX_REQUEST_ID = 200

# The WSGI environ spells headers as HTTP_X_FOO; this turns them back into field names once.
_NAME_CACHE: dict[str, str] = {}


def _field_name(environ_key: str) -> str:
    name = _NAME_CACHE.get(environ_key)
    if name is None:
        name = "-".join(part.capitalize() for part in environ_key[5:].split("_"))
        if len(_NAME_CACHE) < 4096:
            _NAME_CACHE[environ_key] = name
    return name


def connection_tokens(value: str | None) -> frozenset[str]:
    """Header names listed in a Connection header, lower-cased."""
    if not value:
        return frozenset()
    return frozenset(t.strip().lower() for t in value.split(",") if t.strip())


def request_id(environ: Mapping[str, object]) -> str:
    """Keep the client's id when it is a sane token, so traces join up; otherwise make one."""
    given = environ.get("HTTP_X_REQUEST_ID")
    if isinstance(given, str) and 0 < len(given) <= MAX_REQUEST_ID and given.isprintable():
        return given
    return f"{random.getrandbits(128):032x}"  # random reseeds itself in every forked worker


def upstream_request_headers(
    environ: Mapping[str, object], host: str, forwarded_port: str, rid: str,
) -> dict[str, str]:
    """The header section to send upstream (gunicorn has already joined repeated fields)."""
    drop = HOP_BY_HOP | connection_tokens(environ.get("HTTP_CONNECTION"))  # type: ignore[arg-type]
    headers: dict[str, str] = {"Host": host}
    forwarded_for = ""
    for key, value in environ.items():
        if not key.startswith("HTTP_"):
            continue
        name = _field_name(key)
        lower = name.lower()
        if lower in drop or lower in FORWARDED_SET or lower == "host":
            continue
        if lower == "x-forwarded-for":
            forwarded_for = value  # type: ignore[assignment]
            continue
        if lower == "x-request-id":
            continue
        headers[name] = value  # type: ignore[assignment]
    content_type = environ.get("CONTENT_TYPE")
    if content_type:
        headers["Content-Type"] = content_type  # type: ignore[assignment]
    client = environ.get("REMOTE_ADDR")
    if client:
        forwarded_for = f"{forwarded_for}, {client}" if forwarded_for else client  # type: ignore[assignment]
    if forwarded_for:
        headers["X-Forwarded-For"] = forwarded_for
    headers["X-Forwarded-Proto"] = environ.get("wsgi.url_scheme", "http")  # type: ignore[assignment]
    original_host = environ.get("HTTP_HOST")
    if original_host:
        headers["X-Forwarded-Host"] = original_host  # type: ignore[assignment]
    headers["X-Forwarded-Port"] = forwarded_port
    headers[REQUEST_ID] = rid
    return headers


def client_response_headers(
    upstream: Iterable[tuple[str, str]], rid: str,
) -> list[tuple[str, str]]:
    """Backend response headers minus hop-by-hop ones; repeated fields (Set-Cookie) all kept.

    ValueError for a header that is not valid HTTP, so the caller can answer 502 instead.
    """
    kept: list[tuple[str, str, str]] = []
    listed: frozenset[str] = frozenset()
    for name, value in upstream:
        lower = name.lower()
        if lower in RESPONSE_DROPPED:
            if lower == "connection":
                listed = listed | connection_tokens(value)
            continue
        if not _TOKEN.fullmatch(name) or not _FIELD_VALUE.fullmatch(value):
            raise ValueError(repr(name))
        kept.append((lower, name, value))
    headers = [(name, value) for lower, name, value in kept if lower not in listed]
    headers.append((REQUEST_ID, rid))
    return headers
