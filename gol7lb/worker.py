"""`ProxyWorker`: gunicorn's master, signals and hooks; our own lean HTTP/1.1 hot path.

Why not gthread: a profile under `wrk -c32` showed three quarters of a worker's GIL time in
gunicorn's request parsing, thread-pool hand-off and header formatting, and gthread reads a
request head in a pool thread once its first byte arrives, so slow clients hold threads.

How it works (one process):

* The main thread runs an epoll loop. It owns the listening sockets (shared with the other
  workers, or its own with reuse_port; spread.py keeps the load even), every idle keep-alive
  connection and every connection whose request head is still coming in. It reads what is
  there without blocking and feeds it to the httptools parser (http1.py), so a slow or idle
  client costs a few bytes of memory, never a thread.
* Once a head is complete, the connection goes to a pool thread (`threads` of them), which
  runs the WSGI app (serve.py) and serves the requests already read on the connection
  (pipelining); then the connection goes back to the loop (EPOLLONESHOT re-arm: the kernel
  hands it over, no wake-up pipe). Idle threads wait on a SimpleQueue, not an executor.
* Timeouts are swept by the loop four times a second: a head not complete within
  `proxy.client_header_timeout` gets 408, an idle keep-alive connection is closed after
  `proxy.client_idle_timeout`; parse errors and limits answer 400/414/431/501/505 at once.
* TERM: the listeners close at once (a client can retry elsewhere), idle connections close,
  requests and tunnels in flight finish within `graceful_timeout`, exit 0. INT/QUIT: exit now.
"""

from __future__ import annotations

import contextlib
import gc
import os
import select
import socket
import threading
import time
from collections.abc import Callable
from queue import SimpleQueue
from types import FrameType
from typing import Any

from gunicorn.workers.base import Worker

from gol7lb.http1 import Http1Parser, RequestError
from gol7lb.serve import Conn, error_response, recv_some, serve_request
from gol7lb.spread import DEFER, Spread

SWEEP_EVERY = 0.25
ACCEPT_BATCH = 1  # connections accepted per wake-up, so no worker grabs a whole burst
RECV_HEAD = 65536
RESOURCE_PAUSE = 0.5  # seconds without accepting after the process ran out of descriptors
_ONESHOT = select.EPOLLIN | select.EPOLLONESHOT
# Not EPOLLEXCLUSIVE: with it the kernel wakes one waiter per new connection, and a worker that
# defers (spread.py) would leave the connection to a peer that is never woken for it.
_LISTEN = select.EPOLLIN


class Limits:
    """The client-side settings this worker enforces (proxy.* in the LB's settings)."""

    def __init__(self) -> None:
        self.header_timeout = 10.0
        self.idle_timeout = 60.0
        self.max_header_bytes = 16384
        self.max_headers = 100
        try:
            from gol7lb import hooks
            proxy = hooks.runtime().settings.proxy
        except RuntimeError:  # run outside GoL7-LB's gunicorn.conf.py: the defaults
            return
        self.header_timeout = proxy.client_header_timeout
        self.idle_timeout = proxy.client_idle_timeout
        self.max_header_bytes = proxy.max_header_bytes
        self.max_headers = proxy.max_headers


