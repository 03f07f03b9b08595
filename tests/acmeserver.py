"""A real ACME server for the tests: Debian's `pebble` on 127.0.0.1 with free ports.

`Pebble` writes its configuration and the TLS certificate of its API (made with trustme; the
Debian package ships none), resolves names through the test's DNS server (`-dnsserver`),
validates HTTP-01 on `http_port`, and is stopped by its PID. `ChallengeAnswerer` is the
plain-HTTP side for tests that have no LB listening there: it answers from
gol7lb.challenges, the way the LB's redirect listener does.
"""

from __future__ import annotations

import json
import shutil
import ssl
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import trustme

from gol7lb import challenges
from tests.procs import Proc, free_port

PEBBLE = shutil.which("pebble")
# No random validation sleeps, no rejected nonces, no reused authorizations: every order
# proves its challenge again, and quickly.
PEBBLE_ENV = {"PEBBLE_VA_NOSLEEP": "1", "PEBBLE_WFE_NONCEREJECT": "0", "PEBBLE_AUTHZREUSE": "0"}


class Pebble:
    """pebble as a process of its own; `start()` again after `stop()` is a new CA (pebble
    keeps nothing across runs), on the same ports."""

    __test__ = False

    def __init__(self, tmp_path: Path, dns_address: str) -> None:
        self.dir = tmp_path / "pebble"
        self.dir.mkdir(exist_ok=True)
        self.api_ca = trustme.CA()
        leaf = self.api_ca.issue_cert("localhost", "127.0.0.1")
        leaf.private_key_pem.write_to_path(str(self.dir / "key.pem"))
        leaf.cert_chain_pems[0].write_to_path(str(self.dir / "cert.pem"))
        self.ca_bundle = self.dir / "api-ca.pem"
        self.api_ca.cert_pem.write_to_path(str(self.ca_bundle))
        self.dns_address = dns_address
        self.runs = 0
        self.proc: Proc | None = None
        self.logs: list[Path] = []
        self._pick_ports()

    def _pick_ports(self) -> None:
        self.port, self.management_port = free_port(), free_port()
        self.http_port, self.tls_port = free_port(), free_port()
        (self.dir / "config.json").write_text(json.dumps({"pebble": {
            "listenAddress": f"127.0.0.1:{self.port}",
            "managementListenAddress": f"127.0.0.1:{self.management_port}",
            "certificate": str(self.dir / "cert.pem"), "privateKey": str(self.dir / "key.pem"),
            "httpPort": self.http_port, "tlsPort": self.tls_port,
            "ocspResponderURL": "", "externalAccountBindingRequired": False}}))

    @property
    def directory(self) -> str:
        return f"https://127.0.0.1:{self.port}/dir"

    def start(self) -> Pebble:
        """Until its directory answers over HTTPS. On the first start, a port that another
        process took between the pick and pebble's bind (pebble then exits) means new ports;
        a restart keeps them (clients know the directory URL)."""
        assert PEBBLE, "pebble is not installed (apt-get install pebble; tests/run.sh does)"
        for attempt in range(5):
            self.runs += 1
            log = self.dir / f"pebble-{self.runs}.log"
            self.logs.append(log)
            self.proc = Proc([PEBBLE, "-config", str(self.dir / "config.json"),
                              "-dnsserver", self.dns_address], env=PEBBLE_ENV, log=log)
            if self._answers():
                return self
            self.stop()
            assert self.runs == attempt + 1, "pebble did not start again:\n" + log.read_text()
            self._pick_ports()
        raise AssertionError("pebble did not start:\n" + log.read_text())

    def _answers(self) -> bool:
        """pebble serves its directory and its management port; False if it exited."""
        assert self.proc is not None
        deadline = time.monotonic() + 20
        while True:
            if self.proc.popen.poll() is not None:
                return False
            try:
                return "newOrder" in self._get(self.port, "/dir") and bool(
                    self._get(self.management_port, "/roots/0"))
            except OSError:
                assert time.monotonic() < deadline, "pebble did not answer:\n" + \
                    self.proc.output()
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
            assert not self.proc.leftovers()
            self.proc = None

    def orders(self) -> int:
        """New orders this pebble run has received (its request log)."""
        return self.proc.output().count("/order-plz ->") if self.proc else 0

    def _get(self, port: int, path: str) -> str:
        context = ssl.create_default_context(cafile=str(self.ca_bundle))
        with urllib.request.urlopen(f"https://127.0.0.1:{port}{path}", context=context,
                                    timeout=10) as answer:
            return str(answer.read().decode())

    def root_pem(self) -> str:
        return self._get(self.management_port, "/roots/0")

    def intermediate_pem(self) -> str:
        return self._get(self.management_port, "/intermediates/0")


class ChallengeAnswerer:
    """GET /.well-known/acme-challenge/TOKEN on 127.0.0.1:port, answered from the ACME
    storage directories given (a thread of the test process)."""

    def __init__(self, port: int, storages: list[str]) -> None:
        self.storages = storages
        self.requests: list[str] = []
        answerer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the http.server interface
                answerer.requests.append(self.path)
                body = next((b for s in answerer.storages
                             if (b := challenges.answer(s, self.path)) is not None), None)
                self.send_response(200 if body is not None else 404)
                self.send_header("Content-Length", str(len(body or b"")))
                self.end_headers()
                self.wfile.write(body or b"")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)
