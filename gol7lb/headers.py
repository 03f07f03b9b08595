"""Header rewriting at the proxy boundary: hop-by-hop removal, X-Forwarded-*, RFC 7239
Forwarded (what a client outside `proxy.trusted_proxies` sent under those names is removed,
so it cannot spoof them), request id."""

from __future__ import annotations

import ipaddress
import random
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gol7lb.config import ForwardedMode

# RFC 9110 section 7.6.1, plus the non-standard ones that are hop-by-hop in practice.
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-connection", "te", "transfer-encoding", "upgrade",
    "proxy-authorization", "proxy-authenticate", "trailer",
})
# Set by this proxy; what the client sent under these names is replaced, not trusted.
FORWARDED_SET = frozenset({"x-forwarded-proto", "x-forwarded-host", "x-forwarded-port"})
# Kept only from trusted proxies (proxy.trusted_proxies); removed from anyone else.
SPOOFABLE = FORWARDED_SET | {"forwarded", "x-real-ip"}
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


class ForwardedPolicy:
    """Which forwarding headers go upstream (`proxy.forwarded`) and whom to believe
    (`proxy.trusted_proxies`)."""

    def __init__(self, mode: ForwardedMode = "x-forwarded", trusted: Sequence[str] = ()) -> None:
        self.x_forwarded = mode in ("x-forwarded", "both")
        self.rfc7239 = mode in ("rfc7239", "both")
        self.networks = tuple(ipaddress.ip_network(n, strict=False) for n in trusted)
        self._verdicts: dict[str, bool] = {}

    def trusts(self, address: str | None) -> bool:
        if not self.networks or not address:
            return False
        verdict = self._verdicts.get(address)
        if verdict is None:
            try:
                ip = ipaddress.ip_address(address)
            except ValueError:
                verdict = False
            else:
                verdict = any(ip in net for net in self.networks)
            if len(self._verdicts) < 65536:
                self._verdicts[address] = verdict
        return verdict

    def client_address(self, environ: Mapping[str, Any]) -> str:
        """The client's address after `trusted_proxies`: the connection's peer (REMOTE_ADDR,
        which PROXY protocol sets), or, when that is a trusted proxy, the right-most
        `X-Forwarded-For` entry that is not one (all trusted: the left-most)."""
        peer: str = environ.get("REMOTE_ADDR") or ""
        if not self.networks or not self.trusts(peer):
            return peer
        chain: str = environ.get("HTTP_X_FORWARDED_FOR") or ""
        if not chain:
            return peer
        entry = peer
        for entry in reversed(chain.split(",")):
            entry = entry.strip().removeprefix("[").split("]")[0]
            if not self.trusts(entry):
                return entry
        return entry


DEFAULT_POLICY = ForwardedPolicy()
_TOKEN_VALUE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def forwarded_element(client: str, proto: str, host: str | None) -> str:
    """One RFC 7239 element: for=...;proto=...;host=... (IPv6 bracketed and quoted)."""
    node = f'"[{client}]"' if ":" in client else client
    parts = [f"for={node}", f"proto={proto}"]
    if host:
        quoted = host if _TOKEN_VALUE.fullmatch(host) else '"' + host.replace(
            "\\", "\\\\").replace('"', '\\"') + '"'
        parts.append(f"host={quoted}")
    return ";".join(parts)


# What upstream_request_headers does with each HTTP_* environ key, decided once per key.
_SKIP, _PASS, _DROP, _FORWARDED_FOR, _SPOOFABLE = range(5)
_KEY_CACHE: dict[str, tuple[str, str, int]] = {}


def _classify(environ_key: str) -> tuple[str, str, int]:
    """(field name, lower-case name, what to do with it) for an environ key (_SKIP for those
    that are not HTTP_* fields)."""
    entry = _KEY_CACHE.get(environ_key)
    if entry is not None:
        return entry
    if not environ_key.startswith("HTTP_"):
        entry = ("", "", _SKIP)
    else:
        name = _field_name(environ_key)
        lower = name.lower()
        if lower in HOP_BY_HOP or lower == "host" or lower == "x-request-id":
            action = _DROP
        elif lower == "x-forwarded-for":
            action = _FORWARDED_FOR
        elif lower in SPOOFABLE:
            action = _SPOOFABLE
        else:
            action = _PASS
        entry = (name, lower, action)
    if len(_KEY_CACHE) < 4096:
        _KEY_CACHE[environ_key] = entry
    return entry


