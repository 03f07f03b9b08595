"""Health records are a typed value (issue 15, item 4): a state file written before that still
loads, the saved file keeps its format, /status shows the same keys and values, and a record
carries the rise/fall state a restarted supervisor continues from."""

from __future__ import annotations

import pickle
from pathlib import Path

from gol7lb.admin.status import backend_entries
from gol7lb.config import load_settings
from gol7lb.control import ControlState
from gol7lb.counters import SharedCounters
from gol7lb.health import CheckResult, HealthRecord
from gol7lb.hosts import HostTable
from tests.helpers import config

A, B = "127.0.0.1:9001", "127.0.0.1:9002"
TOML = f'[[backends]]\nurl = "http://{A}"\n[[backends]]\nurl = "http://{B}"\n'
# What ControlState._save wrote before (and writes now): liveness is persisted, the rest of a
# record (streaks, checks, the last result) is not.
SAVED_KEYS = {"settings", "config_generation", "loaded_at", "last_error", "added", "removed",
              "slots", "alive", "drained", "ejected", "ejection_ended", "discovered",
              "discovery", "pool_slots"}


def control(tmp_path: Path) -> tuple[ControlState, HostTable]:
    hosts = HostTable(4, lock_path=str(tmp_path / "hosts.lock"))
    return ControlState(SharedCounters(), hosts, str(tmp_path / "state.pickle")), hosts


def test_a_state_file_from_before_typed_records_loads_and_status_shows_the_same(tmp_path):
    old = {"settings": load_settings(config(tmp_path, TOML)), "config_generation": 3,
           "loaded_at": 5.0, "last_error": None, "added": {}, "removed": set(),
           "slots": {A: 0, B: 1}, "alive": {A: True, B: False}, "drained": {A},
           "ejected": {}, "ejection_ended": {}, "discovered": {}, "discovery": {},
           "pool_slots": {"default": 0}}
    assert set(old) == SAVED_KEYS
    (tmp_path / "state.pickle").write_bytes(pickle.dumps(old))
    state, hosts = control(tmp_path)
    snapshot = state.snapshot()
    assert snapshot is not None and snapshot.config_generation == 3
    assert snapshot.health == {A: HealthRecord(True), B: HealthRecord(False)}
    assert snapshot.alive(A) and not snapshot.alive(B)
    entries = {e["id"]: e for e in backend_entries(snapshot, hosts)}
    assert {i: (e["alive"], e["state"], e["last_check"], e["since"], e["checks"])
            for i, e in entries.items()} == {A: (True, "drained", None, None, 0),
                                             B: (False, "down", None, None, 0)}

    result = CheckResult(True, "HTTP 200", 0.25, 1000.0)
    state.publish_health(B, HealthRecord(True, 1, 0, 999.0, 999.0, 7, result), True)
    saved = pickle.loads((tmp_path / "state.pickle").read_bytes())
    assert set(saved) == SAVED_KEYS and saved["alive"] == {A: True, B: True}
    snapshot = state.snapshot()
    assert snapshot is not None
    entry = next(e for e in backend_entries(snapshot, hosts) if e["id"] == B)
    assert (entry["alive"], entry["state"], entry["since"], entry["checks"]) == (
        True, "up", 999.0, 7)
    assert entry["last_check"] == {"ok": True, "detail": "HTTP 200", "duration": 0.25,
                                   "at": 1000.0}


def test_a_backend_without_a_record_is_up_and_never_checked(tmp_path):
    state, hosts = control(tmp_path)
    state.publish_config(load_settings(config(tmp_path, TOML)), 0.0)
    snapshot = state.snapshot()
    assert snapshot is not None
    snapshot.health.clear()  # as in a worker's start-up snapshot taken before any record
    assert snapshot.health_of(A) == HealthRecord() and snapshot.alive(A)
    entry = backend_entries(snapshot, hosts)[0]
    assert (entry["alive"], entry["last_check"], entry["since"], entry["checks"]) == (
        True, None, None, 0)


def test_a_record_carries_the_rise_fall_state_across_the_manager():
    up = HealthRecord.initial(True, rise=3, fall=2)  # at start: up but unconfirmed
    assert up.since is not None and up.last_check is None
    tracker = up.tracker(3, 2)
    assert tracker.record(False) and not tracker.alive  # the first failure takes it out
    new = pickle.loads(pickle.dumps(HealthRecord.initial(False, rise=3, fall=2)))
    tracker = new.tracker(3, 2)  # added later: down until its first check passes
    assert tracker.record(True) and tracker.alive
    checked = HealthRecord(True, 4, 0, 1.0, 1.0, 9, CheckResult(True, "connected", 0.001, 2.0))
    assert pickle.loads(pickle.dumps(checked)) == checked
    assert len(pickle.dumps(checked, protocol=pickle.HIGHEST_PROTOCOL)) < 400
