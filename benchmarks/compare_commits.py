"""GoL7-LB at two commits, same machine, same backends, interleaved: did a change cost req/s?

Run: bash benchmarks/setup.sh && python benchmarks/compare_commits.py BASE [--rounds 3]

BASE is a commit of this repository (e.g. the last one before a feature). It is checked out
in a temporary git worktree; the working tree as it is now is the other side. Both run as
shipped (`gunicorn -c gunicorn.conf.py gol7lb.wsgi`, 2 workers; whatever each commit's
defaults are: the current one with metrics and the access log on) in front of the same three
nginx backends, loaded by `wrk -t1 -c32` in turns, and the medians are printed.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_load import measure
from bench_procs import Proc, StartError, free_port, wait_http_ok
from bench_targets import REPO, find_tool, gol7lb_env, start_backend


def start_at(tree: Path, tmp: Path, backends: list, name: str) -> tuple[int, Proc]:
    port = free_port()
    argv = [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "gol7lb.wsgi",
            "--no-control-socket"]
    proc = Proc(name, argv, log=tmp / f"{name}.log", cwd=tree,
                env=gol7lb_env(port, backends, 2))
    try:
        wait_http_ok(proc, port, timeout=60)
    except StartError:
        proc.stop()
        raise
    return port, proc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--connections", type=int, default=32)
    args = parser.parse_args()
    wrk = find_tool("wrk")
    if wrk is None:
        sys.exit("compare_commits: wrk is missing; run benchmarks/setup.sh")
    with tempfile.TemporaryDirectory(prefix="gol7lb-compare-") as tmp_text:
        tmp = Path(tmp_text)
        base_tree = tmp / "base"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(base_tree),
                        args.base], check=True, capture_output=True)
        backends = [start_backend(tmp, i) for i in range(3)]
        results: dict[str, list] = {"base": [], "now": []}
        try:
            for round_number in range(args.rounds):
                for side, tree in (("base", base_tree), ("now", REPO)):
                    port, proc = start_at(tree, tmp, backends, f"{side}-{round_number}")
                    try:
                        measure(wrk, side, port, proc, args.connections, 1.0, round_number)
                        result, _ = measure(wrk, side, port, proc, args.connections,
                                            args.duration, round_number)
                        results[side].append(result)
                        print(f"round {round_number} {side}: {result.rps:,.0f} req/s, "
                              f"{result.cpu_us_per_req:.0f} us CPU/request, p99 "
                              f"{result.p99_ms:.2f} ms, errors {result.errors + result.non_2xx}",
                              flush=True)
                    finally:
                        proc.stop()
        finally:
            for backend in backends:
                backend.proc.stop()
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force",
                            str(base_tree)], capture_output=True)
        base = statistics.median(r.rps for r in results["base"])
        now = statistics.median(r.rps for r in results["now"])
        print(f"median req/s: base {args.base} {base:,.0f}, now {now:,.0f} "
              f"({(now / base - 1) * 100:+.1f} %); CPU us/request: base "
              f"{statistics.median(r.cpu_us_per_req for r in results['base']):.0f}, now "
              f"{statistics.median(r.cpu_us_per_req for r in results['now']):.0f}")


if __name__ == "__main__":
    main()
