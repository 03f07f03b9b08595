"""One listening socket shared by every worker (reuse_port off): connections stay spread."""

from __future__ import annotations

import socket
import sys
import time

import psutil
import pytest

from tests.conftest import backends_env
from tests.procs import ROOT, Proc, free_port, wait_for_port, workers_of

pytestmark = pytest.mark.lean_worker


def test_keep_alive_connections_spread_over_workers_on_a_shared_listener(backend_factory,
                                                                         tmp_path):
    backend = backend_factory()
    conf = tmp_path / "shared.conf.py"
    conf.write_text(f"exec(open({str(ROOT / 'gunicorn.conf.py')!r}).read())\n"
                    "reuse_port = False\n")
    port = free_port()
    lb = Proc([sys.executable, "-m", "gunicorn", "-c", str(conf), "gol7lb.wsgi",
               "--no-control-socket", "--threads", "4"],
              env={"PORT": str(port), "GOL7LB_BACKENDS": backends_env([backend.port]),
                   "GOL7LB_ADMIN_BIND": "", "WEB_CONCURRENCY": "2"},
              log=tmp_path / "lb.log")
    socks = []
    try:
        wait_for_port(port)
        deadline = time.monotonic() + 15
        while len([w for w in workers_of(lb) if w.num_threads() >= 5]) < 2:  # both in run()
            assert time.monotonic() < deadline, lb.output()
            time.sleep(0.05)
        socks = [socket.create_connection(("127.0.0.1", port), timeout=10)
                 for _ in range(32)]  # a burst, as a load generator opens them
        for s in socks:
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        for s in socks:
            assert s.recv(4096).startswith(b"HTTP/1.1 200 ")
        held = [len([c for c in w.net_connections("tcp")
                     if c.status == psutil.CONN_ESTABLISHED and c.laddr.port == port])
                for w in workers_of(lb)]
        assert sum(held) == 32 and max(held) <= 16 + 5, held
        lb.tree()
    finally:
        for s in socks:
            s.close()
        lb.stop()
    assert lb.leftovers() == []


def test_a_worker_without_a_slot_still_gets_a_cell():
    """Issue 14: pre_fork gives no slot when every one is taken; Spread(None) raised."""
    from gol7lb.spread import SLOTS, Spread

    spread = Spread(None)
    assert 0 <= spread.slot < SLOTS
    spread.publish(3)
    spread.leave()
