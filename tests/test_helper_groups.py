"""Helpers never take a process-group signal meant for the master, even while they start."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from tests.conftest import backends_env
from tests.procs import wait_until


@pytest.mark.stop_behaviour
def test_a_group_term_right_after_start_stops_everything_without_restarts(lb_factory,
                                                                          backend_factory):
    """What honcho does when it stops: TERM to the whole group, here as early as the master
    handles signals, while the helpers it just spawned may still be importing."""
    backend = backend_factory()
    for _ in range(3):
        lb = lb_factory({"GOL7LB_BACKENDS": backends_env([backend.port])}, ready=False,
                        new_session=True)
        wait_until(lambda: "Listening at:" in lb.output(), timeout=30, interval=0.005)  # noqa: B023
        lb.tree()
        os.killpg(lb.pid, signal.SIGTERM)
        started = time.monotonic()
        try:
            lb.wait(timeout=20)
        except subprocess.TimeoutExpired:
            left = [" ".join(p.cmdline()) for p in lb.tree()]
            raise AssertionError(f"still running after 20s: {left}\n{lb.output()}") from None
        took = time.monotonic() - started
        assert lb.leftovers() == []
        log = lb.output()
        assert "restarting" not in log and "died" not in log, log
        assert "did not stop" not in log, log  # stopped by TERM, not by the KILL fallback
        assert took < 8, f"stopping took {took:.1f}s:\n{log}"  # helpers may still be importing
