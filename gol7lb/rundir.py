"""The instance's private directory: the Manager's socket, the saved control state and the
Prometheus multiprocess files.

Created by the master when gunicorn reads its configuration, before prometheus_client is
imported anywhere (it reads `PROMETHEUS_MULTIPROC_DIR` at import), so every process it
forks or spawns inherits the same directory. It is new and empty at each start, private to
the instance (two LBs on one machine never mix their metrics or state), and removed when the
master exits; a directory left by a master that was killed is removed by the next start.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import tempfile
from pathlib import Path

METRICS_ENV = "PROMETHEUS_MULTIPROC_DIR"
_PREFIX = "gol7lb-"
_state: dict[str, str] = {}


def _base() -> str | None:
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    return runtime if runtime and os.access(runtime, os.W_OK) else None


def prepare() -> str:
    """The directory for this master (idempotent: gunicorn re-reads its config on HUP)."""
    if _state.get("pid") == str(os.getpid()):
        return _state["dir"]
    base = _base()
    _remove_stale(Path(base or tempfile.gettempdir()))
    path = tempfile.mkdtemp(prefix=f"{_PREFIX}{os.getpid()}-", dir=base)
    os.mkdir(os.path.join(path, "metrics"))
    os.environ[METRICS_ENV] = os.path.join(path, "metrics")
    _state.update(dir=path, pid=str(os.getpid()))
    atexit.register(remove)
    return path


def path(name: str) -> str:
    return os.path.join(_state["dir"], name)


def remove() -> None:
    """Only the master that made it removes it (forked workers inherit atexit handlers)."""
    if _state.get("pid") == str(os.getpid()):
        shutil.rmtree(_state["dir"], ignore_errors=True)


def _remove_stale(base: Path) -> None:
    for entry in base.glob(f"{_PREFIX}*-*"):
        pid_text = entry.name[len(_PREFIX):].split("-", 1)[0]
        if not pid_text.isdigit() or not entry.is_dir():
            continue
        try:
            os.kill(int(pid_text), 0)
        except ProcessLookupError:
            with contextlib.suppress(OSError):
                shutil.rmtree(entry)
        except PermissionError:
            pass
