"""Dockerfile, docker-compose.yml and Procfile, checked as far as this machine allows.

There is no Docker engine here, so the image is never built. Instead the Dockerfile is parsed
and its promises checked one by one (and its HEALTHCHECK command is run against a real
server), docker-compose.yml goes through a real Compose implementation's `config` (which
validates the file against the Compose schema without an engine), and the Procfile through
honcho.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from tests.procs import ROOT, free_port, start_backend

GUNICORN_CMD = ["gunicorn", "-c", "gunicorn.conf.py", "gol7lb.wsgi"]
BACKEND_SERVICES = {"backend1": 8081, "backend2": 8082, "backend3": 8083}
BACKENDS_ENV = "http://backend1:8081, http://backend2:8082, http://backend3:8083"


# -- Dockerfile ------------------------------------------------------------------------------

@dataclass
class Instruction:
    keyword: str  # upper case
    args: str
    line: int

    def exec_form(self) -> list[str] | None:
        """The JSON array of an exec-form instruction, or None for the shell form."""
        text = self.args.strip()
        return json.loads(text) if text.startswith("[") else None


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions with continuation lines joined and comments dropped (enough for checks)."""
    instructions: list[Instruction] = []
    pending = ""
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if line.startswith("#") or (not line and not pending):
            continue
        if not pending:
            start = number
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, args = (pending + line).strip().partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip(), start))
        pending = ""
    assert not pending, "Dockerfile ends inside a continuation line"
    return instructions


@cache
def dockerfile() -> tuple[Instruction, ...]:
    return tuple(parse_dockerfile((ROOT / "Dockerfile").read_text()))


def only(keyword: str) -> list[Instruction]:
    return [i for i in dockerfile() if i.keyword == keyword]


def env_vars() -> dict[str, str]:
    """ENV key=value pairs, later ones winning (the legacy `ENV key value` form too)."""
    result: dict[str, str] = {}
    for inst in only("ENV"):
        words = shlex.split(inst.args)
        if "=" not in words[0]:
            result[words[0]] = " ".join(words[1:])
            continue
        for word in words:
            key, _, value = word.partition("=")
            result[key] = value
    return result


def copy_sources() -> list[tuple[list[str], str]]:
    """(sources, destination) of every COPY/ADD, flags such as --chown dropped."""
    result = []
    for inst in only("COPY") + only("ADD"):
        words = inst.exec_form() or shlex.split(inst.args)
        words = [w for w in words if not w.startswith("--")]
        result.append((words[:-1], words[-1]))
    return result


def dockerignore_patterns() -> list[str]:
    path = ROOT / ".dockerignore"
    lines = path.read_text().splitlines() if path.exists() else []
    return [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]


def ignored(relpath: str, patterns: list[str]) -> bool:
    """Whether the build context leaves `relpath` out. Docker's rules, simplified: a pattern
    matches the path or one of its parent folders, from the context root; a leading `**/`
    matches at any depth; a later `!pattern` takes a path back in."""
    parts = relpath.strip("/").split("/")
    candidates = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    result = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern.lstrip("!").strip("/")
        alternatives = {pat, pat[3:]} if pat.startswith("**/") else {pat}
        if any(fnmatch.fnmatchcase(c, p) for c in candidates for p in alternatives):
            result = not negate
    return result


def test_base_image_is_official_slim_python() -> None:
    froms = only("FROM")
    assert froms, "no FROM"
    image = froms[-1].args.split()[0]
    assert re.fullmatch(r"python:3\.\d+(\.\d+)?-slim(-\w+)?", image), image
    assert dockerfile()[0].keyword in ("FROM", "ARG")


def test_runs_as_non_root_user_before_cmd() -> None:
    insts = list(dockerfile())
    cmd_index = max(n for n, i in enumerate(insts) if i.keyword == "CMD")
    users = [i for i in insts[:cmd_index] if i.keyword == "USER"]
    assert users, "no USER before CMD: the container would run as root"
    user = users[-1].args.split(":")[0]
    assert user not in ("root", "0"), user
    runs = " ".join(i.args for i in only("RUN"))
    assert re.search(rf"\b(useradd|adduser)\b.*\b{re.escape(user)}\b", runs), \
        f"user {user!r} is never created"
    # Everything that needs root (installing) happens before the switch.
    after = insts[insts.index(users[-1]):]
    assert not [i for i in after if i.keyword == "RUN" and "pip install" in i.args]


def test_installs_the_project_with_pip() -> None:
    runs = [i.args for i in only("RUN")]
    assert any(re.search(r"\bpip install --no-cache-dir \.(\s|$)", r) for r in runs), runs


