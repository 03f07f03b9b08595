"""Upgrade tunnelling through a real LB with a real WebSocket client and server (websockets).

Under every worker class; the 50-tunnel test needs ours (there a tunnel does not keep a pool
thread), the TERM test one of ours (stock gthread was seen to cut open tunnels on TERM)."""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
import threading
import time
from collections.abc import Iterator

import pytest
from websockets.exceptions import ConnectionClosed, ConnectionClosedOK
from websockets.sync.client import connect
from websockets.sync.server import Server, ServerConnection, serve

from tests.conftest import FAST_HEALTH, _stop_and_check, backends_env
from tests.helpers import per_label, raw_request, read_head, split_response
from tests.procs import LB, kill_once_checked, port_closed

READ_TIMEOUT = 1.0
IDLE_TIMEOUT = 3.0
MIB = 1024 * 1024


def echo(ws: ServerConnection) -> None:
    for message in ws:
        if message == "close-me":
            ws.close(1000, "server closes")
            return
        ws.send(message)


@pytest.fixture(scope="module")
def ws_server() -> Iterator[Server]:
    logging.getLogger("websockets").setLevel(logging.CRITICAL)  # health checks' bare connects
    server = serve(echo, "127.0.0.1", 0, max_size=4 * MIB, ping_interval=None)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    thread.join(timeout=10)


def lb_env(server: Server) -> dict[str, str]:
    port = server.socket.getsockname()[1]
    return {"GOL7LB_BACKENDS": f"http://127.0.0.1:{port}", **FAST_HEALTH,
            "GOL7LB_PROXY_READ_TIMEOUT": str(READ_TIMEOUT),
            "GOL7LB_PROXY_CLIENT_IDLE_TIMEOUT": str(IDLE_TIMEOUT)}


@pytest.fixture(scope="module")
def ws_lb(ws_server: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LB]:
    # 4 threads per worker: 50 tunnels only fit if a tunnel does not keep a pool thread
    lb = LB(lb_env(ws_server), log=tmp_path_factory.mktemp("ws") / "lb.log",
            extra_args=("--threads", "4"))
    try:
        yield lb.wait_ready()
    finally:
        _stop_and_check([lb])


def client(lb: LB, path: str = "/ws"):  # noqa: ANN201 - websockets' ClientConnection
    return connect(f"ws://127.0.0.1:{lb.port}{path}", max_size=4 * MIB, ping_interval=None,
                   open_timeout=10, close_timeout=5)


def test_text_and_binary_messages_both_ways(ws_lb):
    with client(ws_lb) as ws:
        ws.send("hello")
        assert ws.recv(timeout=10) == "hello"
        ws.send(b"\x00\x01\xff")
        assert ws.recv(timeout=10) == b"\x00\x01\xff"
        assert ws.response.status_code == 101
        assert ws.response.headers["X-Request-ID"]


def test_one_mib_messages(ws_lb):
    payload = bytes(range(256)) * (4 * 1024)
    text = "é" * (MIB // 2)
    with client(ws_lb) as ws:
        for _ in range(3):
            ws.send(payload)
            assert ws.recv(timeout=20) == payload
        ws.send(text)
        assert ws.recv(timeout=20) == text


@pytest.mark.lean_worker  # under gthread a tunnel holds one of its `threads` for good
def test_fifty_concurrent_tunnels(ws_lb):
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(client(ws_lb)) for _ in range(50)]
        for i, ws in enumerate(sockets):
            ws.send(f"tunnel {i}")
        assert [ws.recv(timeout=20) for ws in sockets] == [f"tunnel {i}" for i in range(50)]
        # and plain requests are still served meanwhile
        assert split_response(raw_request(ws_lb.port, b"GET / HTTP/1.1\r\nHost: x\r\n"
                                          b"Connection: close\r\n\r\n"))[0] in (400, 426)


def test_close_from_the_client(ws_lb):
    with client(ws_lb) as ws:
        ws.send("x")
        assert ws.recv(timeout=10) == "x"
        ws.close(1000, "client done")
        assert ws.protocol.close_rcvd.code == 1000  # the server's answer came back through


