"""A real DNS server process on 127.0.0.1 (UDP and TCP, dnslib) whose records a test changes
while the LB runs.

`python -m tests.dnsserver PORT ZONE.json` serves the zone file, re-read whenever it changes:
A, AAAA and SRV answers with a one-second TTL, NXDOMAIN for unknown names. `TestDNS` starts
it on a free port, rewrites the zone (atomically) for the test, and stops the process by its
PID; a stopped server answers nothing, as a dead resolver would.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from dnslib import AAAA, QTYPE, RCODE, RR, SRV, A
from dnslib.server import BaseResolver, DNSLogger, DNSServer

TTL = 1


class ZoneFile(BaseResolver):
    """Answers from a JSON file {"a": {name: [ip]}, "aaaa": {...}, "srv": {name: [[prio,
    weight, port, target]]}}, read again when its modification time changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: float | None = None
        self._zone: dict[str, Any] = {}
        self._lock = threading.Lock()

    def _current(self) -> dict[str, Any]:
        with self._lock:
            try:
                stamp = self.path.stat().st_mtime_ns
            except OSError:
                return self._zone
            if stamp != self._stamp:
                self._zone = json.loads(self.path.read_text())
                self._stamp = stamp
            return self._zone

    def resolve(self, request: Any, handler: Any) -> Any:
        zone = self._current()
        reply = request.reply()
        name = str(request.q.qname).rstrip(".")
        qtype = QTYPE[request.q.qtype]
        known = any(name in zone.get(kind, {}) for kind in ("a", "aaaa", "srv"))
        if qtype == "A":
            for address in zone.get("a", {}).get(name, []):
                reply.add_answer(RR(name, QTYPE.A, rdata=A(address), ttl=TTL))
        elif qtype == "AAAA":
            for address in zone.get("aaaa", {}).get(name, []):
                reply.add_answer(RR(name, QTYPE.AAAA, rdata=AAAA(address), ttl=TTL))
        elif qtype == "SRV":
            for priority, weight, port, target in zone.get("srv", {}).get(name, []):
                reply.add_answer(RR(name, QTYPE.SRV, ttl=TTL, rdata=SRV(
                    priority=priority, weight=weight, port=port, target=target)))
        if not known:
            reply.header.rcode = RCODE.NXDOMAIN
        return reply


def serve(port: int, zone_path: Path) -> None:
    resolver = ZoneFile(zone_path)
    quiet = DNSLogger(logf=lambda text: None)
    servers = [DNSServer(resolver, port=port, address="127.0.0.1", logger=quiet, tcp=tcp)
               for tcp in (False, True)]
    for server in servers:
        server.start_thread()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    print(f"dns server on 127.0.0.1:{port}", flush=True)
    stop.wait()
    for server in servers:
        server.stop()


class TestDNS:
    """The server as a process of its own, on a free port, with a zone the test edits."""

    __test__ = False

    def __init__(self, tmp_path: Path) -> None:
        from tests.procs import Proc, free_port

        self.zone: dict[str, dict[str, list]] = {"a": {}, "aaaa": {}, "srv": {}}
        self.path = tmp_path / "zone.json"
        self._write()
        self.port = free_port()
        self.proc = Proc([sys.executable, "-m", "tests.dnsserver", str(self.port),
                          str(self.path)], log=tmp_path / "dns.log")
        deadline = time.monotonic() + 15
        while "dns server on" not in self.proc.output():
            assert self.proc.popen.poll() is None, self.proc.output()
            assert time.monotonic() < deadline, "the DNS server did not start"
            time.sleep(0.05)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _write(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.zone))
        os.replace(tmp, self.path)
        os.utime(self.path, ns=(time.time_ns(), time.time_ns()))  # always a new mtime

    def set_a(self, name: str, addresses: list[str]) -> None:
        self.zone["a"][name.rstrip(".")] = list(addresses)
        self._write()

    def set_srv(self, name: str, records: list[tuple[int, int, int, str]]) -> None:
        self.zone["srv"][name.rstrip(".")] = [list(r) for r in records]
        self._write()

    def stop(self) -> None:
        self.proc.stop()
        assert not self.proc.leftovers()


if __name__ == "__main__":
    serve(int(sys.argv[1]), Path(sys.argv[2]))
