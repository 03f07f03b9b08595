"""The instance's private directory: the Manager's socket, the saved control state and the
Prometheus multiprocess files.

Created by the master when gunicorn reads its configuration, before prometheus_client is
imported anywhere (it reads `PROMETHEUS_MULTIPROC_DIR` at import), so every process it
forks or spawns inherits the same directory. It is new and empty at each start, private to
the instance (two LBs on one machine never mix their metrics or state), and removed when the
master exits; a directory left by a master that was killed is removed by the next start.

Unix socket paths are limited to 107 bytes, so it goes where its sockets fit: under
`$XDG_RUNTIME_DIR`, else the temporary directory (`$TMPDIR`); when neither fits, the Manager
listens on an abstract socket name and gunicorn's control socket is off.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

METRICS_ENV = "PROMETHEUS_MULTIPROC_DIR"
_PREFIX = "gol7lb-"
UNIX_PATH_MAX = 107  # bytes in a Unix socket path (sun_path less its terminating NUL)
_LONGEST_SOCKET = "manager.sock"  # and "gunicorn.ctl": the same length
_state: dict[str, str] = {}


def _base() -> str | None:
    """$XDG_RUNTIME_DIR when it is writable and short enough for the sockets; otherwise the
    temporary directory ($TMPDIR) when that one is; otherwise $XDG_RUNTIME_DIR all the same
    (None: the temporary directory), and the sockets go elsewhere (socket_address)."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    runtime = runtime if runtime and os.access(runtime, os.W_OK) else None
    for base in (runtime, tempfile.gettempdir()):
        if base is not None and _socket_fits(base):
            return base
    return runtime


def _socket_fits(base: str) -> bool:
    """Would `base/gol7lb-PID-XXXXXXXX/manager.sock` fit in a Unix socket address?"""
    directory = os.path.join(base, f"{_PREFIX}{os.getpid()}-{'x' * 8}")
    return len(os.fsencode(os.path.join(directory, _LONGEST_SOCKET))) <= UNIX_PATH_MAX


def socket_address(name: str, abstract: bool = True) -> str | None:
    """Where a Unix socket of this instance listens: `name` in the private directory if that
    path fits; else, if `abstract` and on Linux, a name in the abstract namespace unique to
    this instance (no file; multiprocessing's authentication key still guards it); else None.
    """
    path = os.path.join(_state["dir"], name)
    if len(os.fsencode(path)) <= UNIX_PATH_MAX:
        return path
    if abstract and sys.platform.startswith("linux"):
        return f"\0{os.path.basename(_state['dir'])}-{name}"
    return None


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
