"""Fixtures that start real processes on free loopback ports and prove they are gone after."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from tests import procs
from tests.edgebackend import EdgeBackend
from tests.procs import LB, Proc, free_port, start_backend

# Fast health checks so tests see liveness changes in about a second.
FAST_HEALTH = {"GOL7LB_HEALTH_INTERVAL": "0.2", "GOL7LB_HEALTH_TIMEOUT": "0.5",
               "GOL7LB_HEALTH_RISE": "2", "GOL7LB_HEALTH_FALL": "2"}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--lb-worker", choices=("lean", "gthread", "stock"), default="lean",
                     help="worker class of every LB the tests start: lean (gol7lb's "
                     "ProxyWorker, the default), gthread (gol7lb.gthread.ThreadProxyWorker) "
                     "or stock (gunicorn's gthread as it comes)")


def pytest_configure(config: pytest.Config) -> None:
    procs.WORKER_CLASS = config.getoption("--lb-worker")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if procs.WORKER_CLASS == "lean":
        return
    skip = pytest.mark.skip(reason="behaviour of gol7lb's own worker (--lb-worker lean)")
    skip_stop = pytest.mark.skip(reason="stop behaviour of gol7lb's worker classes, not stock")
    for item in items:
        if "lean_worker" in item.keywords:
            item.add_marker(skip)
        elif "stop_behaviour" in item.keywords and procs.WORKER_CLASS == "stock":
            item.add_marker(skip_stop)


def backends_env(ports: list[int]) -> str:
    return ", ".join(f"http://127.0.0.1:{p}" for p in ports)


def _stop_and_check(procs: Sequence[Proc]) -> None:
    for proc in procs:
        proc.stop()
    left = [pid for proc in procs for pid in proc.leftovers()]
    assert not left, f"processes left running: {left}"


@pytest.fixture
def backend_factory(tmp_path: Path) -> Iterator[Callable[..., Proc]]:
    started: list[Proc] = []

    def start(port: int | None = None) -> Proc:
        proc = start_backend(port or free_port(), tmp_path)
        started.append(proc)
        return proc

    yield start
    _stop_and_check(started)


@pytest.fixture
def three_backends(backend_factory: Callable[..., Proc]) -> list[Proc]:
    return [backend_factory() for _ in range(3)]


@pytest.fixture
def lb_factory(tmp_path: Path) -> Iterator[Callable[..., LB]]:
    started: list[LB] = []

    def start(env: dict[str, str] | None = None, ready: bool = True,
              extra_args: tuple[str, ...] = (), new_session: bool = False,
              unset: tuple[str, ...] = ()) -> LB:
        lb = LB(dict(env or {}), log=tmp_path / f"lb-{len(started)}.log", extra_args=extra_args,
                new_session=new_session, unset=unset)
        started.append(lb)
        return lb.wait_ready() if ready else lb

    yield start
    _stop_and_check(started)


@pytest.fixture
def lb(lb_factory: Callable[..., LB], three_backends: list[Proc]) -> LB:
    """An LB with fast health checks in front of three demo backends."""
    ports = [b.port for b in three_backends]
    return lb_factory({"GOL7LB_BACKENDS": backends_env(ports), **FAST_HEALTH})


@pytest.fixture(scope="module")
def shared_lb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LB]:
    """One LB and three backends for a whole module of read-only behaviour tests."""
    tmp = tmp_path_factory.mktemp("shared")
    backends = [start_backend(free_port(), tmp) for _ in range(3)]
    lb = LB({"GOL7LB_BACKENDS": backends_env([b.port for b in backends]), **FAST_HEALTH},
            log=tmp / "lb.log")
    lb.backend_ports = [b.port for b in backends]  # type: ignore[attr-defined]
    try:
        yield lb.wait_ready()
    finally:
        _stop_and_check([lb, *backends])


@pytest.fixture
def edge() -> Iterator[Callable[..., EdgeBackend]]:
    """Recording backends that speak TLS and/or PROXY (tests/edgebackend.py), closed after."""
    started: list[EdgeBackend] = []

    def start(*args: object, **kwargs: object) -> EdgeBackend:
        backend = EdgeBackend(*args, **kwargs)  # type: ignore[arg-type]
        started.append(backend)
        return backend

    yield start
    for backend in started:
        backend.close()
