"""A per-process flusher thread for what the hot path batches (access-log lines, metric
counts): requests only append to memory, the thread hands the batch on every few tens of
milliseconds, and once more when the process exits normally."""

from __future__ import annotations

import atexit
import os
import threading
import time
import weakref
from collections.abc import Callable


class PeriodicFlush:
    """Calls `flush` every `seconds` from a daemon thread of this process, started on first
    use. A forked child starts its own (threads do not survive a fork); the check on the
    hot path is one attribute read, not a getpid() system call per request."""

    def __init__(self, flush: Callable[[], None], seconds: float, name: str) -> None:
        self._flush = flush
        self.seconds = seconds
        self.name = name
        self.started = False  # read on the hot path: call ensure_started() only while False
        self._lock = threading.Lock()
        forked = weakref.WeakMethod(self._forked)
        os.register_at_fork(after_in_child=lambda: (method := forked()) and method())

    def _forked(self) -> None:
        self.started = False
        self._lock = threading.Lock()

    def ensure_started(self) -> None:
        if self.started:
            return
        with self._lock:
            if self.started:
                return
            self.started = True
        threading.Thread(target=self._run, name=self.name, daemon=True).start()
        atexit.register(self._flush)

    def _run(self) -> None:
        while True:
            time.sleep(self.seconds)
            self._flush()
