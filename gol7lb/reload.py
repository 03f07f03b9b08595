"""Reloading the configuration: re-read the file and the environment, validate, and publish a
new generation, or refuse and keep the running one. One function serves both triggers:
SIGHUP to the master (gunicorn's `on_reload` hook) and a change of the `GOL7LB_CONFIG` file
seen by the config watcher process.

Nothing here may exit the process: a `sys.exit()` during gunicorn's reload goes through the
arbiter and takes the master down. A configuration that does not validate is logged in one
line, kept as `config.last_error` in /status, and counted in
`gol7lb_config_reloads_total{result="error"}`. So is a reload the Manager does not answer
within its bound (frozen, restarting): the running configuration stays; the config watcher
tries again by itself, a SIGHUP must be sent again (the master never waits for the Manager).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path

from gol7lb import logfmt, metrics
from gol7lb.children import helper_main
from gol7lb.config import ConfigError, Settings, load_settings
from gol7lb.manager import ControlClient, ManagerUnavailable
from gol7lb.tls import check_pairs

log = logging.getLogger("gol7lb.reload")

# Settings a running master cannot change: it has bound or forked with them.
RESTART_ONLY = {"admin.bind": lambda s: s.admin.bind, "cpu_affinity": lambda s: s.cpu_affinity,
                # the master built the TLS contexts (and bound the ports) before its fork
                "tls (on or off)": lambda s: s.tls.enabled,
                "tls.min_version": lambda s: s.tls.min_version,
                "tls.ciphers": lambda s: s.tls.ciphers,
                "tls.client_ca": lambda s: s.tls.client_ca,
                "tls.redirect_port": lambda s: s.tls.redirect_port}
WATCH_DEBOUNCE_MS = 200  # an editor's write-rename lands as one change, well within 2 s


# Client-edge limits each worker reads when it starts: new workers (SIGHUP) take them.
WORKER_START = {
    "proxy.client_header_timeout": lambda s: s.proxy.client_header_timeout,
    "proxy.client_idle_timeout": lambda s: s.proxy.client_idle_timeout,
    "proxy.client_body_timeout": lambda s: s.proxy.client_body_timeout,
    "proxy.max_header_bytes": lambda s: s.proxy.max_header_bytes,
    "proxy.max_headers": lambda s: s.proxy.max_headers,
    "tls.handshake_timeout": lambda s: s.tls.handshake_timeout,
    "tls.hsts": lambda s: s.tls.hsts,
    "proxy.proxy_protocol": lambda s: s.proxy.proxy_protocol,
    "proxy.proxy_protocol_from": lambda s: s.proxy.proxy_protocol_from,
}


def restart_notes(old: Settings | None, new: Settings) -> list[str]:
    """What changed but takes effect only after a restart (or new workers), for the log."""
    if old is None:
        return []
    notes = [f"{name} changed from {get(old)!r} to {get(new)!r}: it takes effect after a "
             "restart" for name, get in RESTART_ONLY.items() if get(old) != get(new)]
    notes += [f"{name} changed from {get(old)!r} to {get(new)!r}: workers started from now "
              "on use it (SIGHUP replaces them all)"
              for name, get in WORKER_START.items() if get(old) != get(new)]
    return notes


def reload_config(client: ControlClient, trigger: str,
                  env: Mapping[str, str] | None = None) -> bool:
    """Validate and publish the configuration now in the file and the environment."""
    try:
        settings = load_settings(env)
        if settings.tls.enabled:  # the pairs it adds must load
            check_pairs(settings, _running_settings(client))
    except ConfigError as e:
        log.error("reload (%s) refused, the running configuration stays: %s", trigger, e)
        metrics.CONFIG_RELOADS.labels("error").inc()
        try:
            client.call("record_error", str(e))
        except Exception as publish_error:
            log.error("cannot record the reload error in the shared state: %s", publish_error)
        return False
    try:  # every call is bounded: a frozen Manager never holds the master's reload
        try:
            previous: Settings | None = client.snapshot().settings
        except ManagerUnavailable:
            raise
        except Exception:  # a Manager restarted without its saved state: publish all the same
            previous = None
        generation = client.call("publish_config", settings, time.time())
    except Exception as e:
        log.error("reload (%s) failed, the running configuration stays: shared state "
                  "unreachable: %s; send it again once /healthz says ok", trigger,
                  e or type(e).__name__)
        metrics.CONFIG_RELOADS.labels("error").inc()
        return False
    metrics.CONFIG_RELOADS.labels("ok").inc()
    logfmt.apply(settings.log)  # this process's lines about it are in the new one
    for note in restart_notes(previous, settings):
        log.warning("reload (%s): %s", trigger, note)
    log.info("reload (%s): configuration generation %d from %s: %d backends in %d pools",
             trigger, generation, settings.source,
             sum(len(p.backends) for p in settings.pools.values()), len(settings.pools))
    return True


def _running_settings(client: ControlClient) -> Settings | None:
    try:
        return client.snapshot().settings
    except Exception:  # unreachable: every pair is checked
        return None


def file_digest(path: str) -> str | None:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None


def watch(path: str, client: ControlClient, stop: threading.Event) -> None:
    """Reload when the file's content differs from the one the running configuration was
    read from (so a change made while this process was starting or restarting counts too).

    The directory is watched (inotify through watchfiles), not the file: editors write a new
    file and rename it over the old one, and Kubernetes swaps a ConfigMap's `..data` symlink,
    both of which a watch on the old inode would miss. Only events on the file's name or on
    `..`-names wake it, so log files written beside the config do not.
    """
    from watchfiles import watch as watch_changes

    logging.getLogger("watchfiles").setLevel(logging.WARNING)  # it logs every event at INFO
    directory = os.path.dirname(os.path.abspath(path)) or "."
    name = os.path.basename(path)

    def relevant(_change: object, changed: str) -> bool:
        base = os.path.basename(changed)
        return base == name or base.startswith("..")

    seen = check(path, client)
    for changes in watch_changes(directory, watch_filter=relevant, stop_event=stop,
                                 debounce=WATCH_DEBOUNCE_MS, step=50, rust_timeout=1000,
                                 yield_on_timeout=True, recursive=False):
        # An empty set is a quiet second. The inotify watch exists only from the first of
        # them, so an edit between the first check and that point raised no event: compare
        # the digest then (and each quiet second, which also covers file systems that drop
        # events), but ask the Manager only when the file differs from what was last seen.
        if changes or file_digest(path) != seen:
            seen = check(path, client)


def check(path: str, client: ControlClient) -> str | None:
    """Reload if the file now holds something else than what was last loaded or refused.
    Returns the digest it judged, or None when it could not judge (try again later)."""
    digest = file_digest(path)
    try:
        snapshot = client.snapshot()
    except Exception as e:
        log.error("config watcher cannot read the running configuration: %s", e)
        return None
    running = snapshot.settings
    logfmt.apply(running.log)  # a reload may have switched text/json
    # The file back to what runs after a refused edit: reloading it clears `last_error`.
    if digest == running.file_digest and snapshot.last_error is None:
        return digest
    if digest == _last_refused.get("digest"):
        return digest
    if not running.reload.watch:
        return digest
    if not reload_config(client, f"{os.path.basename(path)} changed"):
        _last_refused["digest"] = digest  # say it once, not on every event until it is fixed
    return digest


_last_refused: dict[str, str | None] = {}


def run(address: str, authkey: bytes, path: str) -> None:
    """Entry point of the config watcher process (spawned by the master, restarted if it
    dies). It runs whenever `GOL7LB_CONFIG` names a file, and reloads on a change while the
    running configuration has `reload.watch` on."""
    stop = helper_main("config watcher")
    client = ControlClient(address, authkey)
    with contextlib.suppress(Exception):  # log settings may have changed since the spawn
        logfmt.apply(client.snapshot().settings.log)
    log.info("config watcher on %s (pid %d)", path, os.getpid())
    watch(path, client, stop)
    sys.exit(0)
