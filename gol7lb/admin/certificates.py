"""The certificates in /status `tls` and in `gol7lb_tls_certificate_expiry_seconds`.

The admin listener judges the running configuration's certificate files itself, the way
every worker does (tls.TLSServer: a stat per file, a load only when one changed, a pair that
does not load leaves the previous one in place), so what it shows is what the workers serve,
with no IPC from them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import GaugeMetricFamily, Metric

from gol7lb import acme
from gol7lb.config import Settings
from gol7lb.tls import TLSServer, all_sources, status_part

LOOK_EVERY = 0.25  # seconds between two looks at the files, however often it is asked


class CertificateView:
    """`settings()` gives the running configuration (None while the state is unreadable)."""

    def __init__(self, settings: Callable[[], Settings | None]) -> None:
        self.settings = settings
        self._current: Settings | None = None
        self._server: TLSServer | None = None
        self._lock = threading.Lock()
        self._looked_at = -LOOK_EVERY

    def server(self) -> TLSServer | None:
        settings = self.settings()
        with self._lock:
            if settings is not None:
                self._current = settings
            current = self._current
            if current is None or not current.tls.enabled:
                return None
            now = time.monotonic()
            if self._server is None:
                self._server = TLSServer(current.tls, lambda: all_sources(self._latest()),
                                         strict=False)
                self._looked_at = now
            elif now - self._looked_at >= LOOK_EVERY:
                self._server.refresh()
                self._looked_at = now
            return self._server

    def _latest(self) -> Settings:
        assert self._current is not None
        return self._current

    def status(self) -> dict[str, Any]:
        return status_part(self.server(), acme.status())

    def collect(self) -> Iterator[Metric]:
        """A prometheus_client collector: each served certificate's notAfter, by name."""
        family = GaugeMetricFamily("gol7lb_tls_certificate_expiry_seconds",
                                   "Unix time of the notAfter of each served certificate, by "
                                   "name (SAN).", labels=["name"])
        server = self.server()
        seen: set[str] = set()
        for info in server.infos() if server is not None else []:
            for name in info.names:
                if name not in seen:  # a name in two certificates: the one SNI picks
                    seen.add(name)
                    family.add_metric([name], info.not_after)
        yield family
