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
* A request body is read by the loop too, into the parser, until it is complete or more
  than `proxy.retry_buffer` bytes are in (an `Expect: 100-continue` or upgrade request goes
  on at its head): a small body reaches the proxy whole and a trickling one holds no thread.
* Once a head (and that much body) is in, the connection goes to a pool thread (`threads` of
  them), which runs the WSGI app (serve.py) and serves the requests already read on the connection
  (pipelining); then the connection goes back to the loop (EPOLLONESHOT re-arm: the kernel
  hands it over, no wake-up pipe). Idle threads wait on a SimpleQueue, not an executor.
* A thread that becomes long-lived leaves the pool and starts its replacement first: a
  WebSocket tunnel (`gol7lb.detach`), or a wait for more of a large body from a slow client
  (lent; at most `worker_connections` threads at once). It ends with its request.
* At `worker_connections` connections the worker stops accepting until one closes.
* Timeouts are swept by the loop four times a second: a head not complete within
  `proxy.client_header_timeout` gets 408, an idle keep-alive connection is closed after
  `proxy.client_idle_timeout`, a body that stalls past `proxy.client_body_timeout` gets 408;
  parse errors and limits answer 400/414/431/501/505 at once. These limits are those of the
  configuration published when the worker starts (a SIGHUP's new workers take reloaded ones).
* TERM (and SIGHUP's retiring workers): the listeners close at once (a client can retry
  elsewhere); a request that arrives on a kept-alive connection is still answered, with
  `Connection: close`; a connection is closed only once it stayed idle DRAIN_IDLE_GRACE with
  nothing to read; requests and tunnels in flight finish; all within `graceful_timeout`,
  exit 0. INT/QUIT: exit now.
"""

from __future__ import annotations

import contextlib
import gc
import ipaddress
import logging
import os
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from queue import SimpleQueue
from types import FrameType
from typing import TYPE_CHECKING, Any

from gunicorn.workers.base import Worker

from gol7lb import http2, proxyproto
from gol7lb.config import Http2Settings, ProxySettings, Settings, parse_networks
from gol7lb.http1 import Http1Parser, Request, RequestError
from gol7lb.serve import (
    WOULD_BLOCK,
    Conn,
    error_response,
    recv_some,
    serve_request,
    wait_readable,
)
from gol7lb.spread import DEFER, Spread

if TYPE_CHECKING:  # the master imports this module; the proxy is built in each worker
    from gol7lb.proxy import ProxyApp
    from gol7lb.tls import TLSServer

# GoL7-LB's own lines; gunicorn's events (a worker booting, exiting) stay on `self.log`.
log = logging.getLogger("gol7lb.worker")
SWEEP_EVERY = 0.25
ACCEPT_BATCH = 1  # connections accepted per wake-up, so no worker grabs a whole burst
RECV_HEAD = 65536
RESOURCE_PAUSE = 0.5  # seconds without accepting after the process ran out of descriptors
# A stopping worker closes a kept-alive connection only once it has been idle this long: a
# busy client's next request, sent as its previous answer arrived, is answered (with close).
DRAIN_IDLE_GRACE = 1.0
_ONESHOT = select.EPOLLIN | select.EPOLLONESHOT
_ONESHOT_OUT = select.EPOLLOUT | select.EPOLLONESHOT  # a TLS handshake that must write
# What a listener's connections are: HTTP, HTTPS (a handshake first), or tls.redirect_port's.
PLAIN, HTTPS, REDIRECT = "plain", "https", "redirect"
# Not EPOLLEXCLUSIVE: with it the kernel wakes one waiter per new connection, and a worker that
# defers (spread.py) would leave the connection to a peer that is never woken for it.
_LISTEN = select.EPOLLIN
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
PRELUDE_PEEK = 536  # a v1 header (107) or a v2 one with common TLVs; a longer one takes turns


def _from(address: str, networks: Sequence[IPNetwork]) -> bool:
    """Whether a peer is one of the load balancers allowed to send a PROXY header."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # a dual-stack listener's view of an IPv4 peer
    return any(ip in network for network in networks)


class Limits:
    """The client-side settings this worker enforces (proxy.* in the LB's settings)."""

    def __init__(self, proxy: ProxySettings | None = None) -> None:
        proxy = proxy or ProxySettings()
        self.header_timeout = proxy.client_header_timeout
        self.idle_timeout = proxy.client_idle_timeout
        self.body_timeout = proxy.client_body_timeout
        self.body_buffer = proxy.retry_buffer  # the body the loop reads before a thread
        self.max_header_bytes = proxy.max_header_bytes
        self.max_headers = proxy.max_headers
        self.handshake_timeout = 10.0  # tls.handshake_timeout, when PORT serves HTTPS
        self.sts = b""  # tls.hsts as a header line
        # proxy.proxy_protocol: the peers that may connect (and must send a PROXY header)
        self.proxy_from = parse_networks(proxy.proxy_protocol_from) \
            if proxy.proxy_protocol else None


class EdgeTLS:
    """What a worker needs for HTTPS: the master's TLSServer (its session context built
    before the fork, so tickets resume on every worker), the redirect listener's app, and
    the handshake counters."""

    def __init__(self, server: TLSServer, settings: Settings, https_port: int,
                 view_settings: Callable[[], Settings]) -> None:
        from gol7lb import metrics, tls
        from gol7lb.redirect import RedirectApp

        self.server = server
        self.redirect_port = settings.tls.redirect_port
        # New certificates come from the files (refresh) and from the running configuration
        # the pool threads last read (never a Manager call on the loop).
        server.sources = lambda: tls.all_sources(view_settings())
        self.redirect_app = RedirectApp(https_port, lambda: tls.acme_storage(view_settings()))
        self.reading = threading.Lock()  # a thread reading the shared state for new pairs
        self.counted = {result: metrics.TLS_HANDSHAKES.labels(result)
                        for result in ("ok", "failed", "timeout")}

    def count(self, result: str) -> None:
        with contextlib.suppress(OSError):  # out of descriptors for the metrics file
            self.counted[result].inc()


def proxy_app() -> ProxyApp | None:
    """This worker's proxy (post_worker_init built it from the configuration published now,
    which a worker a SIGHUP started must take: the master's is the one it started with);
    None outside GoL7-LB's gunicorn.conf.py."""
    from gol7lb import hooks, wsgi
    try:
        hooks.runtime()
    except RuntimeError:
        return None
    return wsgi.build_app()


class Seat:
    """A pool thread's place in the pool. A thread about to be busy for long (a tunnel, a
    wait for a slow client's body) leaves it and starts its replacement first, so the pool
    never runs short; it ends once its request does."""

    __slots__ = ("worker", "left", "lent")

    def __init__(self, worker: ProxyWorker) -> None:
        self.worker = worker
        self.left = False
        self.lent = False  # counted in worker.lent until the request ends

    def detach(self) -> None:
        """The request became a tunnel on this thread (`gol7lb.detach` in the environ)."""
        if not self.left:
            self.left = True
            self.worker._start_thread()

    def lend(self) -> None:
        """The thread must wait for a client's body; at most worker_connections at once."""
        if not self.left and self.worker._borrow():
            self.left = self.lent = True
            self.worker._start_thread()

    def request_ended(self) -> None:
        if self.lent:
            self.lent = False
            self.worker._return()


class ProxyWorker(Worker):
    """The gunicorn worker class (`worker_class = "gol7lb.worker.ProxyWorker"`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.conns: dict[int, Conn] = {}
        self.active: set[Conn] = set()  # connections a thread serves (requests, tunnels)
        self.queue: SimpleQueue[Conn | http2.Stream | None] = SimpleQueue()
        self.epoll: Any = None
        self.limits = Limits()  # run() reads the current ones
        self.lent = 0  # threads out of the pool waiting on a client's body
        self.lent_lock = threading.Lock()
        self.capped = False  # at worker_connections: not accepting
        self.proxy_app: ProxyApp | None = None
        self.spread: Spread | None = None
        self.accept_failures = 0  # accepts failed in a row (out of descriptors): logged once
        self.edge_tls: EdgeTLS | None = None
        self.http2: Http2Settings | None = None  # http2.enabled: h2 by ALPN, h2c by preface

    @classmethod
    def check_config(cls, cfg: Any, log: Any) -> None:
        if cfg.is_ssl:
            log.warning("gol7lb.worker.ProxyWorker ignores --certfile: set tls.cert and "
                        "tls.key (GOL7LB_TLS_CERT, GOL7LB_TLS_KEY) for HTTPS")

    # threads ----------------------------------------------------------------------------------

    def _start_thread(self) -> None:
        threading.Thread(target=self._thread_main, name="gol7lb-serve", daemon=True).start()

    def _thread_main(self) -> None:
        app = self.wsgi
        seat = Seat(self)
        extra = {"gol7lb.detach": seat.detach}
        while True:
            conn = self.queue.get()
            if conn is None:
                return
            if isinstance(conn, http2.Stream):  # one HTTP/2 stream's request
                conn.serve(app, extra, seat)
            else:
                self._serve(app, conn, extra, seat)
            if seat.left:
                return  # a tunnel or a slow body had this thread; its replacement serves on

    def _borrow(self) -> bool:
        with self.lent_lock:
            if self.lent >= self.cfg.worker_connections:
                return False
            self._lend(1)
            return True

    def _return(self) -> None:
        with self.lent_lock:
            self._lend(-1)

    def _lend(self, change: int) -> None:
        """Count lent threads. The proxy lets one backend hold at most its share of this
        worker's threads (ProxyApp.threads); a lent thread is one beyond the pool, so it
        counts there too: slow bodies on their way to a backend leave its share to others."""
        self.lent += change
        if self.proxy_app is not None:
            self.proxy_app.threads = max(1, self.cfg.threads) + self.lent

    def _serving(self) -> bool:
        return self.alive

    def _serve(self, app: Callable[..., Any], conn: Conn, extra: dict[str, Any],
               seat: Seat) -> None:
        """Serve this connection's requests while they come promptly; then give it back."""
        parser = conn.parser
        if conn.redirect and self.edge_tls is not None:
            app = self.edge_tls.redirect_app
        limits = self.limits
        try:
            while True:
                req = parser.ready.popleft()
                try:
                    keep = serve_request(app, conn, req, limits.idle_timeout, self.alive, extra,
                                         self._serving, limits.body_timeout, seat.lend)
                finally:
                    seat.request_ended()
                conn.fresh = False
                # A kept-alive connection stays open even if the worker began to stop: the
                # drain answers a request already on its way (with close) and closes it idle.
                if not keep:
                    self._close(conn)
                    return
                if not self._next_ready(conn):
                    return
                if seat.left:
                    self.queue.put(conn)  # a pool thread serves the next one
                    return
        except Exception:
            log.exception("error serving a connection")
            seat.request_ended()
            self._close(conn)

    def _dispatchable(self, req: Request) -> bool:
        """Whether a thread may take this request now: its body is in, or more of it than
        the loop buffers, or the client waits for an answer before sending it."""
        return req.complete or req.upgrade or req.expect_continue or \
            req.received > self.limits.body_buffer

    def _next_ready(self, conn: Conn) -> bool:
        """True when the connection has its next request ready for this thread; otherwise
        it went back to the loop (or was closed)."""
        parser = conn.parser
        # The rest of a head already begun is read here. Otherwise the connection goes
        # straight back to the loop: waiting for the next request on this thread (2 ms)
        # measured no faster, and even a zero-timeout poll() for one already sent cost
        # a system call per request (epoll reports that one at once anyway).
        if not parser.ready and parser.in_head:
            try:
                data = recv_some(conn.sock, 0)
            except TimeoutError:
                data = None
            except OSError:
                data = b""
            if data == b"":
                self._close(conn)
                return False
            if data:
                try:
                    parser.feed(data)
                except RequestError as e:
                    self._refuse(conn, e)
                    return False
        if parser.ready and self._dispatchable(parser.ready[0]):
            return True
        limits = self.limits
        conn.deadline = time.monotonic() + (
            limits.body_timeout if parser.ready else
            limits.header_timeout if parser.in_head else limits.idle_timeout)
        conn.waiting = True  # before it leaves `active`: a drain never sees it in neither
        self.active.discard(conn)  # before the loop may take it again
        self._wait(conn)
        return False

    # the connection table ---------------------------------------------------------------------

    def _wait(self, conn: Conn, events: int = _ONESHOT) -> None:
        """Give the connection to the event loop until it has bytes to read (or, for a TLS
        handshake that must write, room to write)."""
        conn.waiting = True
        try:
            self.epoll.modify(conn.fd, events)
        except (OSError, ValueError):  # ValueError: the worker is gone, its epoll closed
            self._close(conn)

    def _close(self, conn: Conn) -> None:
        conn.waiting = False
        conn.parser.release()  # it and its httptools parser refer to each other
        self.active.discard(conn)
        if self.conns.get(conn.fd) is conn:
            del self.conns[conn.fd]
        if conn.tls:  # close_notify first: a client reading to the end sees a clean end
            _send_close_notify(conn.sock)
        with contextlib.suppress(OSError):
            conn.sock.close()  # also leaves the epoll set
        if self.capped:  # the loop may accept again
            with contextlib.suppress(OSError):
                os.write(self.PIPE[1], b".")

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
        app = self.proxy_app = proxy_app()
        settings = app.view.current().settings if app else None
        self.limits = Limits(settings.proxy if settings else None)
        self.http2 = settings.http2 if settings and settings.http2.enabled else None
        self.edge_tls = edge = self._edge_tls(settings)
        listeners: dict[int, socket.socket] = {}
        kinds: dict[int, str] = {}
        for listener in self.sockets:
            sock = listener.sock if hasattr(listener, "sock") else listener
            sock.setblocking(False)
            listeners[sock.fileno()] = sock
            kinds[sock.fileno()] = PLAIN if edge is None else REDIRECT if \
                _port_of(sock) == edge.redirect_port else HTTPS
            epoll.register(sock.fileno(), _LISTEN)
        wake = self.PIPE[0]
        epoll.register(wake, select.EPOLLIN)
        for _ in range(max(1, self.cfg.threads)):
            self._start_thread()

        conns = self.conns
        cap = max(1, self.cfg.worker_connections)
        slot = getattr(self, "slot", None)
        spread = self.spread = Spread(self.age if slot is None else slot)
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
                        if paused_until or self.capped:
                            continue  # never break: the batch's one-shot client events count
                        now = time.monotonic()
                        pause = 0.0
                        if balance and spread.should_defer(len(conns), now):
                            pause = DEFER  # a peer is woken too, and takes the connection
                        elif not self._accept(listeners[fd], kinds[fd]):
                            pause = RESOURCE_PAUSE  # else level-triggered epoll would spin
                        if pause:
                            paused_until = now + pause
                            self._listen(listeners, False)
                            continue
                        spread.publish(len(conns), now)
                        if len(conns) >= cap:  # gunicorn's worker_connections, as gthread
                            self.capped = True
                            self._listen(listeners, False)
                    elif fd == wake:
                        self._drain_wake_pipe()
                now = time.monotonic()
                if paused_until and now >= paused_until:
                    paused_until = 0.0
                    if not self.capped:
                        self._listen(listeners, True)
                if self.capped and len(conns) < cap:
                    self.capped = False
                    if not paused_until:
                        self._listen(listeners, True)
                if now >= next_sweep:
                    next_sweep = now + SWEEP_EVERY
                    self._sweep(now)
                    if edge is not None:
                        self._refresh_certificates(edge)
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

    def _edge_tls(self, settings: Settings | None) -> EdgeTLS | None:
        """HTTPS on PORT when the master built a TLSServer (tls.cert and tls.key set)."""
        from gol7lb import hooks

        boot = hooks.boot()
        if settings is None or boot is None or boot.tls is None:
            return None
        limits = self.limits
        limits.handshake_timeout = settings.tls.handshake_timeout
        if settings.tls.hsts:
            limits.sts = b"Strict-Transport-Security: max-age=%d\r\n" % settings.tls.hsts
        view = self.proxy_app.view if self.proxy_app is not None else None
        edge = EdgeTLS(boot.tls, settings, boot.port,
                       lambda: view.peek().settings if view is not None else settings)
        from gol7lb.tls import alpn_protocols
        boot.tls.use_alpn(alpn_protocols(self.http2 is not None))
        self._refresh_certificates(edge)  # the files may have changed since the master read them
        return edge

    def _refresh_certificates(self, edge: EdgeTLS) -> None:
        """A stat of each certificate file; a changed pair is loaded for the next handshakes.
        What does not load is logged and kept out by the certificate watcher (certwatch.py);
        here it only stays unused. A reload that names other files reaches the view through
        requests; without any, a short thread reads it (never the loop: that is IPC)."""
        view = self.proxy_app.view if self.proxy_app is not None else None
        if view is not None and view.stale() and not edge.reading.locked():
            threading.Thread(target=self._read_state, args=(edge,), daemon=True).start()
        try:
            for error in edge.server.refresh():
                log.debug("certificate not loaded, the previous one stays: %s", error)
        except Exception:
            log.exception("error reloading certificates")

    def _read_state(self, edge: EdgeTLS) -> None:
        with edge.reading:
            if self.proxy_app is not None:
                with contextlib.suppress(Exception):
                    self.proxy_app.view.current()

    def _listen(self, listeners: dict[int, socket.socket], on: bool) -> None:
        for fd in listeners:
            self.epoll.modify(fd, _LISTEN if on else 0)

    def _drain_wake_pipe(self) -> None:
        try:
            while os.read(self.PIPE[0], 4096):
                pass
        except OSError:
            pass

    def _accept(self, listener: socket.socket, kind: str = PLAIN) -> bool:
        """Accept what is waiting; False when accepting must pause (out of descriptors)."""
        now = time.monotonic()
        limits = self.limits
        for _ in range(ACCEPT_BATCH):
            try:
                sock, addr = listener.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return True
            except OSError as e:  # EMFILE and friends: keep serving who is there, retry later
                if not self.accept_failures:  # once per episode, not every pause
                    log.error("accept failed: %s; pausing accepts (%gs at a time) until "
                              "it works again", e, RESOURCE_PAUSE)
                self.accept_failures += 1
                return False
            if self.accept_failures:
                log.info("accepting again after %d failed attempts", self.accept_failures)
                self.accept_failures = 0
            sock.setblocking(False)
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                here = sock.getsockname()
            except OSError:
                sock.close()
                continue
            peer = (str(addr[0]), str(addr[1])) if isinstance(addr, tuple) else ("", "")
            server = (str(here[0]), str(here[1])) if isinstance(here, tuple) else ("", "")
            if limits.proxy_from is not None and not _from(peer[0], limits.proxy_from):
                log.debug("closed a connection from %s: not in proxy.proxy_protocol_from",
                          peer[0])
                sock.close()
                continue
            conn = Conn(sock, peer, server,
                        Http1Parser(limits.max_header_bytes, limits.max_headers),
                        now + limits.header_timeout)
            if limits.proxy_from is not None:
                conn.prelude = b""  # the PROXY header stage comes first (_read_prelude)
            if kind == HTTPS:  # the handshake comes next, on this loop (_handshake)
                conn.handshaking = True
                if conn.prelude is None:  # else its deadline starts once the header is in
                    conn.deadline = now + limits.handshake_timeout
            elif kind == REDIRECT:
                conn.redirect = True
            self.conns[conn.fd] = conn
            conn.waiting = True
            self.epoll.register(conn.fd, _ONESHOT)
        return True

    def _handshake(self, conn: Conn) -> None:
        """The TLS stage of a connection's life, between its accept (and any stage before)
        and its first request: drive the non-blocking handshake as far as the bytes in
        allow, then wait on the loop for more (or for room to write). Never a thread; a
        handshake not done by tls.handshake_timeout is closed by the sweep."""
        edge = self.edge_tls
        assert edge is not None
        conn.waiting = False
        sock = conn.sock
        try:
            if not isinstance(sock, ssl.SSLSocket):
                sock = conn.sock = edge.server.wrap(sock)  # same descriptor, same epoll entry
            sock.do_handshake()
        except ssl.SSLWantReadError:
            self._wait(conn)
            return
        except ssl.SSLWantWriteError:
            self._wait(conn, _ONESHOT_OUT)
            return
        except (OSError, ValueError) as e:  # SSLError (a bad hello, a refused certificate), EOF
            log.debug("TLS handshake with %s failed: %s", conn.peer[0], e)
            edge.count("failed")
            if getattr(e, "reason", None) == "HTTP_REQUEST":  # OpenSSL saw plain HTTP
                _answer_plain(sock, error_response(
                    400, "plain HTTP request sent to the HTTPS port; use https://"))
            self._close(conn)
            return
        edge.count("ok")
        conn.handshaking = False
        conn.tls = True
        conn.sts = self.limits.sts
        conn.deadline = time.monotonic() + self.limits.header_timeout
        if self.http2 is not None and http2.tls_wants_h2(sock):
            self._start_http2(conn, b"")
            return
        self._readable(conn)  # the request may have come with the handshake's last flight

    def _readable(self, conn: Conn) -> None:
        """A waiting connection has bytes (or EOF): parse them; a complete head goes to a thread."""
        if conn.session is not None:  # HTTP/2: the session reads and writes
            try:
                conn.session.on_ready()
            except Exception:  # one connection's trouble never ends the worker
                log.exception("error on an HTTP/2 connection")
                self._close(conn)
            return
        if conn.prelude is not None:  # the PROXY header, before anything else on the wire
            conn.waiting = False
            self._read_prelude(conn)
            return
        if conn.handshaking:  # then the TLS handshake (PORT serving HTTPS)
            self._handshake(conn)
            return
        conn.waiting = False
        parser = conn.parser
        was_in_head = parser.in_head
        try:
            data = conn.sock.recv(RECV_HEAD)
            if conn.tls:  # a TLS read returns one record: take what it already decrypted
                sock: Any = conn.sock
                while sock.pending():
                    data += sock.recv(RECV_HEAD)
        except ssl.SSLWantWriteError:
            self._wait(conn, _ONESHOT_OUT)
            return
        except WOULD_BLOCK:
            self._wait(conn)
            return
        except OSError:
            self._close(conn)
            return
        if not data:
            if parser.ready:  # the client half-closed in the middle of a body it buffers
                self._refuse(conn, RequestError(400, "incomplete request body"))
                return
            self._close(conn)
            return
        if conn.fresh and self.http2 is not None and not parser.in_head and \
                not conn.redirect and not conn.tls and http2.is_preface(data):
            self._start_http2(conn, data)  # h2c by prior knowledge
            return
        try:
            parser.feed(data)
        except RequestError as e:
            self._refuse(conn, e)
            return
        if parser.ready:
            if self._dispatchable(parser.ready[0]):
                self.active.add(conn)
                self.queue.put(conn)
                return
            conn.deadline = time.monotonic() + self.limits.body_timeout  # since this read
            self._wait(conn)
            return
        if parser.in_head and not was_in_head and not conn.fresh:
            # the first byte of the next request: from now on the head timeout applies, counted
            # from the end of the previous response (deadline - idle timeout)
            started = conn.deadline - self.limits.idle_timeout
            conn.deadline = started + self.limits.header_timeout
        self._wait(conn)

    def _read_prelude(self, conn: Conn) -> None:
        """The PROXY protocol stage (proxy.proxy_protocol), first in a connection's life: peek
        at what came, parse it (proxyproto.py), and read exactly the header's bytes, so what
        follows (a TLS handshake, a request) stays in the socket for the next stage, which
        the next readable event starts. A malformed header closes the connection; a slow one
        is closed by the sweep at the connection's head deadline (client_header_timeout)."""
        sock = conn.sock
        try:
            seen = sock.recv(PRELUDE_PEEK, socket.MSG_PEEK)
        except BlockingIOError:
            self._wait(conn)
            return
        except OSError:
            self._close(conn)
            return
        before = conn.prelude or b""
        try:
            header = proxyproto.parse(before + seen) if seen else None
        except proxyproto.ProxyHeaderError as e:
            log.debug("closed a connection from %s: %s", conn.peer[0], e)
            header = None
            seen = b""
        if not seen:  # EOF, or a malformed header
            self._close(conn)
            return
        take = len(seen) if header is None else header.length - len(before)
        try:
            sock.recv(take)  # what was peeked: all header bytes, never beyond
        except OSError:
            self._close(conn)
            return
        if header is None:
            conn.prelude = before + seen  # every byte so far belongs to the header
        else:
            conn.prelude = None
            if header.source is not None and header.destination is not None:
                conn.peer = (header.source[0], str(header.source[1]))
                conn.server = (header.destination[0], str(header.destination[1]))
            if conn.handshaking:  # the TLS handshake's own deadline starts now
                conn.deadline = time.monotonic() + self.limits.handshake_timeout
        self._wait(conn)

    def _start_http2(self, conn: Conn, data: bytes) -> None:
        """The connection speaks HTTP/2 from here on (ALPN h2, or the h2c preface in `data`)."""
        assert self.http2 is not None
        try:
            http2.Session(conn, self.http2, self.limits, self.epoll, self.queue.put,
                          self._close).start(data)
        except Exception:  # one connection's trouble never ends the worker
            log.exception("error starting an HTTP/2 connection")
            self._close(conn)

    def _sweep(self, now: float) -> None:
        """Close what has waited too long: 408 for a late head or body, silence for an idle
        client."""
        for conn in list(self.conns.values()):
            if conn.session is not None:
                conn.session.sweep(now)
            elif conn.waiting and conn.deadline <= now:
                if conn.prelude is not None:  # a PROXY header not in yet: silence
                    pass
                elif conn.handshaking:  # silence: there is no HTTP to answer in yet
                    if self.edge_tls is not None:
                        self.edge_tls.count("timeout")
                elif conn.parser.ready:
                    with contextlib.suppress(OSError):
                        conn.sock.send(error_response(408, "request body not received in time"))
                elif conn.parser.in_head or conn.fresh:
                    with contextlib.suppress(OSError):
                        conn.sock.send(error_response(408, "request head not received in time"))
                self._close(conn)

    def _drain(self, epoll: Any) -> None:
        """Graceful stop: a kept-alive connection closes once it stayed idle DRAIN_IDLE_GRACE
        with nothing to read (a request that was on its way is answered, with close); a
        connection accepted before the stop that has not sent its (whole) first head yet is
        still served once it does (within its head deadline), so nothing the listener handed
        us is reset; requests and tunnels in flight finish; all within `graceful_timeout`.
        The table is copied before each look: pool threads delete from it meanwhile."""
        deadline = time.monotonic() + self.cfg.graceful_timeout
        while True:
            now = time.monotonic()
            pending = False
            for conn in list(self.conns.values()):
                if conn.session is not None:
                    pending = conn.session.drain() or pending
                    continue
                if not conn.waiting:
                    continue
                if self._idle_since(conn) <= now - DRAIN_IDLE_GRACE and \
                        not wait_readable(conn.sock, 0):
                    self._close(conn)  # idle between requests, and nothing on its way
                else:
                    pending = True
            if (not self.active and not pending) or now >= deadline:
                break
            for fd, _events in epoll.poll(0.05):
                ready = self.conns.get(fd)
                if ready is not None:
                    self._readable(ready)  # a head that completes goes to a thread
            self._sweep(time.monotonic())  # a head that never comes gets its 408
            self.notify()
        if self.active:
            log.warning("graceful timeout: cutting %d connections", len(self.active))
        epoll.close()

    def _idle_since(self, conn: Conn) -> float:
        """When the connection's last answer ended, if it is idle between requests; else
        infinity (a head or body is coming, or the first request never came)."""
        parser = conn.parser
        if conn.fresh or parser.in_head or parser.ready:
            return float("inf")
        return conn.deadline - self.limits.idle_timeout

    # signals ----------------------------------------------------------------------------------

    def handle_quit(self, sig: int, frame: FrameType | None) -> None:
        """INT/QUIT mean now: do not wait for threads stuck on slow backends."""
        self.alive = False
        self.cfg.worker_int(self)
        self.log.info("Worker exiting at once (pid: %s)", self.pid)
        os._exit(0)


def _port_of(sock: socket.socket) -> int:
    try:
        address = sock.getsockname()
    except OSError:
        return 0
    return int(address[1]) if isinstance(address, tuple) else 0


def _send_close_notify(sock: Any) -> None:
    """Send TLS close_notify without waiting for the peer's: the first step of SSL_shutdown
    on a non-blocking socket (it wants to read the peer's next, which nobody waits for)."""
    with contextlib.suppress(OSError, ValueError):  # SSLWantReadError, a reset, closed
        sock.unwrap()


def _answer_plain(sock: socket.socket, answer: bytes) -> None:
    """As nginx: a plain HTTP request on the HTTPS port gets a plain answer saying so. The
    bytes go on a duplicate of the descriptor (the SSL layer is broken by then), and what
    the client sent is read away first, so the close is a FIN that keeps the answer, not a
    reset that could drop it."""
    with contextlib.suppress(OSError), \
            socket.socket(fileno=os.dup(sock.fileno())) as raw:
        raw.setblocking(False)
        with contextlib.suppress(OSError):
            while raw.recv(65536):
                pass
        raw.send(answer)
        raw.shutdown(socket.SHUT_WR)
