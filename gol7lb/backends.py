"""The `Backend` value: where the LB may connect, parsed strictly from URLs."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from urllib.parse import urlsplit


class BackendError(ValueError):
    """A backend URL or weight that cannot be used; the message says what is allowed."""


MAX_WEIGHT = 256


@dataclass(frozen=True, slots=True)
class Backend:
    """One configured upstream. Identity is its address, so state keyed by it survives
    reloads. `id` (`host:port`, IPv6 bracketed) is computed once: the hot path reads it
    several times per request."""

    url: str
    host: str
    port: int
    weight: int = 1
    max_connections: int = 0  # in-flight cap over all workers; 0: proxy.max_connections
    id: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        host = f"[{self.host}]" if ":" in self.host else self.host
        object.__setattr__(self, "id", f"{host}:{self.port}")

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    @property
    def netloc(self) -> str:
        """host:port as it goes into a Host header (IPv6 bracketed): the same as `id`."""
        return self.id


def parse_backend_url(url: str, weight: int = 1, max_connections: int = 0) -> Backend:
    """Accept only `http://host[:port]`: a path or query would otherwise be ignored silently."""
    if not isinstance(url, str) or not url.strip():
        raise BackendError(f"{url!r}: expected an http://host:port URL")
    text = url.strip()
    parts = urlsplit(text)
    if parts.scheme.lower() != "http":
        raise BackendError(f"{text!r}: only http:// backends are supported")
    if parts.username or parts.password:
        raise BackendError(f"{text!r}: credentials in backend URLs are not supported")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise BackendError(f"{text!r}: a backend URL has no path, query or fragment")
    try:
        port = parts.port
    except ValueError:
        raise BackendError(f"{text!r}: port must be a number from 1 to 65535") from None
    host = parts.hostname
    if not host:
        raise BackendError(f"{text!r}: missing host")
    if not host.isascii() or not host.isprintable():
        raise BackendError(f"{text!r}: the host must be ASCII (use the punycode form)")
    if port is None:
        port = 80
    if not 1 <= port <= 65535:
        raise BackendError(f"{text!r}: port must be a number from 1 to 65535")
    if "[" in parts.netloc:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise BackendError(f"{text!r}: bad IPv6 address") from None
    weight = check_weight(weight, text)
    canonical = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
    return Backend(url=canonical, host=host, port=port, weight=weight,
                   max_connections=max_connections)


def check_weight(weight: object, where: str) -> int:
    if isinstance(weight, bool) or not isinstance(weight, int) or not 1 <= weight <= MAX_WEIGHT:
        raise BackendError(f"{where!r}: weight must be a whole number from 1 to {MAX_WEIGHT}")
    return weight


def parse_backend_list(text: str) -> list[Backend]:
    """Parse GOL7LB_BACKENDS: `URL [weight=N], URL [weight=N], ...`."""
    backends: list[Backend] = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        url, *options = item.split()
        weight = 1
        for option in options:
            key, sep, value = option.partition("=")
            if key != "weight" or not sep:
                raise BackendError(f"{item!r}: expected 'URL' or 'URL weight=N'")
            try:
                weight = int(value)
            except ValueError:
                raise BackendError(
                    f"{item!r}: weight must be a whole number from 1 to {MAX_WEIGHT}"
                ) from None
        backends.append(parse_backend_url(url, weight))
    return backends
