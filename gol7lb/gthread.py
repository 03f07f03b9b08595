"""gunicorn's gthread worker plus two stop behaviours a load balancer needs
(`worker_class = "gol7lb.gthread.ThreadProxyWorker"`).

The default worker is gol7lb.worker.ProxyWorker (faster, and slow clients hold no thread); this
one is the choice for what only gthread has (TLS with --certfile, HTTP/2), and it proves the
WSGI app does not depend on our worker (the suite runs under it: pytest --lb-worker gthread).

* Graceful stop (TERM): stock gthread only stops polling its listener while it drains; the
  socket stays open, so the kernel keeps completing handshakes nobody will serve. Closing the
  listener at once makes clients get a refusal they can retry elsewhere, as nginx and HAProxy
  do on a soft stop.
* Quick stop (INT, QUIT): stock gthread calls sys.exit, and the interpreter then joins the
  thread pool, so a request stuck on a slow backend holds the worker for up to
  proxy.read_timeout. A quick stop means now: exit without joining.
"""

from __future__ import annotations

import os
from types import FrameType

from gunicorn.workers.gthread import ThreadWorker


class ThreadProxyWorker(ThreadWorker):
    def set_accept_enabled(self, enabled: bool) -> None:
        super().set_accept_enabled(enabled)
        if not enabled and not self.alive:  # the graceful stop has begun
            for listener in self.sockets:
                listener.close()

    def handle_quit(self, sig: int, frame: FrameType | None) -> None:
        self.alive = False
        self.cfg.worker_int(self)
        self.log.info("Worker exiting at once (pid: %s)", self.pid)
        os._exit(0)
