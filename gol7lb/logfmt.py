"""Error-log formatting and levels shared by every process: gunicorn's text lines, or one JSON
object per line when `log.format = "json"`. The format can switch on reload, so it is a
module-wide mode read at format time rather than a handler rebuilt per change.

Every GoL7-LB component logs on its own logger under `gol7lb` (`gol7lb.proxy`,
`gol7lb.supervisor`, ...; LOGGERS lists them). In the gunicorn master and workers the `gol7lb`
logger writes to gunicorn's error-log handlers (GunicornLogger.setup); in the spawned helpers
the root logger's handler takes them (children.configure_child_logging). `log.levels` sets
levels per logger (`apply`).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable
from typing import Any, Literal, Protocol, get_args

from gunicorn.glogging import Logger

TEXT_FORMAT = "[%(asctime)s] [%(process)d] [%(levelname)s] %(message)s"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S %z"
LogFormat = Literal["text", "json"]
LOG_FORMATS: tuple[LogFormat, ...] = get_args(LogFormat)
_mode: dict[str, LogFormat] = {"format": "text"}
ROOT = "gol7lb"
# The component loggers, for docs/operations.md and the tests: logger -> what logs there.
LOGGERS = {
    "gol7lb.hooks": "the master's start, stop and worker bookkeeping",
    "gol7lb.children": "the master starting, restarting and stopping its helpers",
    "gol7lb.worker": "a worker's accept loop and shutdown",
    "gol7lb.proxy": "the request path in a worker: no healthy backend, failed attempts (debug)",
    "gol7lb.tunnel": "upgraded connections (WebSocket) in a worker",
    "gol7lb.ratelimit": "a rate limit's Redis store unreachable, and back",
    "gol7lb.serve": "errors writing a response to a client",
    "gol7lb.http2": "HTTP/2 client connections in a worker: Rapid Reset, protocol errors (debug)",
    "gol7lb.tls": "certificates loaded or refused (the certificate watcher)",
    "gol7lb.metrics": "the Prometheus multiprocess files",
    "gol7lb.state": "a process reading the shared state from the manager",
    "gol7lb.manager": "the manager of the shared state; passive-health ejections",
    "gol7lb.supervisor": "the health checker",
    "gol7lb.reload": "the config watcher and reloads",
    "gol7lb.discovery": "DNS discovery",
    "gol7lb.acme": "automatic certificates: orders, renewals, failures, the storage lock",
    "gol7lb.admin": "the admin listener",
}
LEVELS = ("debug", "info", "warning", "error", "critical")
_overrides: dict[str, int] = {}  # logger name -> the level log.levels gives it
_base: dict[str, int] = {}  # logger name -> its level before log.levels set one


class LogSettingsLike(Protocol):
    @property
    def format(self) -> LogFormat: ...
    @property
    def levels(self) -> tuple[str, ...]: ...


def set_format(fmt: LogFormat) -> None:
    """'text' or 'json', for every handler that uses `SwitchableFormatter` in this process."""
    _mode["format"] = fmt


def current_format() -> LogFormat:
    return _mode["format"]


def parse_levels(items: Iterable[str]) -> dict[str, int]:
    """('gol7lb.proxy=debug', ...) -> {'gol7lb.proxy': logging.DEBUG}; ValueError otherwise."""
    levels = {}
    for item in items:
        name, sep, level = item.partition("=")
        name, level = name.strip(), level.strip().lower()
        if not sep or not name or any(c.isspace() for c in name) or level not in LEVELS:
            raise ValueError(item)
        levels[name] = getattr(logging, level.upper())
    return levels


def set_levels(items: Iterable[str]) -> None:
    """Give each named logger its level; a logger no longer named gets its own level back."""
    levels = parse_levels(items)
    for name in list(_overrides):
        if name not in levels:
            logging.getLogger(name).setLevel(_base.pop(name))
            del _overrides[name]
    for name, level in levels.items():
        logger = logging.getLogger(name)
        if name not in _overrides:
            _base[name] = logger.level
        _overrides[name] = level
        logger.setLevel(level)


def current_levels() -> tuple[str, ...]:
    return tuple(f"{name}={logging.getLevelName(level).lower()}"
                 for name, level in _overrides.items())


def apply(settings: LogSettingsLike) -> None:
    """This process's error lines follow the running configuration's `log` section."""
    set_format(settings.format)
    set_levels(settings.levels)


def _set_base_level(name: str, level: int) -> None:
    """A logger's own level, under what log.levels may set for it (which stays)."""
    if name in _overrides:
        _base[name] = level
    logging.getLogger(name).setLevel(_overrides.get(name, level))


def iso_time(seconds: float) -> str:
    """RFC 3339 local time with milliseconds, as access and error JSON lines carry it."""
    base = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(seconds))
    offset = time.strftime("%z", time.localtime(seconds))
    return f"{base}.{int(seconds % 1 * 1000):03d}{offset[:3]}:{offset[3:]}"


class SwitchableFormatter(logging.Formatter):
    """gunicorn's error-log text format, or a JSON object with time, level, pid and message."""

    def __init__(self, text_format: str = TEXT_FORMAT, datefmt: str = DATE_FORMAT) -> None:
        super().__init__(text_format, datefmt)

    def format(self, record: logging.LogRecord) -> str:
        if _mode["format"] != "json":
            return super().format(record)
        entry = {"time": iso_time(record.created), "level": record.levelname.lower(),
                 "pid": record.process, "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)



class GunicornLogger(Logger):
    """gunicorn's Logger with the switchable formatter on its error handlers (the
    `logger_class` setting is gunicorn's public hook for this), and the `gol7lb` loggers
    writing to those same handlers at gunicorn's level (info unless --log-level says
    otherwise). gunicorn runs this again on SIGHUP, and a fork keeps it."""

    def setup(self, cfg: Any) -> None:
        super().setup(cfg)
        for handler in self.error_log.handlers:
            if getattr(handler, "_gunicorn", False):
                handler.setFormatter(SwitchableFormatter(self.error_fmt, self.datefmt))
        ours = logging.getLogger(ROOT)
        ours.handlers[:] = self.error_log.handlers
        ours.propagate = False
        _set_base_level(self.error_log.name, self.loglevel)  # super() set it: again
        _set_base_level(ROOT, self.loglevel)
