"""The discovery process: backends from DNS, kept current.

An entry with `discover = "dns"` becomes one backend per A/AAAA address of its host (on the
URL's port, with the entry's weight); `discover = "srv"` one backend per target of the SRV
records of the lowest priority (the target's addresses, the record's port, its weight clamped
to 1-256). Each name is resolved again after `discovery.interval` seconds, or after its
record's TTL (clamped to 1-300 s) when the interval is 0. Answers go through the control
state like any other change: new addresses are health-checked before they take traffic,
vanished ones stop getting new requests (those in flight finish), unchanged ones keep their
state. A name that stops resolving keeps its last known addresses, and /status and the log
say why.

dnspython does the DNS (a well-kept client: no hand-written wire format here).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import replace

import dns.exception
import dns.nameserver
import dns.rdatatype
import dns.resolver

from gol7lb import logfmt
from gol7lb.backends import Backend, BackendError, parse_backend_url
from gol7lb.children import helper_main
from gol7lb.config import parse_bind
from gol7lb.control import Snapshot
from gol7lb.counters import SharedCounters
from gol7lb.manager import ControlClient
from gol7lb.pools import DiscoverySpec
from gol7lb.view import GenerationFollower

log = logging.getLogger("gol7lb.discovery")
MIN_TTL, MAX_TTL = 1.0, 300.0
LOOKUP_SECONDS = 2.0  # one resolution may take this long before it counts as failed
RETRY_SECONDS = 2.0  # after a failure, ask again this soon


class DiscoveryFailed(Exception):
    """A name did not resolve; str() says why, for /status and the log."""


def make_resolver(resolvers: Sequence[str]) -> dns.resolver.Resolver:
    """The system's resolver, or the configured `host:port` servers."""
    if not resolvers:
        resolver = dns.resolver.Resolver()
    else:
        resolver = dns.resolver.Resolver(configure=False)
        servers = []
        for text in resolvers:
            host, port = parse_bind(text)  # type: ignore[misc]  # validated in config
            servers.append(dns.nameserver.Do53Nameserver(host, port))
        resolver.nameservers = servers
    resolver.lifetime = LOOKUP_SECONDS
    resolver.timeout = LOOKUP_SECONDS / 2
    return resolver


def _addresses(resolver: dns.resolver.Resolver, name: str) -> tuple[list[str], float]:
    """A and AAAA addresses of a name, and the smaller TTL; DiscoveryFailed if it has none."""
    found: list[str] = []
    ttls: list[float] = []
    errors: list[str] = []
    for rdtype in ("A", "AAAA"):
        try:
            answer = resolver.resolve(name, rdtype, search=False)
        except dns.resolver.NXDOMAIN:
            raise DiscoveryFailed(f"{name}: no such name (NXDOMAIN)") from None
        except dns.resolver.NoAnswer:
            continue
        except (dns.exception.Timeout, dns.resolver.NoNameservers) as e:
            errors.append(f"{name} {rdtype}: {type(e).__name__}")
            continue
        found += [r.address for r in answer]
        ttls.append(float(answer.rrset.ttl) if answer.rrset is not None else MAX_TTL)
    if not found:
        raise DiscoveryFailed("; ".join(errors) or f"{name}: no A or AAAA records")
    return found, min(ttls)


