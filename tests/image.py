"""The image and the gunicorn settings as the tests read them: the Dockerfile parsed into
instructions (there is no Docker engine here), the build context's ignore rules, and
gunicorn.conf.py's graceful_timeout. Shared by tests/test_packaging.py and
tests/test_kubernetes.py."""

from __future__ import annotations

import ast
import fnmatch
import json
import shlex
from dataclasses import dataclass
from functools import cache

from tests.procs import ROOT


def graceful_timeout() -> int:
    """gunicorn's graceful_timeout as gunicorn.conf.py sets it (what TERM waits for)."""
    tree = ast.parse((ROOT / "gunicorn.conf.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "graceful_timeout" for t in node.targets):
            return int(ast.literal_eval(node.value))
    raise AssertionError("gunicorn.conf.py does not set graceful_timeout")


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


def dockerfile_user() -> str:
    """The user of the last USER instruction (uid or name, group dropped)."""
    users = only("USER")
    assert users, "no USER"
    return users[-1].args.split(":")[0].strip()