def test_close_from_the_server(ws_lb):
    with client(ws_lb) as ws:
        ws.send("close-me")
        with pytest.raises(ConnectionClosedOK):
            ws.recv(timeout=10)
        assert ws.protocol.close_rcvd.code == 1000
        assert ws.protocol.close_rcvd.reason == "server closes"


def test_read_timeout_does_not_cut_an_open_tunnel_but_idle_timeout_does(ws_lb):
    with client(ws_lb) as ws:
        time.sleep(READ_TIMEOUT * 2)  # silent longer than read_timeout
        ws.send("still here")
        assert ws.recv(timeout=10) == "still here"
        started = time.monotonic()
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=IDLE_TIMEOUT + 5)
        assert IDLE_TIMEOUT - 0.5 < time.monotonic() - started < IDLE_TIMEOUT + 3


def test_a_refused_upgrade_is_relayed_and_the_connection_closed(ws_lb):
    answer = raw_request(ws_lb.port, b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                         b"Connection: Upgrade\r\n\r\n")  # no Sec-WebSocket-Key: refused
    status, _, _ = split_response(answer)
    assert 400 <= status < 500


@pytest.mark.stop_behaviour  # stock gthread was seen to cut open tunnels on TERM
def test_term_gives_open_tunnels_the_graceful_timeout(ws_server, lb_factory):
    lb = lb_factory(lb_env(ws_server))
    with client(lb) as ws:
        ws.send("before")
        assert ws.recv(timeout=10) == "before"
        lb.signal(signal.SIGTERM)
        deadline = time.monotonic() + 5
        while not port_closed(lb.port):
            assert time.monotonic() < deadline, "new connections still accepted after TERM"
            time.sleep(0.05)
        ws.send("during drain")
        assert ws.recv(timeout=10) == "during drain"
    assert lb.wait(timeout=20) == 0
    assert lb.leftovers() == []


def upgrade_status(port: int, timeout: float = 10.0) -> int:
    """The status a WebSocket handshake through the LB gets (the connection then closes)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                  b"Sec-WebSocket-Version: 13\r\n\r\n")
        head = read_head(s)
    return int(head.split(b" ", 2)[1]) if head else 0


@pytest.mark.parametrize("retry_on", ["timeout", "connect-failure"])
def test_upgrades_follow_retry_on_and_count_retries(ws_server, lb_factory, backend_factory,
                                                    retry_on):
    doomed = backend_factory()
    live = ws_server.socket.getsockname()[1]
    lb = lb_factory({**lb_env(ws_server), "GOL7LB_BACKENDS": backends_env([doomed.port, live]),
                     "GOL7LB_HEALTH_INTERVAL": "60", "GOL7LB_PROXY_RETRY_ON": retry_on})
    dead = kill_once_checked(lb, doomed)
    statuses = [upgrade_status(lb.port) for _ in range(6)]
    retries = per_label(lb, "gol7lb_retries_total", "backend")
    if retry_on == "timeout":  # the dead one's turns fail, and nothing else is tried
        assert sorted(set(statuses)) == [101, 502], statuses
        assert retries.get(f"127.0.0.1:{dead}", 0) == 0
    else:
        assert statuses == [101] * 6
        assert retries[f"127.0.0.1:{dead}"] >= 1, retries


def test_an_upgrade_waits_queue_timeout_for_a_backend_at_max_connections(ws_server, lb_factory):
    lb = lb_factory({**lb_env(ws_server), "GOL7LB_PROXY_MAX_CONNECTIONS": "1",
                     "GOL7LB_PROXY_QUEUE_TIMEOUT": "10"})
    answer: list[tuple[int, float]] = []
    with client(lb) as first:
        first.send("hold")
        assert first.recv(timeout=10) == "hold"
        started = time.monotonic()
        waiter = threading.Thread(
            target=lambda: answer.append((upgrade_status(lb.port, 20), time.monotonic())))
        waiter.start()
        time.sleep(0.5)  # the second upgrade is queued meanwhile
        assert not answer, answer
    waiter.join(20)
    status, at = answer[0]
    assert status == 101
    assert at - started >= 0.5
