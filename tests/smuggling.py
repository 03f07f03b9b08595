"""Our corpus of request-smuggling and malformed-head cases: (name, raw request, status).

Collected from defparam/smuggler's mutation list (CL.TE/TE.CL/TE.TE variants: spaces, tabs,
vertical tab, NUL, CR/LF games, quoted and repeated codings) and RFC 9112's framing rules.
Each one must be refused with `status` and the connection closed, and never reach a backend.
"""

from __future__ import annotations

SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"


def _post(headers: str, body: bytes = b"0\r\n\r\n" + SMUGGLED) -> bytes:
    return b"POST /echo HTTP/1.1\r\nHost: x\r\n" + headers.encode("latin-1") + b"\r\n" + body


TE = "Transfer-Encoding"
CASES: list[tuple[str, bytes, int]] = [
    # CL.TE and TE.CL: both present
    ("cl-te", _post(f"Content-Length: 5\r\n{TE}: chunked\r\n"), 400),
    ("te-cl", _post(f"{TE}: chunked\r\nContent-Length: 5\r\n"), 400),
    # Content-Length games
    ("cl-dup-same", _post("Content-Length: 5\r\nContent-Length: 5\r\n", b"hello"), 400),
    ("cl-dup-diff", _post("Content-Length: 5\r\nContent-Length: 6\r\n", b"hello!"), 400),
    ("cl-list", _post("Content-Length: 5, 5\r\n", b"hello"), 400),
    ("cl-plus", _post("Content-Length: +5\r\n", b"hello"), 400),
    ("cl-negative", _post("Content-Length: -1\r\n", b""), 400),
    ("cl-hex", _post("Content-Length: 0x5\r\n", b"hello"), 400),
    ("cl-space-before-colon", _post("Content-Length : 5\r\n", b"hello"), 400),
    ("cl-huge", _post("Content-Length: 99999999999999999999999\r\n", b""), 400),
    # Transfer-Encoding mutations (smuggler's list)
    ("te-space-before-colon", _post(f"{TE} : chunked\r\n"), 400),
    ("te-vtab", _post(f"{TE}:\x0bchunked\r\n"), 400),
    ("te-formfeed", _post(f"{TE}:\x0cchunked\r\n"), 400),
    ("te-nul", _post(f"{TE}: chunked\x00\r\n"), 400),
    ("te-cr", _post(f"{TE}: chunked\r\r\n"), 400),
    ("te-quoted", _post(f'{TE}: "chunked"\r\n'), 501),
    ("te-xchunked", _post(f"{TE}: xchunked\r\n"), 501),
    ("te-chunked-gzip", _post(f"{TE}: chunked, gzip\r\n"), 400),
    ("te-gzip-chunked", _post(f"{TE}: gzip, chunked\r\n"), 501),
    ("te-identity", _post(f"{TE}: identity\r\n"), 501),
    ("te-chunked-chunked", _post(f"{TE}: chunked, chunked\r\n"), 400),
    ("te-repeated-header", _post(f"{TE}: chunked\r\n{TE}: chunked\r\n"), 400),
    ("te-obs-fold", _post(f"{TE}:\r\n chunked\r\n"), 400),
    ("te-name-obs-fold", _post(f"X: y\r\n {TE}: chunked\r\n"), 400),
    ("te-http10", b"POST /echo HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
     + SMUGGLED, 400),
    ("te-bad-chunk-size", _post(f"{TE}: chunked\r\n", b"5x\r\nhello\r\n0\r\n\r\n"), 400),
    ("te-chunk-lf-only", _post(f"{TE}: chunked\r\n", b"5\nhello\n0\n\n"), 400),
    # head syntax
    ("obs-fold", b"GET /echo HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\n\r\n", 400),
    ("ctl-in-value", b"GET /echo HTTP/1.1\r\nHost: x\r\nX-A: a\x01b\r\n\r\n", 400),
    ("nul-in-value", b"GET /echo HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n", 400),
    ("del-in-value", b"GET /echo HTTP/1.1\r\nHost: x\r\nX-A: a\x7fb\r\n\r\n", 400),
    ("bare-lf", b"GET /echo HTTP/1.1\nHost: x\n\n", 400),
    ("bare-cr", b"GET /echo HTTP/1.1\r\nHost: x\rX-A: b\r\n\r\n", 400),
    ("space-in-name", b"GET /echo HTTP/1.1\r\nHost: x\r\nX A: b\r\n\r\n", 400),
    ("no-host-11", b"GET /echo HTTP/1.1\r\nX-A: b\r\n\r\n", 400),
    ("two-hosts", b"GET /echo HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    ("http09", b"GET /echo\r\n\r\n", 400),
    ("http2-version", b"GET /echo HTTP/2.0\r\nHost: x\r\n\r\n", 505),
    ("bad-version", b"GET /echo HTTP/1.x\r\nHost: x\r\n\r\n", 400),
    ("space-in-target", b"GET /echo /x HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    ("rtsp", b"GET /echo RTSP/1.0\r\nHost: x\r\n\r\n", 400),
    ("ice", b"SOURCE /echo ICE/1.0\r\nHost: x\r\n\r\n", 400),
    ("h2-preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 400),
    ("bad-method", b"G(T /echo HTTP/1.1\r\nHost: x\r\n\r\n", 400),
]
