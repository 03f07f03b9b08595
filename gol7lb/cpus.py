"""How many CPUs this process may use: the default worker count follows it.

`os.cpu_count()` is the host's count. In a container that is usually wrong: Kubernetes and
Docker limit a container's CPU time with a cgroup quota (`resources.limits.cpu`,
`docker run --cpus`), and a cpuset or taskset narrows the CPUs it may run on. Twelve workers
on a 64-core node for a pod limited to 2 CPUs would only be throttled. So:

* the CPU quota of the process's cgroup, the smallest along its path up to the root
  (cgroup v2 `cpu.max`, or v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us`), rounded up;
* capped by the CPUs the process may run on (`os.sched_getaffinity`).

Everything is read from files, and the cgroup root and `/proc/self/cgroup` are parameters,
so the parsing is tested on files a test writes.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
SELF_CGROUP = Path("/proc/self/cgroup")
_V1_CPU_MOUNTS = ("cpu,cpuacct", "cpuacct,cpu", "cpu")


def affinity_cpus() -> int:
    """CPUs this process may run on (its affinity mask), else the host's count."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def _self_paths(self_cgroup: Path) -> dict[str, str]:
    """Controller -> cgroup path, from /proc/self/cgroup ("" is the v2 unified hierarchy)."""
    paths: dict[str, str] = {}
    for line in (_read(self_cgroup) or "").splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        for controller in controllers.split(",") if controllers else [""]:
            paths.setdefault(controller, path)
    return paths


def _walk(mount: Path, path: str) -> list[Path]:
    """The cgroup's directory and its parents up to the mount, the ones that exist. With a
    cgroup namespace (containers) the path is "/" and the mount itself is the container's."""
    found: list[Path] = []
    current = mount / path.strip("/") if path.strip("/") else mount
    while True:
        if current.is_dir():
            found.append(current)
        if current == mount or mount not in current.parents:
            break
        current = current.parent
    return found or [mount]


def _v2_limit(directory: Path) -> float | None:
    """`cpu.max` is "QUOTA PERIOD" in microseconds, or "max PERIOD" for no limit."""
    text = _read(directory / "cpu.max")
    if not text:
        return None
    words = text.split()
    if words[0] == "max":
        return None
    try:
        quota = int(words[0])
        period = int(words[1]) if len(words) > 1 else 100_000
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def _v1_limit(directory: Path) -> float | None:
    """`cpu.cfs_quota_us` is -1 for no limit."""
    quota_text = _read(directory / "cpu.cfs_quota_us")
    period_text = _read(directory / "cpu.cfs_period_us")
    if not quota_text or not period_text:
        return None
    try:
        quota, period = int(quota_text), int(period_text)
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def cgroup_cpu_limit(root: Path = CGROUP_ROOT, self_cgroup: Path = SELF_CGROUP) -> float | None:
    """CPUs' worth of time the cgroup quota allows (1.5 for "150000 100000"), the smallest
    along the cgroup's path; None when nothing limits it or no cgroup is found."""
    root = Path(root)
    paths = _self_paths(Path(self_cgroup))
    limits: list[float] = []
    if (root / "cgroup.controllers").exists():  # cgroup v2 mounted at the root
        for directory in _walk(root, paths.get("", "/")):
            limit = _v2_limit(directory)
            if limit is not None:
                limits.append(limit)
    else:  # cgroup v1: the cpu controller's own hierarchy
        for name in _V1_CPU_MOUNTS:
            mount = root / name
            if mount.is_dir():
                for directory in _walk(mount, paths.get("cpu", "/")):
                    limit = _v1_limit(directory)
                    if limit is not None:
                        limits.append(limit)
                break
    return min(limits) if limits else None


def available_cpus(root: Path = CGROUP_ROOT, self_cgroup: Path = SELF_CGROUP,
                   affinity: int | None = None) -> int:
    """Whole CPUs this process may use: the cgroup quota rounded up, capped by the affinity
    mask (a quota of 0.5 CPU still gives 1)."""
    cpus = affinity if affinity is not None else affinity_cpus()
    limit = cgroup_cpu_limit(root, self_cgroup)
    if limit is not None:
        cpus = min(cpus, math.ceil(limit))
    return max(1, cpus)


def default_workers(root: Path = CGROUP_ROOT, self_cgroup: Path = SELF_CGROUP,
                    affinity: int | None = None) -> int:
    """gunicorn's worker count when WEB_CONCURRENCY is not set: one per usable CPU, at least
    two (so a worker being replaced never leaves the instance without one)."""
    return max(2, available_cpus(root, self_cgroup, affinity))
