"""ruff and mypy (both configured in pyproject.toml) find nothing: they run in the suite, so
the test command fails on a lint or type error, while `bash tests/run.sh -q tests/x.py` still
runs just the file asked for."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib

from tests.procs import ROOT


def run_module(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *argv], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, stdin=subprocess.DEVNULL)


def test_ruff_finds_nothing() -> None:
    result = run_module("ruff", "check", "gol7lb", "tests", "backend")
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_finds_nothing_in_every_module_it_is_given() -> None:
    result = run_module("mypy")
    assert result.returncode == 0, result.stdout + result.stderr
    folders = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mypy"]["files"]
    modules = sum(len(list((ROOT / folder).rglob("*.py"))) for folder in folders)
    checked = re.search(r"no issues found in (\d+) source files", result.stdout)
    assert checked and int(checked[1]) == modules, result.stdout
