"""The plain-HTTP listener on `tls.redirect_port`: `308` to the same URI over HTTPS, except
ACME HTTP-01 challenges (`/.well-known/acme-challenge/TOKEN`), answered from the ACME
storage directory (challenges.py) so any worker of any instance sharing it answers.

A WSGI app of its own, served by the same worker loop and threads as the proxy: it never
reaches a backend, so it has no route, pool, access-log line or request metrics.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from gol7lb import challenges
from gol7lb.target import valid_authority

StartResponse = Callable[..., Any]


def host_without_port(authority: str) -> str:
    """`example.com:80` -> `example.com`; `[::1]:80` -> `[::1]`."""
    if authority.startswith("["):
        return authority[:authority.find("]") + 1] if "]" in authority else authority
    return authority.rpartition(":")[0] if ":" in authority else authority


class RedirectApp:
    """`https_port` is PORT (in the Location only when it is not 443); `storage()` is the
    ACME storage directory now ("" when ACME is off)."""

    def __init__(self, https_port: int, storage: Callable[[], str]) -> None:
        self.suffix = "" if https_port == 443 else f":{https_port}"
        self.storage = storage

    def __call__(self, environ: dict[str, Any], start: StartResponse) -> Iterable[bytes]:
        target: str = environ.get("RAW_URI", "/")
        path = target.partition("?")[0]
        if path.startswith(challenges.PATH_PREFIX):
            answer = challenges.answer(self.storage(), path)
            if answer is not None:
                return self._send(start, "200 OK", answer,
                                  [("Content-Type", "application/octet-stream")])
            return self._send(start, "404 Not Found", b"no such ACME challenge\n")
        authority = environ.get("HTTP_HOST", "")
        if not authority or not valid_authority(authority):
            return self._send(start, "400 Bad Request", b"a Host header is needed\n")
        if target.startswith(("http://", "https://")):  # absolute form: its path and query
            rest = target.partition("//")[2]
            target = rest[rest.find("/"):] if "/" in rest else "/"
        elif not target.startswith("/"):
            target = "/"  # `*` (OPTIONS): the root
        location = f"https://{host_without_port(authority)}{self.suffix}{target}"
        return self._send(start, "308 Permanent Redirect", b"", [("Location", location)])

    @staticmethod
    def _send(start: StartResponse, status: str, body: bytes,
              extra: list[tuple[str, str]] | None = None) -> list[bytes]:
        headers = [("Content-Length", str(len(body))), *(extra or [])]
        if body and not extra:
            headers.append(("Content-Type", "text/plain; charset=utf-8"))
        start(status, headers)
        return [body]
