"""Error-log lines of a real LB name the component that wrote them (`gol7lb.proxy`,
`gol7lb.supervisor`, ...), in every process, and `log.levels` sets a level per component, at
start and on reload."""

from __future__ import annotations

import json
import logging

import requests

from tests import procs
from tests.conftest import FAST_HEALTH, backends_env
from tests.procs import alive_map, kill_once_checked

HELPERS_START = 60.0  # spawned helpers have taken 15 s to log on a busy machine
NO_PASSIVE = {"GOL7LB_HEALTH_INTERVAL": "60", "GOL7LB_HEALTH_PASSIVE_FAILS": "0"}


def json_entries(lb: procs.LB) -> list[dict]:
    return [json.loads(line) for line in lb.output().split("\n") if line.startswith("{")]


def logged(lb: procs.LB, start: str) -> list[dict]:
    """The JSON error lines whose message starts with `start`."""
    return [e for e in json_entries(lb) if e.get("message", "").startswith(start)]


def wait_logged(lb: procs.LB, start: str, timeout: float = HELPERS_START) -> dict:
    return procs.wait_until(lambda: logged(lb, start), timeout)[0]


def test_json_error_lines_name_the_component_in_every_process(lb_factory):
    lb = lb_factory({"GOL7LB_BACKENDS": backends_env([procs.free_port()]),
                     "GOL7LB_LOG_FORMAT": "json", **FAST_HEALTH})
    procs.wait_until(lambda: not any(alive_map(lb).values()), timeout=10)
    assert requests.get(lb.url + "/", timeout=10).status_code == 503
    expected = {
        "no healthy backend in pool": "gol7lb.proxy",  # a worker
        "supervisor started": "gol7lb.supervisor",  # helpers
        "manager serving shared state": "gol7lb.manager",
        "started supervisor": "gol7lb.children",  # the master
        "gol7lb: listening on": "gol7lb.hooks",
    }
    for start, logger in expected.items():
        assert wait_logged(lb, start)["logger"] == logger, start
    # gunicorn's own events stay gunicorn's; everything else is a gol7lb component
    names = {e["logger"] for e in json_entries(lb) if "logger" in e}
    assert {n for n in names if not n.startswith("gol7lb.")} <= {"gunicorn.error"}, names
    ours = [e for e in json_entries(lb)
            if e.get("logger") == "gunicorn.error" and e["message"].startswith("gol7lb")]
    assert not ours, ours


def test_log_levels_set_a_level_per_component(lb_factory, backend_factory):
    live, doomed = backend_factory(), backend_factory()
    lb = lb_factory({"GOL7LB_BACKENDS": backends_env([doomed.port, live.port]),
                     "GOL7LB_LOG_FORMAT": "json", **NO_PASSIVE,
                     "GOL7LB_LOG_LEVELS": "gol7lb.supervisor=warning, gol7lb.proxy=debug"})
    wait_logged(lb, "manager serving shared state")
    kill_once_checked(lb, doomed)
    for _ in range(4):
        assert requests.get(lb.url + "/", headers={"Connection": "close"},
                            timeout=10).status_code == 200
    # a worker's debug line, which the default level (info) drops
    assert wait_logged(lb, f"backend 127.0.0.1:{doomed.port} failed", 10)["level"] == "debug"
    procs.wait_until(lambda: logged(lb, "started supervisor"), HELPERS_START)
    assert not logged(lb, "supervisor started")  # its info line, below warning


def test_a_reload_changes_the_levels(lb_factory, backend_factory, tmp_path):
    config = tmp_path / "gol7lb.toml"
    staged = tmp_path / "gol7lb.toml.new"
    config.write_text('[log]\nformat = "json"\n')
    live, doomed = backend_factory(), backend_factory()
    lb = lb_factory({"GOL7LB_BACKENDS": backends_env([doomed.port, live.port]),
                     "GOL7LB_CONFIG": str(config), **NO_PASSIVE})
    wait_logged(lb, "config watcher on")
    kill_once_checked(lb, doomed)
    failed = f"backend 127.0.0.1:{doomed.port} failed"

    def fail_over() -> list[dict]:
        """Requests that meet the dead backend first, then what they logged about it."""
        for _ in range(4):
            assert requests.get(lb.url + "/", headers={"Connection": "close"},
                                timeout=10).status_code == 200
        return logged(lb, failed)

    fail_over()
    procs.wait_until(lambda: "flags=UF" in lb.output() or '"flags": "UF' in lb.output(), 5)
    assert not logged(lb, failed)  # debug: below the default level

    staged.write_text('[log]\nformat = "json"\nlevels = ["gol7lb.proxy=debug"]\n')
    staged.replace(config)
    wait_logged(lb, "reload (gol7lb.toml changed)")
    assert procs.wait_until(fail_over, 10)[0]["logger"] == "gol7lb.proxy"


def test_set_levels_gives_a_logger_its_own_level_back_when_no_longer_named():
    from gol7lb import logfmt

    proxy, ours = logging.getLogger("gol7lb.proxy"), logging.getLogger("gol7lb")
    before = (proxy.level, ours.level)
    try:
        logfmt.set_levels(["gol7lb.proxy=debug", "gol7lb=ERROR"])
        assert (proxy.level, ours.level) == (logging.DEBUG, logging.ERROR)
        assert logfmt.current_levels() == ("gol7lb.proxy=debug", "gol7lb=error")
        logfmt.set_levels(["gol7lb.proxy=warning"])
        assert (proxy.level, ours.level) == (logging.WARNING, before[1])
    finally:
        logfmt.set_levels([])
    assert (proxy.level, ours.level) == before and logfmt.current_levels() == ()


def test_every_component_logger_is_listed_and_documented():
    import re
    from pathlib import Path

    from gol7lb import logfmt

    root = Path(__file__).resolve().parent.parent
    used = {name for path in (root / "gol7lb").rglob("*.py")
            for name in re.findall(r'getLogger\("([^"]+)"\)', path.read_text())}
    assert "gunicorn.error" not in used
    assert {n for n in used if n.startswith("gol7lb.")} == set(logfmt.LOGGERS)
    docs = (root / "docs" / "operations.md").read_text()
    for name, meaning in logfmt.LOGGERS.items():
        assert f"| `{name}` | {meaning} |" in docs
