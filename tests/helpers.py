"""Helpers the test modules share that are not about processes (tests/procs.py has those):
raw HTTP on a socket, a hand-written backend, the LB's answers and metrics, a config file."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from pathlib import Path

import requests
from prometheus_client.parser import text_string_to_metric_families


def config(tmp_path: Path, text: str) -> dict[str, str]:
    path = tmp_path / "lb.toml"
    path.write_text(text)
    return {"GOL7LB_CONFIG": str(path)}


def port_of(response: requests.Response) -> int:
    return int(response.headers["X-Backend-Port"])


def raw_request(port: int, data: bytes, timeout: float = 10.0) -> bytes:
    """Send bytes as they are and read until the server closes (requests normalise targets)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def split_response(raw: bytes) -> tuple[int, dict[str, list[str]], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers: dict[str, list[str]] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.setdefault(name.strip().lower(), []).append(value.strip())
    return int(lines[0].split()[1]), headers, body


def read_head(s: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(1)
        if not chunk:
            break
        data += chunk
    return data


def read_exactly(s: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


def header(doc: dict, name: str) -> list[str]:
    return [v for k, v in doc["headers"] if k.lower() == name.lower()]


class RawBackend:
    """A 'backend' on a loopback port that answers each request with `answer(conn)`, written
    byte by byte as a test needs it (split heads, resets); health checks only connect."""

    def __init__(self, answer: Callable[[socket.socket], None]) -> None:
        self.answer = answer
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.requests = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(10)
            try:
                while conn.recv(65536):
                    self.requests += 1
                    self.answer(conn)
            except OSError:
                pass

    def close(self) -> None:
        self.sock.close()


def scrape_text(lb) -> str:
    answer = requests.get(lb.admin_url + "/metrics", timeout=10)
    assert answer.status_code == 200
    assert answer.headers["Content-Type"].startswith("text/plain")
    return answer.text


def per_label(lb, sample: str, label: str, **labels: str) -> dict[str, float]:
    totals: dict[str, float] = {}
    for f in text_string_to_metric_families(scrape_text(lb)):
        for s in f.samples:
            if s.name == sample and labels.items() <= s.labels.items():
                key = s.labels[label]
                totals[key] = totals.get(key, 0.0) + s.value
    return totals