def resolve(spec: DiscoverySpec, resolver: dns.resolver.Resolver) -> tuple[list[Backend], float]:
    """The backends an entry stands for now, and when to ask again (the TTL)."""
    if spec.kind == "dns":
        addresses, ttl = _addresses(resolver, spec.name)
        weighted = [(address, spec.port, spec.weight) for address in addresses]
    else:
        try:
            answer = resolver.resolve(spec.name, "SRV", search=False)
        except dns.resolver.NXDOMAIN:
            raise DiscoveryFailed(f"{spec.name}: no such name (NXDOMAIN)") from None
        except dns.resolver.NoAnswer:
            raise DiscoveryFailed(f"{spec.name}: no SRV records") from None
        except (dns.exception.Timeout, dns.resolver.NoNameservers) as e:
            raise DiscoveryFailed(f"{spec.name} SRV: {type(e).__name__}") from None
        records = list(answer)
        ttl = float(answer.rrset.ttl) if answer.rrset is not None else MAX_TTL
        best = min(r.priority for r in records)
        weighted = []
        for record in records:
            if record.priority != best:
                continue
            target = record.target.to_text(omit_final_dot=True)
            addresses, target_ttl = _addresses(resolver, target)
            ttl = min(ttl, target_ttl)
            weight = min(256, max(1, record.weight))
            weighted += [(address, record.port, weight) for address in addresses]
    backends: dict[str, Backend] = {}
    scheme = "https" if spec.tls else "http"
    for address, port, weight in weighted:
        host = f"[{address}]" if ":" in address else address
        try:
            backend = parse_backend_url(f"{scheme}://{host}:{port}", weight,
                                        spec.max_connections)
        except BackendError:
            continue
        if spec.tls:  # the certificate names the service, not each address
            backend = replace(backend, server_name=spec.name)
        backends.setdefault(backend.id, backend)
    return list(backends.values()), ttl


class Discoverer:
    """Resolves every discovery entry of the running configuration on its own schedule."""

    def __init__(self, client: ControlClient, counters: SharedCounters,
                 stop: threading.Event | None = None) -> None:
        self.client = client
        self.stop = stop or threading.Event()
        self._follower = GenerationFollower(lambda: counters.generation, client.snapshot,
                                            self._apply)
        self._specs: dict[str, DiscoverySpec] = {}
        self._due: dict[str, float] = {}
        self._failing: dict[str, str] = {}
        self._resolver = make_resolver(())
        self._interval = 0.0

    def refresh(self) -> None:
        self._follower.poll()

    def _apply(self, snapshot: Snapshot) -> None:
        settings = snapshot.settings
        logfmt.apply(settings.log)
        self._resolver = make_resolver(settings.discovery.resolvers)
        self._interval = settings.discovery.interval
        specs = {spec.key: spec for pool in settings.pools.values() for spec in pool.discover}
        for key in specs:
            if key not in self._specs:
                self._due[key] = 0.0  # a new entry: resolve now
        self._specs = specs

    def run_once(self) -> None:
        now = time.monotonic()
        for key, spec in list(self._specs.items()):
            if self._due.get(key, 0.0) > now:
                continue
            try:
                backends, ttl = resolve(spec, self._resolver)
            except DiscoveryFailed as e:
                self._publish(key, spec, None, str(e))
                if self._failing.get(key) != str(e):
                    log.warning("discovery: %s did not resolve (%s); keeping its last known "
                                "addresses", spec.name, e)
                self._failing[key] = str(e)
                self._due[key] = now + (self._interval or RETRY_SECONDS)
                continue
            if key in self._failing:
                log.info("discovery: %s resolves again", spec.name)
                del self._failing[key]
            self._publish(key, spec, backends, None)
            wait = self._interval or min(MAX_TTL, max(MIN_TTL, ttl))
            self._due[key] = now + wait

    def _publish(self, key: str, spec: DiscoverySpec, backends: list[Backend] | None,
                 error: str | None) -> None:
        try:
            self.client.call("set_discovered", key, spec.name, backends, error)
        except Exception as e:  # the Manager is restarting: the next round publishes again
            self._due[key] = 0.0
            log.error("discovery cannot publish %s: %s", spec.name, e or type(e).__name__)

    def run(self) -> None:
        while not self.stop.is_set():
            self.refresh()
            self.run_once()
            self.stop.wait(0.25)


def run(address: str, authkey: bytes, counters: SharedCounters) -> None:
    """Entry point of the discovery process (spawned by the master, restarted if it dies)."""
    stop = helper_main("discovery")
    discoverer = Discoverer(ControlClient(address, authkey), counters, stop)
    log.info("discovery started (pid %d)", os.getpid())
    discoverer.run()
    sys.exit(0)