class ProxyWorker(Worker):
    """The gunicorn worker class (`worker_class = "gol7lb.worker.ProxyWorker"`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.conns: dict[int, Conn] = {}
        self.active: set[Conn] = set()  # connections a thread serves (requests, tunnels)
        self.queue: SimpleQueue[Conn | None] = SimpleQueue()
        self.epoll: Any = None
        self.limits = Limits()
        self.extra_threads = 0
        self.spread: Spread | None = None

    @classmethod
    def check_config(cls, cfg: Any, log: Any) -> None:
        if cfg.is_ssl:
            log.warning("gol7lb.worker.ProxyWorker does not terminate TLS; use "
                        "--worker-class gthread with --certfile")

    # threads ----------------------------------------------------------------------------------

    def _start_thread(self) -> None:
        threading.Thread(target=self._thread_main, name="gol7lb-serve", daemon=True).start()

    def _thread_main(self) -> None:
        app = self.wsgi
        detached = [False]

        def detach() -> None:
            """Called by the app when a request turns into a long-lived tunnel on this thread."""
            detached[0] = True
            self.extra_threads += 1
            self._start_thread()

        extra = {"gol7lb.detach": detach}
        while True:
            conn = self.queue.get()
            if conn is None:
                return
            if self._serve(app, conn, extra, detached) == "detached":
                return  # this thread became a tunnel; its replacement serves the queue

    def _serving(self) -> bool:
        return self.alive

    def _serve(self, app: Callable[..., Any], conn: Conn, extra: dict[str, Any],
               detached: list[bool]) -> str:
        """Serve this connection's requests while they come promptly; then give it back."""
        parser = conn.parser
        limits = self.limits
        try:
            while True:
                req = parser.ready.popleft()
                keep = serve_request(app, conn, req, limits.idle_timeout, self.alive, extra,
                                     self._serving)
                conn.fresh = False
                if detached[0]:
                    self._close(conn)
                    return "detached"
                if not keep or not self.alive:
                    self._close(conn)
                    return "closed"
                if parser.ready:
                    continue
                # The rest of a head already begun is read here. Otherwise the connection goes
                # straight back to the loop: waiting for the next request on this thread (2 ms)
                # measured no faster, and even a zero-timeout poll() for one already sent cost
                # a system call per request (epoll reports that one at once anyway).
                if parser.in_head:
                    try:
                        data = recv_some(conn.sock, 0)
                    except TimeoutError:
                        data = None
                    except OSError:
                        self._close(conn)
                        return "closed"
                    if data == b"":
                        self._close(conn)
                        return "closed"
                    if data:
                        try:
                            parser.feed(data)
                        except RequestError as e:
                            self._refuse(conn, e)
                            return "closed"
                        if parser.ready:
                            continue
                now = time.monotonic()
                conn.deadline = now + (limits.header_timeout if parser.in_head
                                       else limits.idle_timeout)
                self.active.discard(conn)  # before the loop may take it again
                self._wait(conn)
                return "waiting"
        except Exception:
            self.log.exception("error serving a connection")
            self._close(conn)
            return "closed"

    # the connection table ---------------------------------------------------------------------

    def _wait(self, conn: Conn) -> None:
        """Give the connection to the event loop until it has bytes to read."""
        conn.waiting = True
        try:
            self.epoll.modify(conn.fd, _ONESHOT)
        except OSError:
            self._close(conn)

    def _close(self, conn: Conn) -> None:
        conn.waiting = False
        conn.parser.release()  # it and its httptools parser refer to each other
        self.active.discard(conn)
        if self.conns.get(conn.fd) is conn:
            del self.conns[conn.fd]
        with contextlib.suppress(OSError):
            conn.sock.close()  # also leaves the epoll set

    def _refuse(self, conn: Conn, error: RequestError) -> None:
        with contextlib.suppress(OSError):
            conn.sock.send(error_response(error.status, error.reason))
        self._close(conn)

    # the event loop ---------------------------------------------------------------------------

    def run(self) -> None:
        # What the master built (settings, modules) lives as long as the worker: keep it out of
        # the cyclic collector's scans (and copy-on-write pages shared with the master).
        gc.freeze()
        self.epoll = epoll = select.epoll()
        listeners: dict[int, socket.socket] = {}
        for listener in self.sockets:
            sock = listener.sock if hasattr(listener, "sock") else listener
            sock.setblocking(False)
            listeners[sock.fileno()] = sock
            epoll.register(sock.fileno(), _LISTEN)
        wake = self.PIPE[0]
        epoll.register(wake, select.EPOLLIN)
        for _ in range(max(1, self.cfg.threads)):
            self._start_thread()

        conns = self.conns
        spread = self.spread = Spread(getattr(self, "slot", self.age))
        spread.publish(0)
        # Only a listener shared with the other workers lets a peer take what this one defers;
        # with reuse_port each worker has its own and the kernel already spreads connections.
        balance = not self.cfg.reuse_port
        paused_until = 0.0  # while this worker holds clearly more connections than a peer
        next_sweep = time.monotonic() + SWEEP_EVERY
        try:
            while self.alive:
                wait = SWEEP_EVERY if not paused_until else max(
                    0.0, min(SWEEP_EVERY, paused_until - time.monotonic()))
                for fd, _events in epoll.poll(wait):
                    conn = conns.get(fd)
                    if conn is not None:
                        self._readable(conn)
                    elif fd in listeners:
                        if paused_until:
                            continue  # never break: the batch's one-shot client events count
                        now = time.monotonic()
                        pause = 0.0
                        if balance and spread.should_defer(len(conns), now):
                            pause = DEFER  # a peer is woken too, and takes the connection
                        elif not self._accept(listeners[fd]):
                            pause = RESOURCE_PAUSE  # else level-triggered epoll would spin
                        if pause:
                            paused_until = now + pause
                            for listener_fd in listeners:
                                epoll.modify(listener_fd, 0)
                            continue
                        spread.publish(len(conns), now)
                    elif fd == wake:
                        self._drain_wake_pipe()
                now = time.monotonic()
                if paused_until and now >= paused_until:
                    paused_until = 0.0
                    for listener_fd in listeners:
                        epoll.modify(listener_fd, _LISTEN)
                if now >= next_sweep:
                    next_sweep = now + SWEEP_EVERY
                    self._sweep(now)
                    spread.publish(len(conns), now)
                    self.notify()
                    if self.ppid != os.getppid():
                        self.log.info("Parent changed, shutting down: %s", self)
                        return
        finally:
            spread.leave()
            for fd, sock in listeners.items():
                with contextlib.suppress(OSError):
                    epoll.unregister(fd)
                sock.close()  # new connections are refused at once, not queued
        self._drain(epoll)

    def _drain_wake_pipe(self) -> None:
        try:
            while os.read(self.PIPE[0], 4096):
                pass
        except OSError:
            pass

    def _accept(self, listener: socket.socket) -> bool:
        """Accept what is waiting; False when accepting must pause (out of descriptors)."""
        now = time.monotonic()
        limits = self.limits
        for _ in range(ACCEPT_BATCH):
            try:
                sock, addr = listener.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return True
            except OSError as e:  # EMFILE and friends: keep serving who is there, retry later
                self.log.error("accept failed: %s; not accepting for %gs", e, RESOURCE_PAUSE)
                return False
            sock.setblocking(False)
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                here = sock.getsockname()
            except OSError:
                sock.close()
                continue
            peer = (str(addr[0]), str(addr[1])) if isinstance(addr, tuple) else ("", "")
            server = (str(here[0]), str(here[1])) if isinstance(here, tuple) else ("", "")
            conn = Conn(sock, peer, server,
                        Http1Parser(limits.max_header_bytes, limits.max_headers),
                        now + limits.header_timeout)
            self.conns[conn.fd] = conn
            conn.waiting = True
            self.epoll.register(conn.fd, _ONESHOT)
        return True

    def _readable(self, conn: Conn) -> None:
        """A waiting connection has bytes (or EOF): parse them; a complete head goes to a thread."""
        conn.waiting = False
        parser = conn.parser
        was_in_head = parser.in_head
        try:
            data = conn.sock.recv(RECV_HEAD)
        except BlockingIOError:
            self._wait(conn)
            return
        except OSError:
            self._close(conn)
            return
        if not data:
            self._close(conn)
            return
        try:
            parser.feed(data)
        except RequestError as e:
            self._refuse(conn, e)
            return
        if parser.ready:
            self.active.add(conn)
            self.queue.put(conn)
            return
        if parser.in_head and not was_in_head and not conn.fresh:
            # the first byte of the next request: from now on the head timeout applies, counted
            # from the end of the previous response (deadline - idle timeout)
            started = conn.deadline - self.limits.idle_timeout
            conn.deadline = started + self.limits.header_timeout
        self._wait(conn)

    def _sweep(self, now: float) -> None:
        """Close what has waited too long: 408 for a late head, silence for an idle client."""
        for conn in list(self.conns.values()):
            if conn.waiting and conn.deadline <= now:
                if conn.parser.in_head or conn.fresh:
                    with contextlib.suppress(OSError):
                        conn.sock.send(error_response(408, "request head not received in time"))
                self._close(conn)

    def _drain(self, epoll: Any) -> None:
        """Graceful stop: idle keep-alive connections close now; a connection accepted before
        the stop that has not sent its (whole) first head yet is still served once it does
        (within its head deadline), so nothing the listener handed us is reset; requests and
        tunnels in flight finish; all within `graceful_timeout`."""
        deadline = time.monotonic() + self.cfg.graceful_timeout
        while True:
            for conn in list(self.conns.values()):
                if conn.waiting and not conn.fresh and not conn.parser.in_head:
                    self._close(conn)  # idle between requests: nothing was promised
            pending = any(conn.waiting for conn in self.conns.values())
            now = time.monotonic()
            if (not self.active and not pending) or now >= deadline:
                break
            for fd, _events in epoll.poll(0.05):
                conn = self.conns.get(fd)
                if conn is not None:
                    self._readable(conn)  # a head that completes goes to a thread
            self._sweep(time.monotonic())  # a head that never comes gets its 408
            self.notify()
        if self.active:
            self.log.warning("graceful timeout: cutting %d connections", len(self.active))
        epoll.close()

    # signals ----------------------------------------------------------------------------------

    def handle_quit(self, sig: int, frame: FrameType | None) -> None:
        """INT/QUIT mean now: do not wait for threads stuck on slow backends."""
        self.alive = False
        self.cfg.worker_int(self)
        self.log.info("Worker exiting at once (pid: %s)", self.pid)
        os._exit(0)
