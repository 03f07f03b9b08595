"""GoL7-LB against HAProxy, nginx and Python peers, on loopback, under wrk.

    bash benchmarks/setup.sh && python benchmarks/run.py

Writes benchmarks/results/YYYY-MM-DD-HHMM.md (the report), .png (the chart) and .json (every
run). See benchmarks/README.md for what is measured and how to read the report.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_report  # noqa: E402
import bench_targets as targets  # noqa: E402
from bench_load import Measurement, measure  # noqa: E402
from bench_procs import Proc, StartError  # noqa: E402

HERE = Path(__file__).resolve().parent
ORDER = ["direct", "gol7lb", "noop8", "noop32", "haproxy", "nginx", "wsgiproxy2", "proxypy",
         "pyhaproxy", "urllib3proxy"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=5.0,
                    help="seconds of load per wrk run (default 5)")
    ap.add_argument("--repetitions", type=int, default=3,
                    help="interleaved rounds over all targets (default 3)")
    ap.add_argument("--connections", default="1,32,128",
                    help="connection counts of the main comparison (default 1,32,128)")
    ap.add_argument("--workers", type=int, default=2,
                    help="WEB_CONCURRENCY of GoL7-LB (and workers of the Python peers) in the "
                         "main comparison (default 2)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 1 repetition of 2 s (overrides --duration/--repetitions)")
    ap.add_argument("--no-scaling", action="store_true", help="skip the scaling section")
    ap.add_argument("--scaling-workers", default="1,2,3,4")
    ap.add_argument("--scaling-connections", default="1,8,32,128,256")
    ap.add_argument("--only", default="",
                    help="comma-separated subset of targets: " + ",".join(ORDER))
    ap.add_argument("--out", type=Path, default=HERE / "results",
                    help="directory of the report (default benchmarks/results)")
    ap.add_argument("--keep-tmp", action="store_true",
                    help="keep the temp dir with configs and logs")
    args = ap.parse_args(argv)
    if args.quick:
        args.duration, args.repetitions = 2.0, 1
    args.connections = [int(c) for c in args.connections.split(",") if c.strip()]
    args.scaling_workers = [int(c) for c in args.scaling_workers.split(",") if c.strip()]
    args.scaling_connections = [int(c) for c in args.scaling_connections.split(",") if c.strip()]
    args.only = [t.strip() for t in args.only.split(",") if t.strip()] or list(ORDER)
    unknown = set(args.only) - set(ORDER)
    if unknown:
        ap.error(f"unknown target(s) {sorted(unknown)}; known: {ORDER}")
    if args.duration <= 0 or args.repetitions < 1:
        ap.error("--duration must be > 0 and --repetitions >= 1")
    return args


@dataclass
class Run:
    """Everything the report needs."""

    args: argparse.Namespace
    started: datetime
    machine: dict[str, str] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    notes: dict[str, list[str]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    main: list[Measurement] = field(default_factory=list)
    scaling_workers: list[Measurement] = field(default_factory=list)
    scaling_connections: list[Measurement] = field(default_factory=list)
    scaling_skipped: str = ""
    failures: list[str] = field(default_factory=list)
    gol7lb_log: dict[str, str] = field(default_factory=dict)
    gol7lb_settings: dict[str, str] = field(default_factory=dict)
    stops: list[str] = field(default_factory=list)
    leftovers: list[str] = field(default_factory=list)
    finished: datetime | None = None
    elapsed_s: float = 0.0
    interrupted: str = ""


class Bench:
    def __init__(self, args: argparse.Namespace, tmp: Path, run: Run) -> None:
        self.args = args
        self.tmp = tmp
        self.run = run
        self.wrk = targets.find_tool("wrk") or ""
        self.procs: list[Proc] = []       # every process started, for the final stop
        self.stopped: set[int] = set()    # PIDs of roots already stopped
        self.backends: list[targets.Backend] = []
        self.active: dict[str, targets.Target] = {}

    # ------------------------------------------------------------------ processes

    def keep(self, proc: Proc) -> Proc:
        self.procs.append(proc)
        return proc

    def stop(self, proc: Proc, timeout: float = 15.0) -> None:
        start = time.monotonic()
        code = proc.stop(timeout=timeout)
        self.stopped.add(proc.pid)
        if proc.killed:
            how = "SIGKILL needed for " + "; ".join(proc.killed_what)
        elif code is not None and code < 0:
            how = f"ended by {signal.Signals(-code).name}"
        else:
            how = f"exit status {code}"
        self.run.stops.append(f"{proc.name}: stopped in {time.monotonic() - start:.1f} s, {how}")

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            if proc.pid not in self.stopped:
                self.stop(proc)
        for proc in self.procs:
            left = proc.leftovers()
            if left:
                self.run.leftovers.append(f"{proc.name}: PIDs {left} still alive")

    def start_target(self, key: str, starter) -> targets.Target | None:
        print(f"starting {key} ...", flush=True)
        try:
            target = starter()
        except StartError as exc:
            self.skip(key, f"did not start: {exc}")
            return None
        except Exception as exc:  # a broken config generator must not stop the others
            self.skip(key, f"did not start: {type(exc).__name__}: {exc}")
            return None
        self.keep(target.proc)
        self.run.labels[key] = target.label
        self.run.notes[key] = target.notes
        print(f"  {target.label} listens on 127.0.0.1:{target.port}", flush=True)
        return target

    def skip(self, key: str, reason: str) -> None:
        self.run.skipped[key] = reason
        print(f"SKIPPED {key}: {reason}", flush=True)

    # ------------------------------------------------------------------ measuring

    def served(self) -> list[int | None]:
        return [b.requests_served() for b in self.backends]

    def one(self, key: str, target: targets.Target, conns: int, rep: int,
            quiet: bool = False) -> Measurement | None:
        """One wrk run; a target that dies or breaks wrk is reported and taken out."""
        before = self.served()
        try:
            m, _ = measure(self.wrk, key, target.port, target.proc, conns,
                           self.args.duration, rep)
        except Exception as exc:
            msg = f"{key} at {conns} connections (repetition {rep}): {type(exc).__name__}: {exc}"
            self.run.failures.append(msg)
            print("FAILED " + msg, flush=True)
            m = None
        after = self.served()
        if m is not None and m.requests < 100:
            msg = (f"{key} at {conns} connections (repetition {rep}): only {m.requests} "
                   f"requests completed in {self.args.duration:g} s (stalled), "
                   f"socket errors {m.socket_errors}")
            self.run.failures.append(msg)
            print("STALLED " + msg, flush=True)
        if m is not None and None not in before and None not in after:
            m.spread = [a - b for a, b in zip(after, before, strict=True)]
        if not target.proc.alive():
            reason = (f"exited with status {target.proc.popen.returncode} during load at "
                      f"{conns} connections; log tail:\n{target.proc.log_tail()}")
            self.run.failures.append(f"{key}: {reason}")
            self.active.pop(key, None)
            print(f"FAILED {key}: {reason}", flush=True)
        if m is not None and not quiet:
            extra = ""
            if m.non_2xx or m.errors:
                extra = f"  non-2xx {m.non_2xx}, socket errors {m.socket_errors}"
            print(f"  {key:<11} c={conns:<4} {m.rps:>10.0f} req/s  p50 {m.p50_ms:6.2f} ms  "
                  f"p99 {m.p99_ms:7.2f} ms  {m.cpu_us_per_req:7.1f} us/req  "
                  f"{m.peak_rss_mib:6.1f} MiB{extra}", flush=True)
        time.sleep(0.3)
        return m

    def warm_up(self, key: str, target: targets.Target) -> None:
        """One short run so pools, caches and workers are warm before anything counts."""
        try:
            measure(self.wrk, key, target.port, target.proc, 32, 1.0, 0)
        except Exception as exc:
            print(f"warm-up of {key} failed: {exc}", flush=True)

    # ------------------------------------------------------------------ phases

    def setup(self) -> None:
        args = self.args
        for i in range(1, 4):
            backend = targets.start_backend(self.tmp, i)
            self.keep(backend.proc)
            self.backends.append(backend)
        self.run.labels["direct"] = "direct (one backend)"
        self.run.notes["direct"] = ["nginx, `return 200 \"ok\\n\"`, access_log off, "
                                    "worker_processes 2; CPU and RSS are the backend's"]
        b1 = self.backends[0]
        direct = targets.Target("direct", self.run.labels["direct"], b1.port, b1.proc)
        settings = (targets.gunicorn_settings_of_gol7lb(self.tmp, self.backends)
                    if "gol7lb" in args.only or "wsgiproxy2" in args.only else {})
        self.run.gol7lb_settings = settings
        starters = {
            "direct": lambda: direct,
            "gol7lb": lambda: targets.start_gol7lb(self.tmp, self.backends, args.workers),
            "haproxy": lambda: targets.start_haproxy(self.tmp, self.backends),
            "nginx": lambda: targets.start_nginx_lb(self.tmp, self.backends),
            "wsgiproxy2": lambda: targets.start_wsgiproxy2(self.tmp, self.backends,
                                                           args.workers, settings),
            "proxypy": lambda: targets.start_proxypy(self.tmp, self.backends, args.workers),
            "noop8": lambda: targets.start_noop(self.tmp, args.workers, 8),
            "noop32": lambda: targets.start_noop(self.tmp, args.workers, 32),
            "pyhaproxy": lambda: targets.start_pyhaproxy(self.tmp, self.backends),
            "urllib3proxy": lambda: targets.start_urllib3_proxy(self.tmp, self.backends,
                                                                args.workers),
        }
        for key in ORDER:
            if key not in args.only:
                continue
            if key == "direct":
                self.active[key] = direct
                continue
            target = self.start_target(key, starters[key])
            if target is not None:
                self.active[key] = target
        for key, target in self.active.items():
            self.warm_up(key, target)

    def main_comparison(self) -> None:
        args = self.args
        for rep in range(1, args.repetitions + 1):
            for conns in args.connections:
                keys = [k for k in ORDER if k in self.active]
                shift = (rep - 1) % max(len(keys), 1)   # rotate so no target is always first
                keys = keys[shift:] + keys[:shift]
                print(f"[repetition {rep}/{args.repetitions}] {conns} connections", flush=True)
                for key in keys:
                    target = self.active.get(key)
                    if target is None or (key in bench_report.NOOPS
                                          and conns != bench_report.GOAL_CONNS):
                        continue  # the do-nothing app is a bar at the goal's 32 connections
                    m = self.one(key, target, conns, rep)
                    if m is not None:
                        self.run.main.append(m)

    def scaling(self) -> None:
        args = self.args
        if "gol7lb" not in self.active:
            self.run.scaling_skipped = ("GoL7-LB is not running: "
                                        + self.run.skipped.get("gol7lb", "see failures"))
            return
        print("[scaling] GoL7-LB req/s against connections (with direct)", flush=True)
        for conns in args.scaling_connections:
            for key in ("direct", "gol7lb"):
                target = self.active.get(key)
                if target is not None:
                    m = self.one(key, target, conns, 1)
                    if m is not None:
                        self.run.scaling_connections.append(m)
        # The main instance is stopped so each worker count runs alone.
        main = self.active.pop("gol7lb", None)
        if main is not None:
            self.stop(main.proc, timeout=35)
        print("[scaling] GoL7-LB req/s against workers at 32 connections", flush=True)
        for workers in args.scaling_workers:
            print(f"starting GoL7-LB with WEB_CONCURRENCY={workers} ...", flush=True)
            try:
                target = targets.start_gol7lb(self.tmp, self.backends, workers)
            except StartError as exc:
                self.run.failures.append(f"gol7lb with {workers} workers did not start: {exc}")
                print(f"FAILED: {exc}", flush=True)
                continue
            self.keep(target.proc)
            try:
                self.warm_up("gol7lb", target)
                m = self.one(f"gol7lb-w{workers}", target, 32, 1)
                if m is not None:
                    self.run.scaling_workers.append(m)
            finally:
                self.run.gol7lb_log[f"WEB_CONCURRENCY={workers}"] = gol7lb_log_summary(
                    target.proc)
                self.stop(target.proc, timeout=35)

    def collect_gol7lb_log(self) -> None:
        target = self.active.get("gol7lb")
        if target is not None:
            self.run.gol7lb_log[f"WEB_CONCURRENCY={self.args.workers} (main run)"] = (
                gol7lb_log_summary(target.proc))


def gol7lb_log_summary(proc: Proc) -> str:
    """Counts of worrying lines in GoL7-LB's log plus a few of them."""
    try:
        lines = proc.log_path.read_text(errors="replace").splitlines()
    except OSError:
        return "log unreadable"
    words = ("Traceback", "ERROR", "CRITICAL", "WORKER TIMEOUT", "Exception", "Error")
    bad = [ln for ln in lines if any(w in ln for w in words)]
    if not bad:
        return f"{len(lines)} log lines, none with an error"
    shown = "\n".join(ln[:200] for ln in bad[:8])
    return f"{len(lines)} log lines, {len(bad)} with an error word; first ones:\n{shown}"


