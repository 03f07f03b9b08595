"""Dockerfile, docker-compose.yml and Procfile, checked as far as this machine allows.

There is no Docker engine here, so the image is never built. Instead the Dockerfile is parsed
and its promises checked one by one (and its HEALTHCHECK command is run against a real
server), docker-compose.yml goes through a real Compose implementation's `config` (which
validates the file against the Compose schema without an engine), and the Procfile through
honcho.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.image import (
    copy_sources,
    dockerfile,
    dockerfile_user,
    dockerignore_patterns,
    env_vars,
    graceful_timeout,
    ignored,
    only,
)
from tests.procs import ROOT, free_port, start_backend

GUNICORN_CMD = ["gunicorn", "-c", "gunicorn.conf.py", "gol7lb.wsgi"]
BACKEND_SERVICES = {"backend1": 8081, "backend2": 8082, "backend3": 8083}
BACKENDS_ENV = "http://backend1:8081, http://backend2:8082, http://backend3:8083"
LOCK = ROOT / "requirements.lock"
DEBIAN_RELEASES = ("bookworm", "trixie")


def duration_seconds(text: str | int | float) -> float:
    """A Compose duration (45s, 1m30s, 1.5s) in seconds."""
    if isinstance(text, int | float):
        return float(text)
    parts = re.findall(r"(\d+(?:\.\d+)?)(us|ms|s|m|h)", text)
    assert parts and "".join(n + u for n, u in parts) == text, f"not a duration: {text!r}"
    unit = {"us": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600}
    return sum(float(n) * unit[u] for n, u in parts)


def test_base_image_is_official_slim_python_pinned_to_a_minor_and_a_debian_release() -> None:
    """python:3.11-slim-trixie: a rebuild gets patch releases and security fixes, never
    another Python minor (the lock was frozen on it) nor another Debian release."""
    froms = only("FROM")
    assert froms, "no FROM"
    image = froms[-1].args.split()[0]
    found = re.fullmatch(r"python:3\.(\d+)(\.\d+)?-slim-(\w+)", image)
    assert found, f"{image}: pin python:3.MINOR-slim-<debian release>"
    assert found.group(3) in DEBIAN_RELEASES, image
    assert dockerfile()[0].keyword in ("FROM", "ARG")
    minor = int(found.group(1))
    assert f"Python 3.{minor}" in LOCK.read_text(), "the lock was frozen on another Python"
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert re.fullmatch(r">=3\.(\d+)", requires) and int(requires[4:]) <= minor


def test_runs_as_non_root_user_before_cmd() -> None:
    insts = list(dockerfile())
    cmd_index = max(n for n, i in enumerate(insts) if i.keyword == "CMD")
    users = [i for i in insts[:cmd_index] if i.keyword == "USER"]
    assert users, "no USER before CMD: the container would run as root"
    user = dockerfile_user()
    assert user.isdigit() and user != "0", \
        f"USER {user!r}: numeric, so Kubernetes' runAsNonRoot can verify it is not root"
    runs = " ".join(i.args for i in only("RUN"))
    assert re.search(rf"\b(useradd|adduser)\b.*--uid {user}\b", runs), \
        f"user {user!r} is never created"
    # Everything that needs root (installing) happens before the switch.
    after = insts[insts.index(users[-1]):]
    assert not [i for i in after if i.keyword == "RUN" and "pip install" in i.args]


def test_installs_locked_dependencies_then_the_project_without_dependencies() -> None:
    """The lock in a layer of its own (rebuilt only when the lock changes), installed with
    --no-deps so nothing unpinned comes in; then the project with --no-deps, and pip check
    proves the locked set satisfies it."""
    insts = list(dockerfile())
    runs = [(n, i.args) for n, i in enumerate(insts) if i.keyword == "RUN"]
    lock_run = [n for n, r in runs
                if re.search(r"\bpip install --no-cache-dir --no-deps -r requirements\.lock\b", r)]
    project_run = [n for n, r in runs
                   if re.search(r"\bpip install --no-cache-dir --no-deps \.(\s|$)", r)]
    assert len(lock_run) == 1 and len(project_run) == 1, runs
    assert "pip check" in insts[project_run[0]].args
    copies = {n: i.args for n, i in enumerate(insts) if i.keyword == "COPY"}
    lock_copy = [n for n, a in copies.items() if "requirements.lock" in a.split()]
    source_copies = [n for n, a in copies.items() if "gol7lb/" in a.split()]
    assert lock_copy and source_copies
    assert lock_copy[0] < lock_run[0] < source_copies[0] < project_run[0], \
        "the lock's layer must come before the sources, or every edit reinstalls everything"
    assert not [r for _, r in runs if re.search(r"pip install(?!.*--no-deps)", r)], \
        "every pip install in the image is --no-deps"


# -- requirements.lock -----------------------------------------------------------------------

def lock_pins() -> dict[str, str]:
    """Canonical name -> exact version, from requirements.lock."""
    pins: dict[str, str] = {}
    for raw in LOCK.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        specs = list(req.specifier)
        assert len(specs) == 1 and specs[0].operator == "==", f"not an exact pin: {line}"
        assert not req.marker and not req.extras, f"keep the lock plain: {line}"
        name = canonicalize_name(req.name)
        assert name not in pins, f"{req.name} pinned twice"
        pins[name] = specs[0].version
    return pins


def project_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in project["dependencies"]]


# The image's platform, for evaluating the dependencies' markers.
IMAGE_MARKERS = {"python_version": "3.11", "python_full_version": "3.11.0",
                 "sys_platform": "linux", "platform_system": "Linux", "os_name": "posix",
                 "platform_python_implementation": "CPython", "implementation_name": "cpython",
                 "platform_machine": "x86_64", "extra": ""}


def test_lock_pins_every_runtime_dependency_within_its_range() -> None:
    pins = lock_pins()
    for req in project_requirements():
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} (pyproject.toml) is not in requirements.lock"
        assert req.specifier.contains(pins[name], prereleases=True), \
            f"{req.name}=={pins[name]} is outside pyproject's {req.specifier}"


def test_lock_is_the_closure_and_nothing_else() -> None:
    """Whatever a pinned package requires (on the image's platform) is pinned too, within
    range; and nothing but that closure is pinned (no test tools in the image). A package
    installed here at another version than its pin cannot be inspected offline: its own
    requirements are then not checked (the image's `pip check` still does)."""
    from importlib.metadata import PackageNotFoundError, distribution

    pins = lock_pins()
    reached = {canonicalize_name(r.name) for r in project_requirements()}
    todo = list(reached)
    while todo:
        name = todo.pop()
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            continue
        if dist.version != pins[name]:
            continue
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker and not Marker(str(req.marker)).evaluate(IMAGE_MARKERS):
                continue
            dep = canonicalize_name(req.name)
            assert dep in pins, f"{name} needs {req}, which requirements.lock does not pin"
            assert req.specifier.contains(pins[dep], prereleases=True), (name, str(req))
            if dep not in reached:
                reached.add(dep)
                todo.append(dep)
    assert set(pins) == reached, f"pinned but not needed: {sorted(set(pins) - reached)}"


def test_lock_is_what_the_tests_ran_against() -> None:
    """The versions pinned are the ones installed here, the ones this suite runs against: a
    pin that is not installed, or installed at another version, fails (install the lock with
    `pip install -r requirements.lock`, or set the pins to the versions the tests passed with)."""
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    pins = lock_pins()
    assert pins, "requirements.lock pins nothing"
    assert {name: installed(name) for name in pins} == pins


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
    needed = ["pyproject.toml", "README.md", "gunicorn.conf.py", "requirements.lock"]
    needed += [str(p.relative_to(ROOT)) for d in ("gol7lb", "backend") for p in
               (ROOT / d).glob("*.py")]
    assert [p for p in needed if ignored(p, patterns)] == []
    assert ignored(".git", patterns)
    assert ignored("tests/test_packaging.py", patterns)
    assert ignored("gol7lb/__pycache__/x.pyc", patterns)
    assert ignored("deploy/kubernetes/deployment.yaml", patterns)
    assert ignored("docker-compose.admin.yml", patterns)


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


def test_compose_lb_gets_longer_than_gunicorns_graceful_timeout_to_stop(
        compose: dict[str, Any]) -> None:
    """`docker compose stop` sends TERM, then SIGKILL after stop_grace_period (default 10 s):
    in-flight requests get graceful_timeout, plus time for the helpers to stop."""
    lb = compose["services"]["lb"]
    assert duration_seconds(lb["stop_grace_period"]) >= graceful_timeout() + 10


def test_compose_lb_root_filesystem_is_read_only_with_a_tmpfs(compose: dict[str, Any]) -> None:
    lb = compose["services"]["lb"]
    assert lb["read_only"] is True
    tmpfs = [lb["tmpfs"]] if isinstance(lb["tmpfs"], str) else lb["tmpfs"]
    assert "/tmp" in [t.split(":")[0] for t in tmpfs]
    assert "XDG_RUNTIME_DIR" not in lb["environment"] and "TMPDIR" not in lb["environment"]


ADMIN_OVERLAY = ROOT / "docker-compose.admin.yml"


def compose_config_files(*paths: Path, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("COMPOSE_", "DOCKER_", "GOL7LB_"))}
    args = [a for p in paths for a in ("-f", str(p))]
    return subprocess.run([compose_executable(), *args, "config"], cwd=ROOT,
                          env={**base, **env}, capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)


def test_compose_admin_overlay_needs_a_token() -> None:
    """Without GOL7LB_ADMIN_TOKEN compose refuses the overlay, with a message saying so."""
    result = compose_config_files(ROOT / "docker-compose.yml", ADMIN_OVERLAY)
    assert result.returncode != 0
    assert "GOL7LB_ADMIN_TOKEN" in result.stderr


def test_compose_admin_overlay_publishes_admin_on_host_loopback_with_the_token() -> None:
    """With a token: the admin listener binds beyond loopback inside the container (Docker's
    port mapping arrives on the container's address), is published on the host's loopback
    only, and the LB's own settings accept that environment, and refuse it without the
    token."""
    from gol7lb.config import ConfigError, load_settings

    result = compose_config_files(ROOT / "docker-compose.yml", ADMIN_OVERLAY,
                                  GOL7LB_ADMIN_TOKEN="t0ken")
    assert result.returncode == 0, result.stderr
    lb = load_yaml(result.stdout)["services"]["lb"]
    env = lb["environment"]
    assert env["GOL7LB_ADMIN_TOKEN"] == "t0ken"
    published = []
    for port in lb["ports"]:
        if isinstance(port, dict):
            published.append((port.get("host_ip", "0.0.0.0"), int(port["published"]),
                              int(port["target"])))
        else:
            host_ip, host_port, target = port.split("/")[0].rsplit(":", 2)
            published.append((host_ip, int(host_port), int(target)))
    admin_port = int(env["GOL7LB_ADMIN_BIND"].rpartition(":")[2])
    assert ("127.0.0.1", admin_port, admin_port) in published
    assert [p for p in published if p[2] == admin_port] == [("127.0.0.1", admin_port,
                                                              admin_port)]
    lb_env = {k: str(v) for k, v in env.items() if k.startswith("GOL7LB_")}
    settings = load_settings(lb_env)
    assert settings.admin.address == ("0.0.0.0", admin_port)
    lb_env.pop("GOL7LB_ADMIN_TOKEN")
    with pytest.raises(ConfigError, match=r"admin\.token"):
        load_settings(lb_env)
    # The image's HEALTHCHECK asks 127.0.0.1 on that port: still answered on 0.0.0.0.
    assert f"127.0.0.1:{admin_port}/healthz" in " ".join(healthcheck_command())


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


def test_every_source_folder_is_a_listed_package_and_gol7lb_ships_its_typed_marker() -> None:
    """A folder of modules without __init__.py would be a namespace package (mypy then sees
    gol7lb/admin/server.py as two modules) and one missing from [tool.setuptools] packages
    would be left out of the wheel; py.typed tells type checkers gol7lb has inline types."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = {".".join(folder.relative_to(ROOT).parts)
             for top in ("gol7lb", "backend") for folder in [ROOT / top, *(ROOT / top).rglob("*")]
             if folder.is_dir() and any(folder.glob("*.py"))}
    assert set(setuptools["packages"]) == found
    for package in found:
        assert (ROOT / package.replace(".", "/") / "__init__.py").is_file(), package
    assert (ROOT / "gol7lb" / "py.typed").is_file()
    assert "py.typed" in setuptools["package-data"]["gol7lb"]
