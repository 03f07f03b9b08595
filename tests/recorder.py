"""A backend inside the test process that records every byte it receives and answers `ok`.

For tests that must prove something never reached a backend (smuggling cases): a real
server on a free loopback port, stopped by the test; health checks (TCP connects) send no
bytes, so anything recorded came from the proxy.
"""

from __future__ import annotations

import socket
import threading

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Type: text/plain\r\n\r\nok\n"


class Recorder:
    def __init__(self) -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(128)
        self.port = self.listener.getsockname()[1]
        self.received: list[bytes] = []
        self._lock = threading.Lock()
        self._stop = False
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(sock,), daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        sock.settimeout(30)
        buffer = b""
        with sock:
            while True:
                try:
                    data = sock.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                with self._lock:
                    self.received.append(data)
                buffer += data
                while b"\r\n\r\n" in buffer:  # answer each complete head (bodies: Content-Length)
                    head, _, buffer = buffer.partition(b"\r\n\r\n")
                    length = 0
                    for line in head.split(b"\r\n")[1:]:
                        name, _, value = line.partition(b":")
                        if name.strip().lower() == b"content-length":
                            length = int(value)
                    buffer = buffer[length:]
                    sock.sendall(OK)

    def data(self) -> bytes:
        with self._lock:
            return b"".join(self.received)

    def clear(self) -> None:
        with self._lock:
            self.received.clear()

    def close(self) -> None:
        self._stop = True
        self.listener.close()
