"""One client request's record from head to last byte: what the access log, the metrics and
the per-host counters are told once it ends."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Protocol

from gol7lb.accesslog import AccessLog
from gol7lb.config import LogSettings
from gol7lb.hosts import WorkerCells
from gol7lb.metrics import RequestRecorder
from gol7lb.outcomes import Episode

if TYPE_CHECKING:
    from gol7lb.rules import CompiledRules

log = logging.getLogger("gol7lb.proxy")  # the request path's logger (logfmt.LOGGERS)


class Books(Protocol):
    """Where an Exchange is counted and logged (the worker's ProxyApp)."""

    cells: WorkerCells
    recorder: RequestRecorder
    access_log: AccessLog


class Exchange:
    """One client request from head to last byte: what the access log, the metrics and the
    per-host counters are told once it ends."""

    __slots__ = ("app", "started", "method", "path", "client", "rid", "pool", "backend_id",
                 "slot", "detached", "status", "upstream_s", "answered", "log", "attempts",
                 "flags", "rules", "protocol")

    def __init__(self, app: Books, method: str, path: str, client: str, rid: str,
                 log_settings: LogSettings, protocol: str = "HTTP/1.1") -> None:
        self.app = app
        self.log = log_settings  # the log settings of the configuration the request began in
        self.started = time.perf_counter()
        self.method = method
        self.path = path
        self.client = client
        self.rid = rid
        self.protocol = protocol  # the client's, for the access log
        self.pool = "-"
        self.backend_id = "-"
        self.slot: int | None = None  # the host slot counted in flight until finish()
        self.detached = False  # a tunnel: in flight, but holding no serving thread
        self.status = 0
        self.upstream_s: float | None = None
        self.answered = False  # the status came from a backend (metrics label it by address)
        self.attempts = 0  # backends tried
        self.flags = ""  # access-log response flags, comma-separated (docs/operations.md)
        self.rules: CompiledRules | None = None  # the route's rules once the request passed them
        app.recorder.begin()

    def flag(self, code: str) -> None:
        """Note what happened (failures only: the hot path never calls this)."""
        if code not in self.flags.split(","):
            self.flags = f"{self.flags},{code}" if self.flags else code

    def detach(self) -> None:
        """A tunnel: still in flight to its backend, but holding no serving thread."""
        if self.slot is not None:
            self.app.cells.detach(self.slot)
            self.detached = True

    def finish(self, sent: int, failed: bool = False) -> None:
        app = self.app
        if self.slot is not None:
            app.cells.end(self.slot, failed, local=not self.detached)
            self.slot = None
        total = time.perf_counter() - self.started
        metric_backend = self.backend_id if self.answered else "none"
        try:  # counting and logging never fail a request (the recorder keeps its own counts)
            app.recorder.record(self.pool, metric_backend, self.status, self.method, total)
            log_settings = self.log
            if log_settings.access:
                app.access_log.write(log_settings.format, self.client, self.method, self.path,
                                     self.status, sent, self.pool, self.backend_id,
                                     self.upstream_s, total, self.rid, self.attempts,
                                     self.flags, self.protocol)
        except Exception as e:
            if _BOOKKEEPING_FAILS.begins():
                log.error("cannot count or log a request: %s", e or type(e).__name__)



_BOOKKEEPING_FAILS = Episode()
