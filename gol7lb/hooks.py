"""gunicorn server hooks: the master builds the shared state and helper processes before it
forks workers (on_starting), gives each worker a slot (pre_fork) and the shared state
(post_fork, post_worker_init), reloads on SIGHUP (on_reload), cleans up after a worker
(child_exit), and tears everything down after its workers have drained (on_exit).
gunicorn.conf.py wires these in.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import multiprocessing.process
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from gol7lb import (
    acme,
    admin,
    certwatch,
    discovery,
    logfmt,
    metrics,
    ratelimit,
    reload,
    rundir,
    supervisor,
)
from gol7lb.children import ChildWatcher, DemoBackends, ManagedChild, StartupError
from gol7lb.config import DEMO_PORTS, ConfigError, Settings
from gol7lb.control import Snapshot
from gol7lb.counters import SharedCounters
from gol7lb.health import HealthRecord
from gol7lb.hosts import HostTable
from gol7lb.manager import ControlClient, run_manager
from gol7lb.tls import TLSServer
from gol7lb.view import GenerationFollower

log = logging.getLogger("gol7lb.hooks")
MANAGER_START_SECONDS = 30.0


@dataclass(frozen=True)
class Boot:
    """What gunicorn.conf.py computed at start; a reload (SIGHUP) keeps it."""

    settings: Settings
    port: int
    workers: int
    # HTTPS on PORT: built here, before any fork, so every worker shares its session-ticket
    # keys (tls.py); None when tls.cert is unset.
    tls: TLSServer | None = None


@dataclass
class Runtime:
    """What the master sets up once and every worker inherits through fork."""

    settings: Settings  # the configuration the master started with
    workers: int
    counters: SharedCounters = field(default_factory=SharedCounters)
    hosts: HostTable = field(default_factory=lambda: HostTable(worker_slots=16))
    address: str = ""  # the Manager's Unix socket
    authkey: bytes = b""
    admin_sock: socket.socket | None = None
    watcher: ChildWatcher | None = None
    demo: DemoBackends | None = None
    worker_slot: int | None = None  # in a worker: its slot in the host table and CPU choice
    threads: int = 32  # in a worker: gunicorn's threads setting (the per-backend share)

    def startup_snapshot(self) -> Snapshot:
        """The start-up configuration with every backend up: only for a worker that cannot
        reach the Manager at all."""
        health = self.settings.health
        ids = {b.id for pool in self.settings.pools.values() for b in pool.backends}
        return Snapshot(generation=0, config_generation=0, loaded_at=0.0, last_error=None,
                        settings=self.settings, pools=self.settings.pools,
                        sources=dict.fromkeys(ids, "config"), slots={},
                        health={i: HealthRecord.initial(True, health.rise, health.fall)
                                for i in ids})


_boot: Boot | None = None
_runtime: Runtime | None = None
_client: ControlClient | None = None  # the master's own connection to the control state


def configure(settings: Settings, port: int, workers: int,
              tls_server: TLSServer | None = None) -> None:
    """Called by gunicorn.conf.py with the validated settings, once, at start."""
    global _boot
    _boot = Boot(settings, port, workers, tls_server)


def boot() -> Boot | None:
    """Set once the master has read its configuration: gunicorn.conf.py runs again on SIGHUP,
    and must then neither validate (the reload does) nor exit (that kills the master)."""
    return _boot


def check_listen_port(port: int) -> None:
    """Refuse to start on a port another process already serves.

    With SO_REUSEPORT a second instance would bind silently and take half the traffic; a
    plain bind attempt before gunicorn binds makes it one clear line instead.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("0.0.0.0", port))
        except OSError as e:
            raise ConfigError(f"PORT {port} is already in use ({e.strerror or e}): another "
                              "GoL7-LB instance or another server listens there; stop it or "
                              "set another PORT") from None


def runtime() -> Runtime:
    if _runtime is None:
        raise RuntimeError("GoL7-LB is not running under its gunicorn configuration: "
                           "start it with `gunicorn -c gunicorn.conf.py gol7lb.wsgi`")
    return _runtime