def test_cmd_is_the_gunicorn_command_and_leaves_the_port_to_port() -> None:
    cmds = only("CMD")
    assert cmds[-1].exec_form() == GUNICORN_CMD
    assert not only("ENTRYPOINT"), "an ENTRYPOINT would change what CMD runs"
    assert not {"-b", "--bind"} & set(GUNICORN_CMD)


def test_port_env_and_expose() -> None:
    assert env_vars().get("PORT") == "8080"
    exposed = {w.split("/")[0] for i in only("EXPOSE") for w in i.args.split()}
    assert exposed == {"8080"}


def test_workdir_holds_gunicorn_conf() -> None:
    """CMD reads gunicorn.conf.py from the working directory: it must be copied there."""
    workdirs = only("WORKDIR")
    assert workdirs
    workdir = workdirs[-1].args.rstrip("/")
    assert workdir.startswith("/")
    for sources, dest in copy_sources():
        if "gunicorn.conf.py" in sources:
            target = dest if dest.startswith("/") else f"{workdir}/{dest}"
            target = os.path.normpath(target)
            assert target in (workdir, f"{workdir}/gunicorn.conf.py"), (sources, dest)
            return
    pytest.fail("gunicorn.conf.py is never copied into the image")


def test_every_copied_file_exists_and_is_in_the_build_context() -> None:
    patterns = dockerignore_patterns()
    copies = copy_sources()
    assert copies
    for sources, _ in copies:
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: no such file in the repository"
            assert not ignored(source.rstrip("/"), patterns), \
                f"COPY {source}: excluded by .dockerignore"


def test_dockerignore_keeps_what_the_image_needs() -> None:
    patterns = dockerignore_patterns()
    assert patterns, ".dockerignore is missing or empty"
    needed = ["pyproject.toml", "README.md", "gunicorn.conf.py"]
    needed += [str(p.relative_to(ROOT)) for d in ("gol7lb", "backend") for p in
               (ROOT / d).glob("*.py")]
    assert [p for p in needed if ignored(p, patterns)] == []
    assert ignored(".git", patterns)
    assert ignored("tests/test_packaging.py", patterns)
    assert ignored("gol7lb/__pycache__/x.pyc", patterns)


def healthcheck_command() -> list[str]:
    checks = only("HEALTHCHECK")
    assert len(checks) == 1
    args = checks[0].args
    options, sep, command = args.partition("CMD ")
    assert sep, f"HEALTHCHECK without CMD: {args}"
    assert all(o.startswith("--") for o in options.split()), options
    form = json.loads(command) if command.strip().startswith("[") else None
    assert form is not None, "HEALTHCHECK CMD should be exec form: no shell needed"
    return form


def test_healthcheck_targets_admin_healthz_with_python() -> None:
    command = healthcheck_command()
    assert command[0] in ("python", "python3")
    assert "http://127.0.0.1:8404/healthz" in " ".join(command)
    assert not {"curl", "wget"} & set(command)


def test_healthcheck_command_really_checks(tmp_path: Path) -> None:
    """Run the HEALTHCHECK command here, pointed at a live /healthz, then at a closed port."""
    command = [sys.executable, *healthcheck_command()[1:]]
    port = free_port()
    proc = start_backend(port, tmp_path)
    try:
        live = [c.replace("127.0.0.1:8404", f"127.0.0.1:{port}") for c in command]
        assert subprocess.run(live, capture_output=True, timeout=30).returncode == 0
    finally:
        assert proc.stop() == 0
    dead = [c.replace("127.0.0.1:8404", f"127.0.0.1:{free_port()}") for c in command]
    assert subprocess.run(dead, capture_output=True, timeout=30).returncode != 0


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GOL7LB_")}
    env.update(extra)
    return env


def test_gunicorn_conf_respects_port() -> None:
    """What the image's CMD does with PORT: gunicorn's own --print-config shows the bind."""
    gunicorn = shutil.which("gunicorn") or pytest.fail("gunicorn is not installed")
    result = subprocess.run([gunicorn, *GUNICORN_CMD[1:3], "--print-config", GUNICORN_CMD[3]],
                            cwd=ROOT, env=clean_env(PORT="9123"), capture_output=True,
                            text=True, timeout=60, stdin=subprocess.DEVNULL)
    binds = [ln for ln in result.stdout.splitlines() if re.match(r"bind\s+=", ln)]
    assert binds, result.stdout + result.stderr
    assert "'0.0.0.0:9123'" in binds[0], binds