def upstream_request_headers(
    environ: Mapping[str, Any], host: str, forwarded_port: str, rid: str,
    policy: ForwardedPolicy = DEFAULT_POLICY,
) -> dict[str, str]:
    """The header section to send upstream (the worker has already joined repeated fields)."""
    listed = connection_tokens(environ.get("HTTP_CONNECTION"))
    client = environ.get("REMOTE_ADDR")
    trusted = policy.trusts(client)
    headers: dict[str, str] = {"Host": host}
    forwarded_for = ""
    kept: dict[str, str] = {}  # forwarding headers a trusted proxy sent
    known = _KEY_CACHE.get
    # gol7lb's worker lists the HTTP_* keys it set; under another server, scan the environ.
    keys: Iterable[str] = environ.get("gol7lb.fields") or environ
    for key in keys:
        name, lower, action = known(key) or _classify(key)
        if action == _SKIP:
            continue
        value = environ[key]
        if action == _PASS:
            if lower not in listed:
                headers[name] = value
        elif action == _FORWARDED_FOR:
            if lower not in listed:
                forwarded_for = value
        elif action == _SPOOFABLE and trusted and lower not in listed:
            kept[lower] = value
            headers[name] = value
    content_type = environ.get("CONTENT_TYPE")
    if content_type:
        headers["Content-Type"] = content_type
    proto: str = environ.get("wsgi.url_scheme", "http")
    if policy.x_forwarded or (trusted and forwarded_for):
        if policy.x_forwarded and client:
            forwarded_for = f"{forwarded_for}, {client}" if forwarded_for else client
        if forwarded_for:
            headers["X-Forwarded-For"] = forwarded_for
    if policy.x_forwarded:
        if "x-forwarded-proto" not in kept:
            headers["X-Forwarded-Proto"] = proto
        # the Host sent upstream (an absolute-form target's authority replaces the header's)
        if host and "x-forwarded-host" not in kept:
            headers["X-Forwarded-Host"] = host
        if "x-forwarded-port" not in kept:
            headers["X-Forwarded-Port"] = forwarded_port
    if policy.rfc7239 and client:
        ours = forwarded_element(client, proto, host)
        earlier = kept.get("forwarded")
        for name in [n for n in headers if n.lower() == "forwarded"]:
            del headers[name]
        headers["Forwarded"] = f"{earlier}, {ours}" if earlier else ours
    headers[REQUEST_ID] = rid
    return headers


# Connection values that name no other field (the usual ones: nothing to look up).
_PLAIN_CONNECTION = frozenset({"keep-alive", "close"})
# Response field names already checked against RFC 9110's token rule, with their lower case.
_RESPONSE_NAMES: dict[str, str] = {}


def client_response_headers(
    upstream: Iterable[tuple[str, str]], rid: str,
) -> list[tuple[str, str]]:
    """Backend response headers minus hop-by-hop ones; repeated fields (Set-Cookie) all kept.

    ValueError for a header that is not valid HTTP, so the caller can answer 502 instead.
    """
    headers: list[tuple[str, str]] = []
    lowers: list[str] = []
    listed: frozenset[str] = frozenset()
    names = _RESPONSE_NAMES
    for name, value in upstream:
        lower = names.get(name)
        if lower is None:
            if not _TOKEN.fullmatch(name):
                raise ValueError(repr(name))
            lower = name.lower()
            if len(names) < 4096:
                names[name] = lower
        if lower in RESPONSE_DROPPED:
            if lower == "connection" and value.lower() not in _PLAIN_CONNECTION:
                listed = listed | connection_tokens(value)
            continue
        headers.append((name, value))
        lowers.append(lower)
    # one match over all the values: the rule is per character, so the joined text passes
    # exactly when every value does
    if not _FIELD_VALUE.fullmatch("".join([value for _, value in headers])):
        raise ValueError(next(repr(name) for name, value in headers
                              if not _FIELD_VALUE.fullmatch(value)))
    if listed:
        headers = [field for field, lower in zip(headers, lowers, strict=True)
                   if lower not in listed]
    headers.append((REQUEST_ID, rid))
    return headers
