"""ACME HTTP-01 challenge answers, shared by every worker (and every instance) through files.

The ACME client (acme.py) publishes `token -> key authorization` while an order is pending;
any worker answering `GET /.well-known/acme-challenge/TOKEN` on `tls.redirect_port` reads it
back. Files in the ACME storage directory are the shared state: no IPC on the request path,
they survive a worker restart, and instances that share one storage directory answer each
other's challenges (as Caddy's distributed solving does).
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

PATH_PREFIX = "/.well-known/acme-challenge/"
# RFC 8555 section 8.3: the token is base64url, no padding; anything else is never a file name.
_TOKEN = re.compile(r"^[A-Za-z0-9_-]{1,256}$")


def directory(storage: str) -> Path:
    """Where the pending answers of the ACME storage directory `storage` live."""
    return Path(storage) / "challenges"


def valid_token(token: str) -> bool:
    return bool(_TOKEN.match(token))


def publish(storage: str, token: str, key_authorization: str) -> None:
    """Make `token` answerable by every worker, atomically (never a half-written answer)."""
    if not valid_token(token):
        raise ValueError(f"not an ACME token: {token!r}")
    folder = directory(storage)
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, temporary = tempfile.mkstemp(dir=folder, prefix=".tmp-")
    try:
        with os.fdopen(fd, "w", encoding="ascii") as out:
            out.write(key_authorization)
        os.chmod(temporary, 0o644)
        os.replace(temporary, folder / token)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def withdraw(storage: str, token: str) -> None:
    """The order is done (or given up): the token is no longer answered."""
    if valid_token(token):
        (directory(storage) / token).unlink(missing_ok=True)


def answer(storage: str, path: str) -> bytes | None:
    """The body for a request to `path`, or None when it is not a pending challenge."""
    if not storage or not path.startswith(PATH_PREFIX):
        return None
    token = path[len(PATH_PREFIX):]
    if not valid_token(token):
        return None
    try:
        return (directory(storage) / token).read_bytes()
    except OSError:
        return None
