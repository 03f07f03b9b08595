"""Request mirroring (`mirror = { pool = "shadow", percent = 10 }` on a route): a copy of a
request goes to another pool off the request path, and its answer is discarded.

The request thread only samples, takes the shadow pool's pick context and puts the copy (its
head and held body) on a bounded per-worker queue; a few background threads of the worker
send it to a backend the pool's policy picks, read the answer away and count the result. A
full queue drops the copy (counted): a slow or dead shadow can fill the queue, never hold a
client's request. Results: `gol7lb_mirror_requests_total{result}`.
"""

from __future__ import annotations

import logging
import queue
import random
import socket
import threading
from dataclasses import dataclass
from typing import Protocol

from gol7lb.balancer import PickContext
from gol7lb.pooltable import PoolRuntime
from gol7lb.upstream import IdleConnections, UpstreamClosed, read_response_head

log = logging.getLogger("gol7lb.proxy")

QUEUE_SIZE = 128  # copies waiting per worker; more are dropped
THREADS = 2  # senders per worker: one slow copy does not stop the others
# result labels of gol7lb_mirror_requests_total
OK, ERROR, DROPPED, TOO_LARGE, SKIPPED = "ok", "error", "dropped", "too_large", "skipped"


class Counts(Protocol):
    """Where results are counted (metrics.RequestRecorder)."""

    def mirror(self, result: str) -> None: ...


@dataclass(frozen=True, slots=True)
class Copy:
    """One mirrored request, ready to send: nothing in it refers to the client."""

    pool: PoolRuntime
    context: PickContext
    connections: dict[str, IdleConnections]
    method: str
    head: bytes
    body: bytes


class Mirror:
    """The worker's queue of copies and the threads that send them (started on first use,
    in the worker process)."""

    def __init__(self, counts: Counts, threads: int = THREADS,
                 size: int = QUEUE_SIZE) -> None:
        self.counts = counts
        self.threads = threads
        self._queue: queue.Queue[Copy] = queue.Queue(size)
        self._started = False
        self._lock = threading.Lock()

    @staticmethod
    def sampled(percent: float) -> bool:
        """This request is among the `percent` that are copied."""
        return percent >= 100.0 or random.random() * 100.0 < percent

    def submit(self, copy: Copy) -> None:
        """Queue a copy, or drop it (counted) when the queue is full. Never blocks."""
        if not self._started:
            self._start()
        try:
            self._queue.put_nowait(copy)
        except queue.Full:
            self.counts.mirror(DROPPED)

    def _start(self) -> None:
        with self._lock:
            if self._started:
                return
            self._started = True
            for i in range(self.threads):
                threading.Thread(target=self._run, name=f"gol7lb-mirror-{i}",
                                 daemon=True).start()

    def _run(self) -> None:
        while True:
            copy = self._queue.get()
            try:
                result = send(copy)
            except Exception as e:  # a shadow's failure is only counted (and logged at debug)
                log.debug("mirror copy to pool %s failed: %s", copy.pool.name,
                          e or type(e).__name__)
                result = ERROR
            self.counts.mirror(result)


def send(copy: Copy) -> str:
    """Send one copy to the first backend of the pool's order and read its answer away."""
    order = copy.pool.policy.order(copy.context)
    if not order:
        return ERROR  # no backend of the shadow pool is up
    connections = copy.connections[order[0].id]
    sock, reused = connections.acquire()
    try:
        try:
            keep = _exchange(sock, copy)
        except (ConnectionError, UpstreamClosed):
            if not reused:
                raise
            sock.close()  # a kept-alive socket the backend had closed: once more, fresh
            sock = connections.connect()
            keep = _exchange(sock, copy)
    except BaseException:
        sock.close()
        raise
    if keep:
        connections.release(sock)
    else:
        sock.close()
    return OK


def _exchange(sock: socket.socket, copy: Copy) -> bool:
    """One request and its whole answer, discarded; True when the socket may be kept."""
    sock.sendall(copy.head + copy.body)
    response = read_response_head(sock, copy.method)
    while response.read_block():
        pass
    response.release()
    return response.keep_alive and response.complete
