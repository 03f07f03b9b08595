"""The default worker count: cgroup CPU quota (v2 and v1) rounded up, capped by affinity.

The cgroup trees are written under tmp_path the way the kernel lays them out, and the
module is pointed at them; the last tests ask this machine and gunicorn itself.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from gol7lb import cpus
from tests.procs import ROOT, free_port, workers_of


def v2_tree(tmp_path: Path, self_path: str = "/", **cpu_max: str) -> tuple[Path, Path]:
    """A cgroup v2 mount (cgroup.controllers at its root) and a /proc/self/cgroup naming
    `self_path`; `cpu_max` maps a relative directory ("" for the root) to its cpu.max."""
    root = tmp_path / "cgroup"
    root.mkdir()
    (root / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    for rel, value in cpu_max.items():
        directory = root / rel.replace("__", "/") if rel else root
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "cpu.max").write_text(value + "\n")
    self_cgroup = tmp_path / "self_cgroup"
    self_cgroup.write_text(f"0::{self_path}\n")
    return root, self_cgroup


def v1_tree(tmp_path: Path, quota: str, period: str = "100000", mount: str = "cpu,cpuacct",
            self_path: str = "/", rel: str = "") -> tuple[Path, Path]:
    root = tmp_path / "cgroup"
    directory = root / mount / rel if rel else root / mount
    directory.mkdir(parents=True)
    (directory / "cpu.cfs_quota_us").write_text(quota + "\n")
    (directory / "cpu.cfs_period_us").write_text(period + "\n")
    (root / "memory").mkdir()
    self_cgroup = tmp_path / "self_cgroup"
    self_cgroup.write_text(f"12:memory:/elsewhere\n4:cpu,cpuacct:{self_path}\n"
                           f"1:name=systemd:{self_path}\n")
    return root, self_cgroup


# -- cgroup v2 ---------------------------------------------------------------------------------

def test_v2_quota_in_a_namespaced_container(tmp_path: Path) -> None:
    """Kubernetes `limits.cpu: 1500m` -> cpu.max "150000 100000" at the container's root."""
    root, self_cgroup = v2_tree(tmp_path, **{"": "150000 100000"})
    assert cpus.cgroup_cpu_limit(root, self_cgroup) == 1.5
    assert cpus.available_cpus(root, self_cgroup, affinity=64) == 2  # rounded up
    assert cpus.default_workers(root, self_cgroup, affinity=64) == 2


def test_v2_no_quota(tmp_path: Path) -> None:
    root, self_cgroup = v2_tree(tmp_path, **{"": "max 100000"})
    assert cpus.cgroup_cpu_limit(root, self_cgroup) is None
    assert cpus.available_cpus(root, self_cgroup, affinity=6) == 6
    assert cpus.default_workers(root, self_cgroup, affinity=6) == 6


def test_v2_quota_capped_by_affinity(tmp_path: Path) -> None:
    """A quota of 8 CPUs in a cpuset of 3: only 3 can run at once."""
    root, self_cgroup = v2_tree(tmp_path, **{"": "800000 100000"})
    assert cpus.available_cpus(root, self_cgroup, affinity=3) == 3


def test_v2_smallest_quota_along_the_path(tmp_path: Path) -> None:
    """Without a cgroup namespace the process sits deep in the tree; a parent's quota (the
    pod's) binds its children (the container's) too."""
    root, self_cgroup = v2_tree(
        tmp_path, self_path="/kubepods/pod1/ctr",
        **{"kubepods__pod1": "300000 100000", "kubepods__pod1__ctr": "max 100000",
           "kubepods": "max 100000"})
    assert cpus.cgroup_cpu_limit(root, self_cgroup) == 3.0
    assert cpus.available_cpus(root, self_cgroup, affinity=16) == 3


def test_v2_fraction_of_a_cpu_still_gives_one_and_two_workers(tmp_path: Path) -> None:
    root, self_cgroup = v2_tree(tmp_path, **{"": "25000 100000"})
    assert cpus.available_cpus(root, self_cgroup, affinity=4) == 1
    assert cpus.default_workers(root, self_cgroup, affinity=4) == 2


def test_v2_other_period(tmp_path: Path) -> None:
    root, self_cgroup = v2_tree(tmp_path, **{"": "250000 50000"})
    assert cpus.cgroup_cpu_limit(root, self_cgroup) == 5.0


@pytest.mark.parametrize("content", ["", "garbage", "0 100000", "-5 100000", "100 0", "1 x"])
def test_v2_unreadable_or_nonsense_is_no_limit(tmp_path: Path, content: str) -> None:
    root, self_cgroup = v2_tree(tmp_path, **{"": content})
    assert cpus.cgroup_cpu_limit(root, self_cgroup) is None
    assert cpus.available_cpus(root, self_cgroup, affinity=4) == 4


def test_v2_path_that_does_not_exist_falls_back_to_the_mount(tmp_path: Path) -> None:
    root, self_cgroup = v2_tree(tmp_path, self_path="/not/here", **{"": "200000 100000"})
    assert cpus.cgroup_cpu_limit(root, self_cgroup) == 2.0


