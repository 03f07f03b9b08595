"""A real DNS server on 127.0.0.1 (UDP and TCP, dnslib) whose records a test changes while the
LB runs: A, AAAA and SRV answers with a short TTL and NXDOMAIN for unknown names; `stop()`
makes it answer nothing at all, as a dead resolver would."""

from __future__ import annotations

import threading
from typing import Any

from dnslib import AAAA, QTYPE, RCODE, RR, SRV, A
from dnslib.server import BaseResolver, DNSLogger, DNSServer

from tests.procs import free_port

TTL = 1


class Zone(BaseResolver):
    def __init__(self) -> None:
        self.a: dict[str, list[str]] = {}
        self.aaaa: dict[str, list[str]] = {}
        self.srv: dict[str, list[tuple[int, int, int, str]]] = {}  # priority, weight, port, target
        self.queries = 0
        self._lock = threading.Lock()

    def set_a(self, name: str, addresses: list[str]) -> None:
        with self._lock:
            self.a[name.rstrip(".")] = list(addresses)

    def set_srv(self, name: str, records: list[tuple[int, int, int, str]]) -> None:
        with self._lock:
            self.srv[name.rstrip(".")] = list(records)

    def resolve(self, request: Any, handler: Any) -> Any:
        self.queries += 1
        reply = request.reply()
        name = str(request.q.qname).rstrip(".")
        qtype = QTYPE[request.q.qtype]
        with self._lock:
            known = name in self.a or name in self.aaaa or name in self.srv
            if qtype == "A":
                for address in self.a.get(name, []):
                    reply.add_answer(RR(name, QTYPE.A, rdata=A(address), ttl=TTL))
            elif qtype == "AAAA":
                for address in self.aaaa.get(name, []):
                    reply.add_answer(RR(name, QTYPE.AAAA, rdata=AAAA(address), ttl=TTL))
            elif qtype == "SRV":
                for priority, weight, port, target in self.srv.get(name, []):
                    reply.add_answer(RR(name, QTYPE.SRV, ttl=TTL, rdata=SRV(
                        priority=priority, weight=weight, port=port, target=target)))
        if not known:
            reply.header.rcode = RCODE.NXDOMAIN
        return reply


class TestDNS:
    """The server, started on a free port; `stop()` ends both listeners."""

    __test__ = False

    def __init__(self) -> None:
        self.zone = Zone()
        self.port = free_port()
        quiet = DNSLogger(logf=lambda text: None)
        self.udp = DNSServer(self.zone, port=self.port, address="127.0.0.1", logger=quiet)
        self.tcp = DNSServer(self.zone, port=self.port, address="127.0.0.1", tcp=True,
                             logger=quiet)
        self.udp.start_thread()
        self.tcp.start_thread()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.udp.stop()
        self.tcp.stop()
