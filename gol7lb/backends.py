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
    tls: bool = False  # https://: reached over TLS, verified against `host` (upstreamtls.py)
    server_name: str = ""  # TLS name (SNI, verification) when not `host`: a discovered address's
    id: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        host = f"[{self.host}]" if ":" in self.host else self.host
        object.__setattr__(self, "id", f"{host}:{self.port}")

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    @property
    def tls_name(self) -> str:
        """The name a TLS backend's certificate must carry, sent as SNI."""
        return self.server_name or self.host

    @property
    def netloc(self) -> str:
        """host:port as it goes into a Host header (IPv6 bracketed): the same as `id`."""
        return self.id


WEIGHT_ALLOWED = f"a whole number from 1 to {MAX_WEIGHT}"
EXAMPLE_LIST = "'http://10.0.0.1:8081, http://10.0.0.2:8081 weight=2'"


def parse_backend_url(url: str, weight: int = 1, max_connections: int = 0) -> Backend:
    """Accept only `http://host[:port]` or `https://host[:port]` (TLS, port 443 by default):
    a path or query would otherwise be ignored silently. Each refusal names the URL and says,
    in the user's terms, what to write instead."""
    if not isinstance(url, str) or not url.strip():
        raise BackendError(f"backend URL {url!r} is empty or not a string: write "
                           "http://host:port")
    text = url.strip()
    if ";" in text:
        raise BackendError(f"backend URL {text!r} holds ';': separate backends with commas, "
                           f"like {EXAMPLE_LIST}")
    if "://" not in text:
        raise BackendError(f"backend URL {text!r} has no scheme: write http://{text}")
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        raise _bad_authority(text) from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise BackendError(f"backend URL {text!r}: only http:// and https:// backends are "
                           f"supported (not {parts.scheme}://)")
    if parts.username is not None or parts.password is not None:
        raise BackendError(f"backend URL {text!r}: credentials are not supported; write "
                           "http://host:port")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise BackendError(f"backend URL {text!r} has a path, query or fragment: write "
                           "http://host:port only")
    host = parts.hostname
    if not host:
        raise BackendError(f"backend URL {text!r} has no host: write http://host:port")
    if not host.isascii() or not host.isprintable():
        raise BackendError(f"backend URL {text!r}: the host must be ASCII (use the punycode "
                           "form)")
    if port is None:
        port = 443 if scheme == "https" else 80
    if not 1 <= port <= 65535:
        raise BackendError(f"backend URL {text!r}: port must be a number from 1 to 65535")
    if "[" in parts.netloc:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise _bad_authority(text) from None
    weight = check_weight(weight, text)
    canonical = f"{scheme}://{'[' + host + ']' if ':' in host else host}:{port}"
    return Backend(url=canonical, host=host, port=port, weight=weight,
                   max_connections=max_connections, tls=scheme == "https")


def _bad_authority(text: str) -> BackendError:
    """What urlsplit refuses: a port that is not a number, brackets around a non-IPv6."""
    return BackendError(f"backend URL {text!r}: expected http://host:port with a port from 1 "
                        "to 65535 and an IPv6 address in brackets like http://[::1]:8081")


def check_weight(weight: object, where: str) -> int:
    if isinstance(weight, bool) or not isinstance(weight, int) or not 1 <= weight <= MAX_WEIGHT:
        raise BackendError(f"weight {weight!r} of {where!r}: must be {WEIGHT_ALLOWED}")
    return weight


def parse_backend_list(text: str) -> list[Backend]:
    """Parse GOL7LB_BACKENDS: `URL [weight=N], URL [weight=N], ...`."""
    if ";" in text:
        raise BackendError(f"{text.strip()!r} holds ';': separate backends with commas, like "
                           f"{EXAMPLE_LIST}")
    backends: list[Backend] = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        url, *options = item.split()
        weight: object = 1
        for option in options:
            key, sep, value = option.partition("=")
            if key != "weight" or not sep:
                raise BackendError(f"{item!r}: {option!r} is not weight=N; separate backends "
                                   f"with commas, like {EXAMPLE_LIST}")
            weight = int(value) if value.strip().isdigit() else value
        backends.append(parse_backend_url(url, weight))  # type: ignore[arg-type]
    return backends
