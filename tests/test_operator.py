"""What an operator meets first: `python -m gol7lb check`, a port already served, the start log."""

from __future__ import annotations

import subprocess
import sys

import requests

from tests.conftest import backends_env
from tests.procs import ROOT, free_port


def check(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import os
    full = {k: v for k, v in os.environ.items() if not k.startswith("GOL7LB_")}
    full.update(env or {})
    return subprocess.run([sys.executable, "-m", "gol7lb", "check", *args], cwd=ROOT, env=full,
                          capture_output=True, text=True, timeout=60)


def test_check_accepts_a_good_file_and_names_what_it_found(tmp_path):
    path = tmp_path / "lb.toml"
    path.write_text('[[backends]]\nurl = "http://127.0.0.1:9001"\n'
                    '[[backends]]\nurl = "http://127.0.0.1:9002"\nweight = 2\n')
    result = check(str(path))
    assert result.returncode == 0, result.stderr
    assert "configuration OK: 2 backends in 1 pools" in result.stdout
    result = check(env={"GOL7LB_CONFIG": str(path)})  # FILE defaults to $GOL7LB_CONFIG
    assert result.returncode == 0 and "2 backends" in result.stdout


def test_check_refuses_a_bad_file_with_the_start_s_one_line(tmp_path):
    path = tmp_path / "lb.toml"
    for text, words in (("[[backends]\n", "cannot parse"),
                        ('[[backends]]\nurl = "http://127.0.0.1:9001"\nweight = 0\n', "weight"),
                        ('[health]\nrise = 0\n', "health.rise"),
                        ('[admin]\nbind = "0.0.0.0:8404"\n', "admin.token")):
        path.write_text(text)
        result = check(str(path))
        assert result.returncode == 2
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("gol7lb: ") and words in lines[0], lines
        assert "Traceback" not in result.stderr
    result = check(str(tmp_path / "missing.toml"))
    assert result.returncode == 2 and "cannot read" in result.stderr
    result = check("a", "b")
    assert result.returncode == 2 and "usage" in result.stderr


def test_a_second_instance_on_a_served_port_or_admin_port_refuses_to_start(lb_factory,
                                                                           backend_factory):
    backend = backend_factory()
    first = lb_factory({"GOL7LB_BACKENDS": backends_env([backend.port])})
    assert f"Listening at: http://0.0.0.0:{first.port}" in first.output()
    assert f"listening on http://0.0.0.0:{first.port} with 2 workers" in first.output()
    second = lb_factory({"GOL7LB_BACKENDS": backends_env([backend.port]),
                         "PORT": str(first.port), "GOL7LB_ADMIN_BIND": f"127.0.0.1:{free_port()}"},
                        ready=False)
    assert second.wait(timeout=30) == 2
    output = second.output().strip()
    assert output.splitlines() == [
        f"gol7lb: PORT {first.port} is already in use (Address already in use): another "
        "GoL7-LB instance or another server listens there; stop it or set another PORT"]
    # Another PORT, but the first one's admin address: the same, naming GOL7LB_ADMIN_BIND.
    third = lb_factory({"GOL7LB_BACKENDS": backends_env([backend.port]),
                        "GOL7LB_ADMIN_BIND": f"127.0.0.1:{first.admin_port}"}, ready=False)
    assert third.wait(timeout=30) == 2
    assert third.output().strip().splitlines() == [
        f"gol7lb: admin.bind '127.0.0.1:{first.admin_port}' (GOL7LB_ADMIN_BIND) cannot be "
        "bound: Address already in use; another GoL7-LB instance or another server may listen "
        "there: stop it, or set another address with GOL7LB_ADMIN_BIND (\"\" turns the admin "
        "listener off)"]
    for _ in range(6):  # the first one keeps all the traffic
        assert requests.get(first.url + "/", timeout=5).status_code == 200