# -- docker-compose.yml ----------------------------------------------------------------------

def compose_executable() -> str:
    found = shutil.which("docker-compose")
    if not found:
        pytest.fail("docker-compose (the compose validator) is missing: run `bash tests/run.sh`,"
                    " which installs Debian's docker-compose package")
    return found


def compose_config(path: Path) -> subprocess.CompletedProcess[str]:
    """`docker-compose config`: parse, interpolate, merge and validate against the schema."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMPOSE_", "DOCKER_"))}
    return subprocess.run([compose_executable(), "-f", str(path), "config"], cwd=path.parent,
                          env=env, capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)


def load_yaml(text: str) -> Any:
    """PyYAML if this interpreter has it, else the interpreter docker-compose runs on,
    which has it (the Debian package depends on python3-yaml)."""
    try:
        import yaml
    except ImportError:
        shebang = Path(compose_executable()).read_text().splitlines()[0]
        python = shebang[2:].strip().split()
        out = subprocess.run([*python, "-c", "import json, sys, yaml; "
                              "json.dump(yaml.safe_load(sys.stdin), sys.stdout)"],
                             input=text, capture_output=True, text=True, check=True, timeout=60)
        return json.loads(out.stdout)
    return yaml.safe_load(text)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    """The compose file as the validator resolved it (anchors merged, defaults filled)."""
    result = compose_config(ROOT / "docker-compose.yml")
    assert result.returncode == 0, result.stderr
    return load_yaml(result.stdout)


def test_compose_validator_rejects_a_broken_file(tmp_path: Path) -> None:
    """The validator is real: a bad port and a dangling dependency are refused."""
    bad = tmp_path / "docker-compose.yml"
    bad.write_text("services:\n  lb:\n    image: x\n    ports: [{published: abc, target: 1}]\n")
    assert compose_config(bad).returncode != 0
    bad.write_text("services:\n  lb:\n    image: x\n    depends_on: [nowhere]\n")
    result = compose_config(bad)
    assert result.returncode != 0
    assert "nowhere" in result.stderr


def test_compose_services(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == {"lb", *BACKEND_SERVICES}


def test_compose_lb(compose: dict[str, Any]) -> None:
    lb = compose["services"]["lb"]
    assert lb["build"]["context"] == str(ROOT)
    assert "command" not in lb and "entrypoint" not in lb, "lb runs the image's CMD"
    ports = [(int(p["published"]), int(p["target"])) for p in lb["ports"]]
    assert ports == [(8080, 8080)]
    assert lb["environment"]["GOL7LB_BACKENDS"] == BACKENDS_ENV
    assert set(lb["depends_on"]) == set(BACKEND_SERVICES)


def test_compose_backends(compose: dict[str, Any]) -> None:
    image = compose["services"]["lb"]["image"]
    for name, port in BACKEND_SERVICES.items():
        service = compose["services"][name]
        assert service["build"]["context"] == str(ROOT)
        assert service["image"] == image, "every service runs the one image"
        assert service["command"] == ["python", "-m", "backend", str(port), "--host", "0.0.0.0"]
        assert "ports" not in service, "backends are reached through the LB only"
        assert f"127.0.0.1:{port}/healthz" in " ".join(service["healthcheck"]["test"])


def test_compose_backends_env_wires_lb_to_the_services(compose: dict[str, Any]) -> None:
    """The LB's own settings parser reads GOL7LB_BACKENDS as the three compose services."""
    from gol7lb.config import load_settings

    env = compose["services"]["lb"]["environment"]
    settings = load_settings({"GOL7LB_BACKENDS": env["GOL7LB_BACKENDS"]})
    wired = {(b.host, b.port) for b in settings.backends}
    assert wired == set(BACKEND_SERVICES.items())


# -- Procfile --------------------------------------------------------------------------------

def test_procfile_is_valid_for_honcho() -> None:
    honcho = shutil.which("honcho") or pytest.fail("honcho is not installed")
    result = subprocess.run([honcho, "check"], cwd=ROOT, capture_output=True, text=True,
                            timeout=60, env=clean_env(), stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    assert "web" in result.stdout + result.stderr


def test_procfile_web_line() -> None:
    text = (ROOT / "Procfile").read_text()
    assert text == "web: " + " ".join(GUNICORN_CMD) + "\n"
    entries = dict(line.split(":", 1) for line in text.splitlines() if line.strip())
    assert list(entries) == ["web"]
    assert shlex.split(entries["web"]) == GUNICORN_CMD
