"""Each pool has its own rotation, global across workers: traffic to other pools never skews
it (issue 14, item 2). Through a real LB with two workers, and on the control state that
gives each pool its rotation cell."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pytest
import requests

from gol7lb import control as control_module
from gol7lb.config import load_settings
from gol7lb.control import ControlError, ControlState
from gol7lb.counters import SharedCounters, rotation_cell
from gol7lb.hosts import HostTable
from tests.helpers import config, port_of


def pools_toml(a: list[int], b: list[int], name: str = "b") -> str:
    """The default pool over `a`, pool `name` over `b`, reached under /b/."""
    text = "".join(f'[[backends]]\nurl = "http://127.0.0.1:{p}"\n' for p in a)
    text += f"[pools.{name}]\n" + "".join(
        f'[[pools.{name}.backends]]\nurl = "http://127.0.0.1:{p}"\n' for p in b)
    return text + (f'[[routes]]\npath_prefix = "/b/"\npool = "{name}"\nstrip_prefix = true\n'
                   '[health]\ninterval = 60.0\n')


def within_one(served: Counter[int], ports: list[int], n: int) -> bool:
    """N requests over k equal backends: each gets N/k plus or minus one."""
    return sum(served[p] for p in ports) == n and \
        all(abs(served[p] - n / len(ports)) <= 1 for p in ports)


def test_interleaved_pools_each_keep_an_even_rotation_across_workers(
        lb_factory, backend_factory, tmp_path):
    a = [backend_factory().port for _ in range(2)]
    b = [backend_factory().port for _ in range(3)]
    lb = lb_factory({**config(tmp_path, pools_toml(a, b)), "WEB_CONCURRENCY": "2"})
    close = {"Connection": "close"}  # new connections: both workers serve
    rng = random.Random(14)
    for pattern in ("alternate", "random"):
        served: Counter[int] = Counter()
        counts: Counter[bool] = Counter()
        for i in range(120):
            to_b = i % 2 == 1 if pattern == "alternate" else rng.random() < 0.5
            path = "/b/" if to_b else "/"
            counts[to_b] += 1
            answer = requests.get(lb.url + path, headers=close, timeout=10)
            assert answer.status_code == 200
            served[port_of(answer)] += 1
        assert within_one(served, a, counts[False]), (pattern, served, a)
        assert within_one(served, b, counts[True]), (pattern, served, b)


def publish(state: ControlState, tmp_path: Path, text: str) -> dict[str, int]:
    """A reload with this configuration; the pool slots it gives."""
    state.publish_config(load_settings(config(tmp_path, text)), 0.0)
    snapshot = state.snapshot()
    assert snapshot is not None
    return snapshot.pool_slots


def test_a_pool_keeps_its_rotation_cell_across_reloads_and_a_new_one_gets_a_free_cell(
        tmp_path):
    counters = SharedCounters()
    state = ControlState(counters, HostTable(4, lock_path=str(tmp_path / "hosts.lock")),
                         str(tmp_path / "state.pickle"))
    first = publish(state, tmp_path, pools_toml([9001], [9002]))
    assert sorted(first) == ["b", "default"]
    assert len(set(first.values())) == 2
    counters.take_ticket(rotation_cell(first["b"]))
    second = publish(state, tmp_path, pools_toml([9001], [9002], name="c"))
    assert second["default"] == first["default"]
    assert second["c"] not in (first["default"], first["b"])  # b's cell is not reused yet
    third = publish(state, tmp_path, pools_toml([9001], [9002]))  # b is back: its own cell
    assert third["b"] == first["b"]
    assert counters.take_ticket(rotation_cell(first["b"])) == 1
    assert counters.take_ticket(rotation_cell(second["c"])) == 0


def test_when_every_rotation_cell_is_taken_a_departed_pool_gives_up_its_own(tmp_path,
                                                                            monkeypatch):
    monkeypatch.setattr(control_module, "POOL_SLOTS", 2)
    counters = SharedCounters()
    state = ControlState(counters, HostTable(4, lock_path=str(tmp_path / "hosts.lock")),
                         str(tmp_path / "state.pickle"))
    first = publish(state, tmp_path, pools_toml([9001], [9002]))
    counters.take_ticket(rotation_cell(first["b"]))
    second = publish(state, tmp_path, pools_toml([9001], [9002], name="c"))
    assert second == {"default": first["default"], "c": first["b"]}
    assert counters.take_ticket(rotation_cell(second["c"])) == 0  # a fresh rotation
    text = pools_toml([9001], [9002]) + '[pools.d]\n[[pools.d.backends]]\nurl = "http://h:1"\n'
    with pytest.raises(ControlError, match="too many pools"):
        publish(state, tmp_path, text)
