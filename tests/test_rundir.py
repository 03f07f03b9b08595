"""The instance's private directory under long XDG_RUNTIME_DIR / TMPDIR: Unix socket paths
(at most 107 bytes) must still fit, or use another way."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from tests.conftest import backends_env
from tests.procs import ROOT, free_port

UNIX_PATH_MAX = 107


def long_dir(base: Path, length: int) -> Path:
    """An existing directory whose path is `length` characters long."""
    path = base / ("d" * max(1, length - len(str(base)) - 1))
    path.mkdir(parents=True)
    assert len(str(path)) == length
    return path


@pytest.mark.parametrize("length", [100, 150])
def test_the_lb_starts_and_proxies_under_long_runtime_and_temp_dirs(lb_factory, backend_factory,
                                                                    tmp_path, length):
    backend = backend_factory()
    runtime, temp = long_dir(tmp_path / "run", length), long_dir(tmp_path / "tmp", length)
    lb = lb_factory({"GOL7LB_BACKENDS": backends_env([backend.port]),
                     "XDG_RUNTIME_DIR": str(runtime), "TMPDIR": str(temp)})
    assert requests.get(lb.url + "/", timeout=5).text == f"backend {backend.port}\n"
    assert requests.get(lb.admin_url + "/healthz", timeout=5).status_code == 200
    assert "AF_UNIX path too long" not in lb.output()


CONF_PROBE = """
import json, runpy
ns = runpy.run_path("gunicorn.conf.py")
print(json.dumps({"control_socket": ns.get("control_socket"),
                  "disabled": bool(ns.get("control_socket_disable"))}))
"""


@pytest.mark.parametrize("length", [20, 100, 150])
def test_gunicorn_s_control_socket_path_fits_or_is_off(tmp_path, length):
    directory = long_dir(tmp_path / "run", length) if length > 40 else tmp_path
    env = {k: v for k, v in os.environ.items() if not k.startswith("GOL7LB_")}
    env.update(XDG_RUNTIME_DIR=str(directory), TMPDIR=str(directory), PORT=str(free_port()),
               GOL7LB_BACKENDS="http://127.0.0.1:9")
    result = subprocess.run([sys.executable, "-c", CONF_PROBE], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    conf = json.loads(result.stdout.strip().splitlines()[-1])
    if length <= 40:
        assert not conf["disabled"] and conf["control_socket"].startswith(str(directory))
    assert conf["disabled"] or len(os.fsencode(conf["control_socket"])) <= UNIX_PATH_MAX, conf