# -- cgroup v1 ---------------------------------------------------------------------------------

def test_v1_quota(tmp_path: Path) -> None:
    root, self_cgroup = v1_tree(tmp_path, quota="250000")
    assert cpus.cgroup_cpu_limit(root, self_cgroup) == 2.5
    assert cpus.available_cpus(root, self_cgroup, affinity=32) == 3


def test_v1_no_quota(tmp_path: Path) -> None:
    root, self_cgroup = v1_tree(tmp_path, quota="-1")
    assert cpus.cgroup_cpu_limit(root, self_cgroup) is None
    assert cpus.available_cpus(root, self_cgroup, affinity=5) == 5


def test_v1_plain_cpu_mount_and_nested_path(tmp_path: Path) -> None:
    root, self_cgroup = v1_tree(tmp_path, quota="100000", period="50000", mount="cpu",
                                self_path="/docker/abc", rel="docker/abc")
    assert cpus.cgroup_cpu_limit(root, self_cgroup) == 2.0


def test_v1_host_path_not_visible_in_the_container(tmp_path: Path) -> None:
    """Without a cgroup namespace /proc/self/cgroup names the host's path, but the cpu mount
    inside the container is the container's own cgroup."""
    root, self_cgroup = v1_tree(tmp_path, quota="400000", self_path="/kubepods/burstable/p/c")
    assert cpus.cgroup_cpu_limit(root, self_cgroup) == 4.0


def test_no_cgroup_at_all(tmp_path: Path) -> None:
    assert cpus.cgroup_cpu_limit(tmp_path / "none", tmp_path / "none2") is None
    assert cpus.available_cpus(tmp_path / "none", tmp_path / "none2", affinity=3) == 3
    assert cpus.default_workers(tmp_path / "none", tmp_path / "none2", affinity=1) == 2


# -- this machine ------------------------------------------------------------------------------

def test_this_machine_counts_the_cpus_nproc_counts() -> None:
    """coreutils' nproc counts the CPUs this process may run on (its affinity mask): an
    independent count to compare with; `OMP_NUM_THREADS` would change what nproc says."""
    nproc = shutil.which("nproc") or pytest.skip("nproc is not installed")
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMP_")}
    out = subprocess.run([nproc], capture_output=True, text=True, timeout=30, check=True,
                         env=env)
    allowed = int(out.stdout)
    assert cpus.affinity_cpus() == allowed
    if cpus.cgroup_cpu_limit() is None:  # no quota here: every CPU nproc counts is usable
        assert cpus.available_cpus() == allowed
    else:
        assert 1 <= cpus.available_cpus() <= allowed


def test_an_lb_on_one_cpu_runs_two_workers(lb_factory, backend_factory) -> None:
    """A real LB started on one CPU (its affinity mask, what taskset sets) and no
    WEB_CONCURRENCY runs two workers: one per usable CPU, at least two."""
    backend = backend_factory()
    allowed = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(allowed)})  # this thread's mask, which the LB inherits
    try:
        lb = lb_factory({"GOL7LB_BACKENDS": f"http://127.0.0.1:{backend.port}"},
                        unset=("WEB_CONCURRENCY",), ready=False)
    finally:
        os.sched_setaffinity(0, allowed)
    lb.wait_ready()
    assert os.sched_getaffinity(lb.pid) == {min(allowed)}
    assert len(workers_of(lb)) == 2


def test_taskset_narrows_the_default(tmp_path: Path) -> None:
    """A process started on one CPU (taskset) counts one, whatever the host has."""
    taskset = shutil.which("taskset") or pytest.skip("taskset is not installed")
    cpu = min(os.sched_getaffinity(0))
    out = subprocess.run([taskset, "-c", str(cpu), "python", "-c",
                          "from gol7lb import cpus; print(cpus.available_cpus())"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "1"


def test_gunicorn_workers_follow_the_cpus_unless_web_concurrency() -> None:
    """gunicorn's own --print-config: the default is default_workers(), WEB_CONCURRENCY wins."""
    gunicorn = shutil.which("gunicorn") or pytest.fail("gunicorn is not installed")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("GOL7LB_") and k != "WEB_CONCURRENCY"}

    def workers(extra: dict[str, str]) -> int:
        run_env = {**env, "PORT": str(free_port()), **extra}
        result = subprocess.run([gunicorn, "-c", "gunicorn.conf.py", "--print-config",
                                 "gol7lb.wsgi"], cwd=ROOT, env=run_env, capture_output=True,
                                text=True, timeout=60, stdin=subprocess.DEVNULL)
        found = re.search(r"^workers\s+=\s+(\d+)$", result.stdout, re.M)
        assert found, result.stdout + result.stderr
        return int(found.group(1))

    assert workers({}) == cpus.default_workers()
    assert workers({"WEB_CONCURRENCY": "5"}) == 5
