"""The access log: one line per proxied request on standard output, text or JSON.

Cheap on purpose (it runs on every request): the time prefix is formatted once per second,
the line is built with one f-string (or one json.dumps) and written with one os.write on the
raw file descriptor, which is atomic for a line under PIPE_BUF even with many threads and
workers writing to the same pipe.
"""

from __future__ import annotations

import json
import os
import time

from gol7lb.logfmt import iso_time

# Longer paths are cut in the log line (never in the request). Escaping can double a path
# (quotes, backslashes), and a line must stay within PIPE_BUF (4096) for its one write to be
# atomic when every worker writes to the same pipe: 2 x 1024 plus the other fields fits.
MAX_PATH = 1024


class AccessLog:
    def __init__(self, fd: int = 1) -> None:
        self.fd = fd
        self._second = -1
        self._stamp = ""

    def _now(self) -> str:
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._stamp = iso_time(second)[:-10] + iso_time(second)[-6:]  # no milliseconds
        return self._stamp

    def write(self, fmt: str, client: str, method: str, path: str, status: int, sent: int,
              pool: str, backend: str, upstream_s: float | None, total_s: float,
              request_id: str) -> None:
        if len(path) > MAX_PATH:
            path = path[:MAX_PATH] + "..."
        upstream_ms = None if upstream_s is None else round(upstream_s * 1000, 3)
        duration_ms = round(total_s * 1000, 3)
        if fmt == "json":
            line = json.dumps({
                "time": self._now(), "client": client, "method": method, "path": path,
                "status": status, "bytes": sent, "pool": pool, "backend": backend,
                "upstream_ms": upstream_ms, "duration_ms": duration_ms,
                "request_id": request_id}, ensure_ascii=False) + "\n"
        else:
            upstream = "-" if upstream_ms is None else f"{upstream_ms}ms"
            line = (f'{self._now()} {client} "{method} {_printable(path)}" {status} {sent} '
                    f"pool={pool} backend={backend} upstream={upstream} "
                    f"total={duration_ms}ms rid={request_id}\n")
        try:  # noqa: SIM105 - suppress() costs more per request than try/except
            os.write(self.fd, line.encode("utf-8", "replace"))
        except OSError:
            pass  # a closed or full stdout must never fail a request


def _printable(path: str) -> str:
    """Quotes, backslashes and control characters escaped, so one request is always one
    parseable line (an unescaped backslash would let `/a\\` end the quoted field as `\\"`)."""
    if path.isprintable() and '"' not in path and "\\" not in path:
        return path
    return path.encode("unicode_escape").decode("ascii").replace('"', '\\"')
