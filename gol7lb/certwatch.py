"""The certificate watcher process: the one that judges certificate files as they change.

Every worker stats the certificate files four times a second and loads a changed pair for
its next handshakes by itself (no IPC: worker.py). This helper does the same with its own
TLSServer so that one process, not every worker, says what went wrong: a pair that does not
load is logged once, naming the file, and kept in `config.last_error` (/status) until it is
fixed; a pair that loads is logged with its names and expiry. Like the config watcher it is
spawned by the master and restarted if it dies.
"""

from __future__ import annotations

import logging
import os
import sys
import time

from gol7lb.children import helper_main
from gol7lb.config import Settings
from gol7lb.counters import SharedCounters
from gol7lb.manager import ControlClient
from gol7lb.tls import TLSServer, all_sources
from gol7lb.view import GenerationFollower

log = logging.getLogger("gol7lb.tls")
CHECK_EVERY = 0.25  # seconds: a changed pair is judged well within the 2 s workers take it in
# A pair replaced file by file is briefly a new certificate with the old key: an error is
# reported only once it has lasted this long.
SETTLE_SECONDS = 0.6


class CertificateWatcher:
    """Judges the running configuration's certificate files and reports on them."""

    def __init__(self, client: ControlClient, settings: Settings) -> None:
        self.client = client
        self.settings = settings
        self.server = TLSServer(settings.tls, lambda: all_sources(self.settings), strict=False)
        self.reported: dict[str, str] = {}  # error line -> the message given to last_error
        self.seen: dict[str, float] = {}  # error line -> when it was first seen
        self.served = self._served()

    def follow(self, settings: Settings) -> None:
        self.settings = settings

    def _served(self) -> dict[str, tuple[tuple[str, ...], float]]:
        return {i.file: (i.names, i.not_after) for i in self.server.infos()}

    def check(self) -> None:
        self.server.refresh()
        now = time.monotonic()
        current = set(self.server.error_lines())
        for error in current:
            first = self.seen.setdefault(error, now)
            if error not in self.reported and now - first >= SETTLE_SECONDS:
                self._refused(error)
        self.seen = {e: t for e, t in self.seen.items() if e in current}
        served = self._served()
        for file, (names, not_after) in served.items():
            if self.served.get(file) != (names, not_after):
                log.info("certificate %s loaded for new handshakes: %s, valid until %s",
                         file, ", ".join(names),
                         time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(not_after)))
        self.served = served
        for error in [e for e in self.reported if e not in current]:
            message = self.reported.pop(error)
            log.info("certificate error resolved: %s", error)
            self._call("clear_error", message)

    def _refused(self, error: str) -> None:
        log.error("certificate refused, the one served stays: %s", error)
        message = f"tls: {error}; the certificate served before stays"
        self.reported[error] = message
        self._call("record_error", message)

    def _call(self, method: str, message: str) -> None:
        try:
            self.client.call(method, message)
        except Exception as e:  # the Manager restarts: the log line above says it anyway
            log.error("cannot record the certificate state in the shared state: %s", e)


def run(address: str, authkey: bytes, counters: SharedCounters) -> None:
    """Entry point of the certificate watcher process (started when tls.cert is set)."""
    stop = helper_main("certificate watcher")
    client = ControlClient(address, authkey)
    settings: Settings | None = None
    while settings is None and not stop.is_set():
        try:
            settings = client.snapshot().settings
        except Exception:
            stop.wait(0.2)
    if settings is None:
        sys.exit(0)
    log.info("certificate watcher (pid %d)", os.getpid())
    watcher = CertificateWatcher(client, settings)
    follower = GenerationFollower(lambda: counters.generation,
                                  lambda: client.snapshot().settings, watcher.follow,
                                  "certificate watcher")
    while not stop.wait(CHECK_EVERY):
        follower.poll()
        try:
            watcher.check()
        except Exception:
            log.exception("error checking certificates")
    sys.exit(0)