def on_starting(server: Any) -> None:
    global _runtime
    if _boot is None:
        raise RuntimeError("gol7lb.hooks.configure() was not called by the gunicorn config")
    settings = _boot.settings
    check_worker_class(server, settings)
    worker_class = getattr(server.cfg, "worker_class", None)
    if settings.proxy.proxy_protocol and getattr(worker_class, "__name__", "") != "ProxyWorker":
        sys.stderr.write("gol7lb: invalid setting proxy.proxy_protocol = true: only gol7lb's own "
                         "worker (gol7lb.worker.ProxyWorker) reads PROXY headers, not "
                         f"{getattr(worker_class, '__name__', worker_class)}\n")
        sys.exit(2)
    rt = Runtime(settings=settings, workers=_boot.workers,
                 hosts=HostTable(worker_slots=max(16, 2 * _boot.workers + 8),
                                 lock_path=rundir.path("hosts.lock")))
    ratelimit.install(rundir.path("ratelimit.lock"))  # local rate limits: shared by the workers
    logfmt.apply(settings.log)
    try:
        _start(rt)
    except ConfigError as e:  # the admin address taken since gunicorn.conf.py checked it
        _teardown(rt)
        sys.stderr.write(f"gol7lb: {e}\n")
        sys.exit(2)
    except (StartupError, OSError) as e:
        _teardown(rt)
        log.error("gol7lb: %s", e)
        sys.stderr.write(f"gol7lb: cannot start: {e}\n")
        sys.exit(1)
    _runtime = rt
    _note_shutdown(server, rt.watcher)
    if rundir.socket_address("gunicorn.ctl", abstract=False) is None:
        log.warning("gol7lb: gunicorn's control socket is off: a path in %s would be "
                    "longer than %d bytes", rundir.path(""), rundir.UNIX_PATH_MAX)
    # The master follows the state for its log settings alone: a reload by the config watcher
    # never reaches it otherwise. Its own connection, in its own thread.
    follower = ControlClient(rt.address, rt.authkey)
    GenerationFollower(lambda: rt.counters.generation,
                       lambda: follower.snapshot().settings.log,
                       logfmt.apply).start(0.25, "gol7lb-log-settings")


def _start(rt: Runtime) -> None:
    global _client
    settings = rt.settings
    admin_address = settings.admin.address
    if admin_address:
        try:
            rt.admin_sock = admin.bind_listener(admin_address)
        except OSError as e:
            raise admin.bind_error(settings.admin.bind, e) from None
    if settings.demo_backends:
        rt.demo = DemoBackends(DEMO_PORTS)
        rt.demo.start()
    address = rundir.socket_address("manager.sock")
    if address is None:
        raise StartupError(f"no Unix socket path fits in {rundir.UNIX_PATH_MAX} bytes under "
                           f"{rundir.path('')}: set TMPDIR to a shorter directory")
    rt.address = address
    rt.authkey = bytes(multiprocessing.current_process().authkey)
    rt.watcher = ChildWatcher([])
    manager = ManagedChild("manager", run_manager, (rt.address, rt.authkey, rt.counters,
                                                    rt.hosts, rundir.path("state.pickle")))
    rt.watcher.children.append(manager)
    rt.watcher.start_child(manager)
    _client = ControlClient(rt.address, rt.authkey)
    _wait_for_manager(_client, manager)
    _client.call("publish_config", settings, time.time())

    helpers = [ManagedChild("supervisor", supervisor.run, (rt.address, rt.authkey, rt.counters))]
    if rt.admin_sock is not None:
        helpers.append(ManagedChild("admin listener", admin.run,
                                    (rt.admin_sock, rt.address, rt.authkey, rt.counters,
                                     rt.hosts)))
    if settings.path:
        helpers.append(ManagedChild("config watcher", reload.run,
                                    (rt.address, rt.authkey, settings.path)))
    if settings.tls.enabled:
        helpers.append(ManagedChild("certificate watcher", certwatch.run,
                                    (rt.address, rt.authkey, rt.counters)))
    if any(pool.discover for pool in settings.pools.values()):
        helpers.append(ManagedChild("discovery", discovery.run,
                                    (rt.address, rt.authkey, rt.counters)))
    if settings.acme.domains:  # automatic certificates (acme.py)
        helpers.append(ManagedChild("acme", acme.run, (rt.address, rt.authkey, rt.counters)))
    for child in helpers:
        rt.watcher.children.append(child)
        rt.watcher.start_child(child)
    pools = settings.pools
    scheme = "https" if settings.tls.enabled else "http"
    if settings.tls.redirect_port:
        scheme = f"http://0.0.0.0:{settings.tls.redirect_port} (redirects) and https"
    log.info("gol7lb: listening on %s://0.0.0.0:%d with %d workers; %d backends in %d pools "
             "(%s), settings from %s; admin %s", scheme, _boot.port if _boot else 0, rt.workers,
             sum(len(p.backends) for p in pools.values()), len(pools),
             ", ".join(b.url for p in pools.values() for b in p.backends), settings.source,
             f"on http://{settings.admin.bind}" if admin_address else "off")
    if not settings.proxy.upstream_verify:
        log.warning("proxy.upstream_verify is false: https:// backends' certificates are NOT "
                    "verified (lab use only)")


def check_worker_class(server: Any, settings: Settings) -> None:
    """HTTPS (tls.*) is served by gol7lb's own worker only: gunicorn's gthread handshakes in
    its threads (one slow client holds one), so a start with another class is refused."""
    name = str(getattr(server.cfg, "worker_class_str", "") or "")
    if settings.tls.enabled and not name.endswith("ProxyWorker"):
        sys.stderr.write(f"gol7lb: tls.cert needs gol7lb's own worker (gol7lb.worker."
                         f"ProxyWorker), not {name}: drop --worker-class, or leave tls.* unset "
                         "and use gunicorn's --certfile/--keyfile\n")
        sys.exit(2)