def estimate_seconds(args: argparse.Namespace) -> float:
    per_run = args.duration + 0.8
    n = len(args.only)
    noops = len([k for k in bench_report.NOOPS if k in args.only])
    total = 25 + n * 2.5 + args.repetitions * len(args.connections) * (n - noops) * per_run
    total += args.repetitions * noops * per_run
    if not args.no_scaling and "gol7lb" in args.only:
        total += len(args.scaling_connections) * 2 * per_run
        total += len(args.scaling_workers) * (per_run + 8)
    return total


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    wrk = targets.find_tool("wrk")
    missing = [t for t in ("wrk", "nginx") if not targets.find_tool(t)]
    if missing or not wrk:
        print(f"missing {missing}: run `bash benchmarks/setup.sh` first", file=sys.stderr)
        return 2
    run = Run(args=args, started=datetime.now())
    run.machine = bench_report.machine_info()
    args.out.mkdir(parents=True, exist_ok=True)
    stem = run.started.strftime("%Y-%m-%d-%H%M")
    print(f"estimated time: {estimate_seconds(args) / 60:.1f} min; report: "
          f"{args.out / (stem + '.md')}", flush=True)

    def on_term(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    old_term = signal.signal(signal.SIGTERM, on_term)
    tmp = Path(tempfile.mkdtemp(prefix="gol7lb-bench-"))
    bench = Bench(args, tmp, run)
    t0 = time.monotonic()
    status = 0
    try:
        bench.setup()
        bench.main_comparison()
        if args.no_scaling:
            run.scaling_skipped = "turned off with --no-scaling"
        else:
            bench.collect_gol7lb_log()
            bench.scaling()
        bench.collect_gol7lb_log()
    except KeyboardInterrupt as exc:
        run.interrupted = f"interrupted ({exc or 'Ctrl-C'}); figures are partial"
        print(run.interrupted, file=sys.stderr)
        status = 130
    except Exception as exc:
        run.interrupted = f"stopped by an error: {type(exc).__name__}: {exc}"
        traceback.print_exc()
        status = 1
    finally:
        print("stopping every process started ...", flush=True)
        bench.stop_all()
        signal.signal(signal.SIGTERM, old_term)
        if args.keep_tmp:
            print(f"temp dir kept: {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    run.finished = datetime.now()
    run.elapsed_s = time.monotonic() - t0
    if run.leftovers:
        print("LEFT BEHIND: " + "; ".join(run.leftovers), file=sys.stderr)
        status = status or 1
    else:
        print(f"all {sum(len(p.seen) for p in bench.procs)} processes started are gone "
              "(checked with psutil)")
    md = args.out / f"{stem}.md"
    png = args.out / f"{stem}.png"
    chart_note = bench_report.write_chart(run, png)
    md.write_text(bench_report.markdown(run, png.name if chart_note is None else None,
                                        chart_note))
    (args.out / f"{stem}.json").write_text(json.dumps(bench_report.as_json(run), indent=1))
    print(f"report: {md}")
    print(bench_report.goals_text(run))
    print(f"elapsed {run.elapsed_s / 60:.1f} min")
    return status


if __name__ == "__main__":
    sys.exit(main())
