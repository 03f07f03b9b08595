"""Response compression (`[compression]`, `compress = true` on a route): zstd, br or gzip,
chosen by the client's Accept-Encoding q-values and the server's order of preference,
applied while the answer streams to the client.

`Compression` is built once per configuration (pooltable.py). Per request, `negotiate` looks
at the request (HEAD, Range, Accept-Encoding: parsed once per distinct value, cached) before
the attempts; `apply` looks at the answer's head (status, Content-Encoding, Content-Type,
Content-Length, Cache-Control) and, when it compresses, rewrites the head and wraps the body:
every block the backend sends is compressed and flushed at once, so a streamed answer
reaches the client piece by piece and is never held whole.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Protocol

import brotli
import zstandard

from gol7lb.bodies import UpstreamBody
from gol7lb.config import CompressionSettings

ACCEPT_CACHE_SIZE = 1024  # distinct Accept-Encoding values remembered; clients choose them
# Levels per `compression.level`: fast enough to run on the fly (Brotli 11 runs at ~0.5 MB/s).
LEVELS: dict[str, dict[str, int]] = {
    "fast": {"zstd": 1, "br": 4, "gzip": 1},
    "default": {"zstd": 3, "br": 5, "gzip": 6},
}
NEVER_STATUS = frozenset({204, 206, 304})  # no body, or a range of the identity body


class Encoder(Protocol):
    """One answer's compressor: `whole` compresses a body the backend sent in one piece;
    for a streamed one, `chunk` compresses and flushes each block, `end` closes."""

    def whole(self, data: bytes) -> bytes: ...

    def chunk(self, data: bytes) -> bytes: ...

    def end(self) -> bytes: ...


class _Zstd:
    __slots__ = ("_compressor", "_obj")

    def __init__(self, level: int) -> None:
        self._compressor = zstandard.ZstdCompressor(level=level)
        self._obj = self._compressor.compressobj()

    def whole(self, data: bytes) -> bytes:
        return self._compressor.compress(data)

    def chunk(self, data: bytes) -> bytes:
        obj = self._obj
        return obj.compress(data) + obj.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)

    def end(self) -> bytes:
        return self._obj.flush(zstandard.COMPRESSOBJ_FLUSH_FINISH)


class _Brotli:
    __slots__ = ("_obj",)

    def __init__(self, level: int) -> None:
        self._obj = brotli.Compressor(quality=level)

    def whole(self, data: bytes) -> bytes:
        return self._obj.process(data) + self._obj.finish()  # type: ignore[no-any-return]

    def chunk(self, data: bytes) -> bytes:
        obj = self._obj
        return obj.process(data) + obj.flush()  # type: ignore[no-any-return]

    def end(self) -> bytes:
        return self._obj.finish()  # type: ignore[no-any-return]


class _Gzip:
    __slots__ = ("_obj",)

    def __init__(self, level: int) -> None:
        self._obj = zlib.compressobj(level, zlib.DEFLATED, 31)  # 31: the gzip wrapper

    def whole(self, data: bytes) -> bytes:
        return self._obj.compress(data) + self._obj.flush()

    def chunk(self, data: bytes) -> bytes:
        obj = self._obj
        return obj.compress(data) + obj.flush(zlib.Z_SYNC_FLUSH)

    def end(self) -> bytes:
        return self._obj.flush(zlib.Z_FINISH)


ENCODERS: dict[str, Callable[[int], Encoder]] = {"zstd": _Zstd, "br": _Brotli, "gzip": _Gzip}


def accept_encoding(value: str) -> dict[str, float]:
    """`gzip;q=0.8, br, *;q=0` -> {"gzip": 0.8, "br": 1.0, "*": 0.0} (names lower-cased; a
    malformed q counts as 0, so a garbled entry never turns compression on)."""
    found: dict[str, float] = {}
    for item in value.split(","):
        name, _, params = item.partition(";")
        name = name.strip().lower()
        if not name:
            continue
        q = 1.0
        for param in params.split(";"):
            key, _, text = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    q = float(text.strip())
                except ValueError:
                    q = 0.0
                if not 0.0 <= q <= 1.0:
                    q = 0.0
        found[name] = max(q, found.get(name, q))  # repeated: the most favourable
    return found


def choose(value: str, preference: Iterable[str]) -> str | None:
    """The encoding for an Accept-Encoding value: among the server's `preference`, those the
    client accepts (explicitly, or through `*`) with its highest q; ties go to the server's
    order. None when nothing is acceptable or the client ranks identity higher."""
    accepted = accept_encoding(value)
    star = accepted.get("*")
    best, best_q = None, 0.0
    for name in preference:
        q = accepted.get(name, star if star is not None else 0.0)
        if q > best_q:
            best, best_q = name, q
    identity = accepted.get("identity", star if star is not None else 0.0)
    if best is None or identity > best_q:
        return None
    return best


class Compression:
    """`[compression]` of one configuration, compiled: the types as a set and prefixes, the
    levels, and a cache of Accept-Encoding value -> encoding."""

    def __init__(self, settings: CompressionSettings) -> None:
        self.preference = tuple(settings.encodings)
        self.exact = frozenset(t for t in settings.types if not t.endswith("/*"))
        self.prefixes = tuple(t[:-1] for t in settings.types if t.endswith("/*"))
        self.min_bytes = settings.min_bytes
        self.levels = LEVELS[settings.level]
        # one Negotiated per outcome, shared by every request with it: nothing made per request
        self._outcomes = {name: Negotiated(self, name) for name in (*self.preference, None)}
        self._chosen: dict[str, Negotiated] = {}

    def negotiate(self, environ: Mapping[str, Any], method: str) -> Negotiated | None:
        """Before the attempts: None when this request's answer is never compressed (HEAD, a
        Range request); else what the client accepts (maybe nothing: then the answer only
        gets `Vary: Accept-Encoding`)."""
        if method == "HEAD" or "HTTP_RANGE" in environ:
            return None
        value = environ.get("HTTP_ACCEPT_ENCODING") or ""
        negotiated = self._chosen.get(value)
        if negotiated is None:
            negotiated = self._outcomes[choose(value, self.preference) if value else None]
            if len(self._chosen) < ACCEPT_CACHE_SIZE:
                self._chosen[value] = negotiated
        return negotiated

    def compressible(self, status: int, headers: list[tuple[str, str]],
                     size: int | None = None) -> bool:
        """The answer's head allows compression: a status with a whole body, no
        Content-Encoding, a listed type, big enough (`size`, else Content-Length) or of
        unknown size, no `no-transform`."""
        if status < 200 or status in NEVER_STATUS:
            return False
        media = ""
        length = -1
        for name, value in headers:
            lower = name.lower()
            if lower == "content-encoding":
                if value.strip().lower() not in ("", "identity"):
                    return False
            elif lower == "content-type":
                media = value.partition(";")[0].strip().lower()
            elif lower == "content-length":
                try:
                    length = int(value)
                except ValueError:
                    return False
            elif lower == "cache-control" and "no-transform" in value.lower():
                return False
        if not media or (media not in self.exact and not media.startswith(self.prefixes)):
            return False
        if size is not None:
            length = size
        return length < 0 or length >= self.min_bytes


class Negotiated:
    """The request's side of it: the encoding the client accepts (None: none). Immutable,
    shared by the requests with the same outcome."""

    __slots__ = ("compression", "encoding")

    def __init__(self, compression: Compression, encoding: str | None) -> None:
        self.compression = compression
        self.encoding = encoding

    def apply(self, status: int, headers: list[tuple[str, str]],
              size: int | None = None) -> Encoder | None:
        """Rewrite `headers` in place for a compressed answer and return its encoder; None
        when it goes as it is (with `Vary: Accept-Encoding` when it could have been
        compressed for another client)."""
        compression = self.compression
        if not compression.compressible(status, headers, size):
            return None
        _add_vary(headers)
        encoding = self.encoding
        if encoding is None:
            return None
        kept = []
        for name, value in headers:
            lower = name.lower()
            if lower in ("content-length", "content-encoding", "accept-ranges"):
                continue  # the length changes; ranges of the encoded body are not served
            if lower == "etag" and not value.lstrip().startswith("W/"):
                value = "W/" + value.strip()  # no longer byte-for-byte the same
            kept.append((name, value))
        kept.append(("Content-Encoding", encoding))
        headers[:] = kept
        return ENCODERS[encoding](compression.levels[encoding])


def _add_vary(headers: list[tuple[str, str]]) -> None:
    for i, (name, value) in enumerate(headers):
        if name.lower() == "vary":
            tokens = {t.strip().lower() for t in value.split(",")}
            if "accept-encoding" not in tokens and "*" not in tokens:
                headers[i] = (name, f"{value}, Accept-Encoding" if value.strip()
                              else "Accept-Encoding")
            return
    headers.append(("Vary", "Accept-Encoding"))


class CompressedBody:
    """A streamed response body as the server writes it, compressed block by block: each
    block the backend sent goes out compressed and flushed before the next is read. `close`
    passes on to the backend body (its socket goes back, the request is counted); the access
    log's byte count is the compressed one (less the few closing bytes)."""

    def __init__(self, body: UpstreamBody, encoder: Encoder) -> None:
        self.body = body
        self.encoder = encoder

    def __iter__(self) -> Iterator[bytes]:
        return self._blocks()

    def _blocks(self) -> Iterator[bytes]:
        encoder = self.encoder
        body = self.body
        sent = 0
        for block in body:
            out = encoder.chunk(block)
            sent += len(out)
            body.sent = sent  # what the access log says went to the client
            if out:
                yield out
        tail = encoder.end()
        if tail:
            yield tail

    def close(self) -> None:
        self.body.close()
