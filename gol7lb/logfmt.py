"""Error-log formatting shared by every process: gunicorn's text lines, or one JSON object per
line when `log.format = "json"`. The format can switch on reload, so it is a module-wide
mode read at format time rather than a handler rebuilt per change.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from gunicorn.glogging import Logger

TEXT_FORMAT = "[%(asctime)s] [%(process)d] [%(levelname)s] %(message)s"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S %z"
_mode = {"format": "text"}


def set_format(fmt: str) -> None:
    """'text' or 'json', for every handler that uses `SwitchableFormatter` in this process."""
    _mode["format"] = fmt


def current_format() -> str:
    return _mode["format"]


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
    `logger_class` setting is gunicorn's public hook for this)."""

    def setup(self, cfg: Any) -> None:
        super().setup(cfg)
        for handler in self.error_log.handlers:
            if getattr(handler, "_gunicorn", False):
                handler.setFormatter(SwitchableFormatter(self.error_fmt, self.datefmt))