_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)
_early_stop: list[int] = []  # in a new worker: a stop signal that came before its handlers


def _note_shutdown(server: Any, watcher: ChildWatcher | None) -> None:
    """From the master's TERM, INT or QUIT on, no helper is restarted: the master stops
    them itself once its workers are gone. gunicorn installs `server.signal` as its handler
    right after on_starting; it only queues the signal for its main loop, so this wraps it.

    A worker runs this handler too until gunicorn installs the worker's own (a group TERM
    right after a fork): it keeps the signal for post_worker_init, which raises it again,
    instead of queueing it where nobody looks (the master would wait its graceful timeout).
    """
    queue_signal = server.signal
    master = os.getpid()

    def on_signal(sig: int, frame: Any) -> None:
        if os.getpid() != master:
            if sig in _STOP_SIGNALS:
                _early_stop.append(sig)
            return
        if watcher is not None and sig in _STOP_SIGNALS:
            watcher.shutting_down()
        queue_signal(sig, frame)

    server.signal = on_signal


def _wait_for_manager(client: ControlClient, manager: ManagedChild) -> None:
    deadline = time.monotonic() + MANAGER_START_SECONDS
    while True:
        try:
            client.call("snapshot")
            return
        except Exception as e:
            if manager.process.exitcode is not None or time.monotonic() > deadline:
                raise StartupError(f"the shared-state manager did not start: {e}") from None
            time.sleep(0.05)


def pre_fork(server: Any, worker: Any) -> None:
    """Give the new worker the lowest free slot: its cells in the host table, and its CPU
    (a replacement takes the CPU of the worker it replaces)."""
    rt = runtime()
    taken = {getattr(w, "slot", None) for w in server.WORKERS.values()}
    worker.slot = next((i for i in range(rt.hosts.worker_slots) if i not in taken), None)
    if worker.slot is None:
        log.error("gol7lb: more than %d workers at once: the new one is not counted "
                  "in in-flight totals", rt.hosts.worker_slots)


def post_fork(server: Any, worker: Any) -> None:
    """In the new worker: forget the master's multiprocessing children and its admin socket.

    Otherwise multiprocessing's exit handler in the worker would try to terminate and join
    the master's helpers when the worker exits.
    """
    multiprocessing.process._children.clear()  # type: ignore[attr-defined]
    rt = runtime()
    rt.worker_slot = getattr(worker, "slot", None)
    rt.threads = max(1, int(getattr(worker.cfg, "threads", 32) or 32))
    if rt.admin_sock is not None:
        rt.admin_sock.close()  # the worker's copy of the fd only
    if rt.settings.cpu_affinity == "auto" and rt.worker_slot is not None:
        pin_to_cpu(rt.worker_slot)


def post_worker_init(worker: Any) -> None:
    """Build the proxy and read the current shared state before the first request."""
    from gol7lb import wsgi

    wsgi.build_app()
    for sig in _early_stop:  # the worker's own handlers take it now
        os.kill(os.getpid(), sig)


def pin_to_cpu(index: int) -> int | None:
    """Keep this worker on one CPU of those allowed: its threads then hand the GIL over on one
    core instead of across cores (measured: +21% req/s, p99 halved, docs/performance.md).
    None if the platform cannot pin."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    cpus = sorted(os.sched_getaffinity(0))
    cpu = cpus[index % len(cpus)]
    os.sched_setaffinity(0, {cpu})
    return cpu


def child_exit(server: Any, worker: Any) -> None:
    """In the master, after a worker was reaped: its requests are no longer in flight, its
    live gauges go, its counters stay."""
    if _runtime is not None and getattr(worker, "slot", None) is not None:
        _runtime.hosts.clear_in_flight(worker.slot)
    with contextlib.suppress(Exception):
        metrics.worker_exited(worker.pid)


def on_reload(server: Any) -> None:
    """SIGHUP: the same validated reload as a file change; gunicorn then replaces the
    workers, and the new ones start from the configuration published here."""
    if _client is None:
        return
    if reload.reload_config(_client, "SIGHUP"):
        with contextlib.suppress(Exception):
            logfmt.apply(_client.snapshot().settings.log)


def on_exit(server: Any) -> None:
    """Workers have drained; now stop the helpers, the Manager and the demo backends."""
    if _runtime is not None:
        _teardown(_runtime)
        log.info("gol7lb: helpers stopped")
    rundir.remove()


def _teardown(rt: Runtime) -> None:
    if rt.watcher is not None:
        rt.watcher.stop()
    if rt.admin_sock is not None:
        rt.admin_sock.close()
    if rt.demo is not None:
        rt.demo.stop()
