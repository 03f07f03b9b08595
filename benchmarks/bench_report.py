"""The Markdown report, the PNG chart and the JSON dump of one benchmark run."""

from __future__ import annotations

import math
import os
import platform
import statistics
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING

import psutil
from bench_load import Measurement
from bench_targets import REPO, find_tool

if TYPE_CHECKING:
    from run import Run

ORDER = ["direct", "gol7lb", "noop8", "noop32", "haproxy", "nginx", "wsgiproxy2", "proxypy",
         "pyhaproxy", "urllib3proxy"]
PEERS = ["wsgiproxy2", "proxypy", "pyhaproxy", "urllib3proxy"]
NOOPS = ["noop8", "noop32"]  # gunicorn gthread serving a do-nothing app: the bar for our worker
COLORS = {"direct": "tab:gray", "gol7lb": "tab:orange", "haproxy": "tab:blue",
          "nginx": "tab:green", "wsgiproxy2": "tab:purple", "proxypy": "tab:brown",
          "noop8": "tab:olive", "noop32": "tab:cyan", "pyhaproxy": "tab:pink",
          "urllib3proxy": "tab:red"}
GOAL_CONNS = 32
GOALS = {  # the project's goals, checked at GOAL_CONNS connections
    "vs_haproxy": 0.15,     # GoL7-LB req/s >= 0.15 x HAProxy
    "vs_noop": 1.3,         # GoL7-LB req/s >= 1.3 x gunicorn gthread's do-nothing app (best)
    "vs_peer": 3.0,         # GoL7-LB req/s >= 3 x the best Python peer
    "cpu_us": 150.0,        # CPU per request <= 150 us
    "p99_ms": 10.0,         # p99 <= 10 ms
}


# --------------------------------------------------------------------------- machine


def _cmd(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    text = (out.stdout + out.stderr).strip()
    return text.splitlines()[0].strip() if text else "unknown"


def _pkg(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def machine_info() -> dict[str, str]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    tools = {t: find_tool(t) for t in ("haproxy", "nginx", "wrk")}
    commit = _cmd(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    dirty = _cmd(["git", "-C", str(REPO), "status", "--porcelain", "--", "gol7lb",
                  "gunicorn.conf.py"])
    load = os.getloadavg()
    return {
        "nproc": str(os.cpu_count()),
        "CPU model": cpu,
        "memory": f"{psutil.virtual_memory().total / 2**30:.1f} GiB",
        "kernel": f"{platform.system()} {platform.release()}",
        "Python": platform.python_version(),
        "gunicorn": _pkg("gunicorn"),
        "HAProxy": _cmd([tools["haproxy"], "-v"]) if tools["haproxy"] else "not installed",
        "nginx": _cmd([tools["nginx"], "-v"]) if tools["nginx"] else "not installed",
        "wrk": _cmd([tools["wrk"], "-v"]) if tools["wrk"] else "not installed",
        "WSGIProxy2": _pkg("WSGIProxy2"),
        "proxy.py": _pkg("proxy.py"),
        "urllib3": _pkg("urllib3"),
        "GoL7-LB commit": commit + (" (gol7lb/ or gunicorn.conf.py has uncommitted changes)"
                                    if dirty and dirty != "unknown" else ""),
        "load average at start": " ".join(f"{x:.2f}" for x in load),
    }


# --------------------------------------------------------------------------- figures


def _med(values: list[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return statistics.median(values) if values else float("nan")


def runs_of(ms: list[Measurement], key: str, conns: int) -> list[Measurement]:
    return [m for m in ms if m.target == key and m.connections == conns]


def ratio_median(ms: list[Measurement], key: str, ref_keys: list[str], conns: int) -> float:
    """Median over repetitions of key's req/s / the best of ref_keys' req/s in the same one."""
    ratios = []
    for m in runs_of(ms, key, conns):
        refs = [r.rps for k in ref_keys for r in runs_of(ms, k, conns)
                if r.repetition == m.repetition and r.rps > 0]
        if refs:
            ratios.append(m.rps / max(refs))
    return _med(ratios)


def summary(ms: list[Measurement]) -> dict[str, float]:
    return {
        "rps": _med([m.rps for m in ms]),
        "p50": _med([m.p50_ms for m in ms]),
        "p99": _med([m.p99_ms for m in ms]),
        "cpu": _med([m.cpu_us_per_req for m in ms]),
        "rss": max((m.peak_rss_mib for m in ms), default=float("nan")),
        "non_2xx": sum(m.non_2xx for m in ms),
        "errors": sum(m.errors for m in ms),
        "requests": sum(m.requests for m in ms),
    }


def _f(value: float, digits: int = 0, suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:,.{digits}f}{suffix}"


def goals(run: Run) -> list[tuple[str, str, str]]:
    """(goal, measured, PASS/FAIL/n/a) for the project's goals."""
    ms = run.main
    g = runs_of(ms, "gol7lb", GOAL_CONNS)
    out = []
    if not g:
        why = run.skipped.get("gol7lb", "no measurement at 32 connections").split("\n")[0]
        why = f"GoL7-LB not measured ({why[:150]})"
        for goal in goal_names():
            out.append((goal, why, "FAIL"))
        return out
    s = summary(g)
    r_h = ratio_median(ms, "gol7lb", ["haproxy"], GOAL_CONNS)
    if math.isnan(r_h):
        out.append((goal_names()[0], "HAProxy not measured", "n/a"))
    else:
        out.append((goal_names()[0], f"{r_h:.3f}x",
                    "PASS" if r_h >= GOALS["vs_haproxy"] else "FAIL"))
    noops = [k for k in NOOPS if runs_of(ms, k, GOAL_CONNS)]
    r_n = ratio_median(ms, "gol7lb", noops, GOAL_CONNS) if noops else float("nan")
    if math.isnan(r_n):
        out.append((goal_names()[4], "do-nothing app not measured", "n/a"))
    else:
        best = max(noops, key=lambda k: summary(runs_of(ms, k, GOAL_CONNS))["rps"])
        out.append((goal_names()[4], f"{r_n:.2f}x (best: {run.labels.get(best, best)})",
                    "PASS" if r_n >= GOALS["vs_noop"] else "FAIL"))
    peers = [k for k in PEERS if runs_of(ms, k, GOAL_CONNS)]
    r_p = ratio_median(ms, "gol7lb", peers, GOAL_CONNS) if peers else float("nan")
    if math.isnan(r_p):
        out.append((goal_names()[1], "no Python peer measured", "n/a"))
    else:
        best = max(peers, key=lambda k: summary(runs_of(ms, k, GOAL_CONNS))["rps"])
        out.append((goal_names()[1], f"{r_p:.2f}x (best peer: {run.labels.get(best, best)})",
                    "PASS" if r_p >= GOALS["vs_peer"] else "FAIL"))
    out.append((goal_names()[2], f"{s['cpu']:.0f} µs",
                "PASS" if s["cpu"] <= GOALS["cpu_us"] else "FAIL"))
    out.append((goal_names()[3], f"{s['p99']:.2f} ms",
                "PASS" if s["p99"] <= GOALS["p99_ms"] else "FAIL"))
    return out


def goal_names() -> list[str]:
    return [
        f"throughput at {GOAL_CONNS} connections >= {GOALS['vs_haproxy']}x HAProxy",
        f"throughput at {GOAL_CONNS} connections >= {GOALS['vs_peer']}x the best Python peer",
        f"CPU per request at {GOAL_CONNS} connections <= {GOALS['cpu_us']:.0f} µs",
        f"p99 latency at {GOAL_CONNS} connections <= {GOALS['p99_ms']:.0f} ms",
        f"throughput at {GOAL_CONNS} connections >= {GOALS['vs_noop']}x gunicorn gthread's "
        "do-nothing app (best of 8 and 32 threads)",
    ]


def goals_text(run: Run) -> str:
    return "\n".join(f"{verdict:<4}  {goal}: {measured}" for goal, measured, verdict in goals(run))


# --------------------------------------------------------------------------- markdown


def _table(header: list[str], rows: list[list[str]], align: str = "") -> str:
    align = align or "l" + "r" * (len(header) - 1)
    sep = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _spread_text(ms: list[Measurement]) -> str:
    totals = None
    for m in ms:
        if m.spread is None:
            continue
        totals = m.spread if totals is None else [a + b for a, b in zip(totals, m.spread,
                                                                         strict=True)]
    if not totals or sum(totals) == 0:
        return "n/a"
    s = sum(totals)
    return " / ".join(f"{100 * t / s:.1f}" for t in totals)


def markdown(run: Run, png_name: str | None, chart_note: str | None) -> str:
    a = run.args
    ms = run.main
    keys = [k for k in ORDER if any(m.target == k for m in ms)]
    out = [f"# GoL7-LB benchmark, {run.started:%Y-%m-%d %H:%M}", ""]
    if run.interrupted:
        out += [f"**Incomplete run: {run.interrupted}.**", ""]
    cmd = "python benchmarks/run.py"
    defaults = {"--duration": 5.0, "--repetitions": 3, "--workers": 2}
    for flag, value in (("--duration", a.duration), ("--repetitions", a.repetitions),
                        ("--workers", a.workers)):
        if value != defaults[flag] and not a.quick:
            cmd += f" {flag} {value:g}"
    if a.quick:
        cmd += " --quick"
    if a.no_scaling:
        cmd += " --no-scaling"
    if a.connections != [1, 32, 128]:
        cmd += " --connections " + ",".join(map(str, a.connections))
    if a.only != ORDER:
        cmd += " --only " + ",".join(a.only)
    load1 = float(run.machine.get("load average at start", "0").split()[0])
    if load1 > 1.0:
        out += [f"**The machine was not idle when the run started (1-minute load average "
                f"{load1:.2f} on {run.machine.get('nproc', '?')} cores): other work may have "
                f"shared the CPUs, making absolute figures lower and noisier; the ratios per "
                f"repetition are the more reliable part.**", ""]
    out += [f"Command: `bash benchmarks/setup.sh && {cmd}` "
            f"({run.elapsed_s / 60:.1f} min, finished {run.finished:%H:%M}).", ""]

    # goals first: that is what a reader looks for
    out += ["## Goals", "", _table(["goal", "this run", "verdict"],
                                    [[g, m, f"**{v}**"] for g, m, v in goals(run)], "lll"), ""]

    out += ["## Machine", ""]
    out += [f"- {k}: {v}" for k, v in run.machine.items()]
    out += [f"- load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", ""]

    out += ["## Method", "",
            "- Three backends: separate nginx instances on free 127.0.0.1 ports, each "
            "`return 200 \"ok\\n\"` with access_log off and worker_processes 2, plus a "
            "stub_status port used only to count how the load balancers spread requests.",
            f"- Load: `wrk -t1 -c<C> -d{a.duration:g}s --latency --timeout 2s` at "
            f"{', '.join(map(str, a.connections))} connections, keep-alive, `GET /`. One wrk "
            f"thread, so the top figures (direct, HAProxy, nginx) are bounded by wrk and the "
            f"2 cores shared by wrk, the LB and the backends.",
            f"- Interleaved: {a.repetitions} repetition(s); in each, every connection count and "
            f"within it every target in turn (the order rotates by one target each "
            f"repetition). A 1 s warm-up per target precedes all runs.",
            "- req/s, p50 and p99: median over repetitions. `x HAProxy`: req/s divided by "
            "HAProxy's in the same repetition and connection count, then the median of those "
            "ratios, so drift of the machine between repetitions cancels.",
            "- CPU µs/request: user+system CPU seconds of the target's whole process tree "
            "(root, all descendants, and whatever they reaped) from psutil before and after "
            "each wrk run, divided by the requests wrk completed; median over repetitions. For "
            "`direct` it is the backend's nginx.",
            "- Peak RSS: sum of RSS over the process tree, sampled every 0.2 s during load; "
            "the maximum over repetitions.",
            "- Keep-alive is never cut by request count: nginx `keepalive_requests` is raised "
            "to 10M on backends and the nginx LB.",
            "- The machine is shared with other engineers' test runs; a busy neighbour shows as "
            "a dip in one repetition (see the per-repetition req/s column). Load averages "
            "above.",
            ""]
    out += ["Targets:", ""]
    for k in ORDER:
        if k in run.labels:
            notes = "; ".join(run.notes.get(k, []))
            out.append(f"- **{run.labels[k]}**: {notes}")
    if run.gol7lb_settings:
        sets = ", ".join(f"{k}={v}" for k, v in sorted(run.gol7lb_settings.items()))
        out.append(f"- GoL7-LB's gunicorn settings (`--print-config`): {sets}; the WSGIProxy2 "
                   "peer runs stock gthread with the same threads, keep-alive and reuse_port.")
    out.append("")

    out += ["## Results", ""]
    if png_name:
        out += [f"![req/s per target and scaling]({png_name})", ""]
    elif chart_note:
        out += [f"(no chart: {chart_note})", ""]
    for conns in a.connections:
        rows = []
        for k in keys:
            rs = runs_of(ms, k, conns)
            if not rs:
                continue
            s = summary(rs)
            ratio = ratio_median(ms, k, ["haproxy"], conns)
            reps = " / ".join(f"{m.rps:,.0f}" for m in sorted(rs, key=lambda m: m.repetition))
            rows.append([run.labels.get(k, k), _f(s["rps"]), _f(ratio, 3, "x"),
                         _f(s["p50"], 2), _f(s["p99"], 2), _f(s["cpu"], 1),
                         _f(s["rss"], 1), f"{s['non_2xx']:,} / {s['errors']:,}", reps])
        out += [f"### {conns} connection{'s' if conns != 1 else ''}", "",
                _table(["target", "req/s", "x HAProxy", "p50 ms", "p99 ms", "CPU µs/req",
                        "peak RSS MiB", "non-2xx / socket errors", "req/s per repetition"],
                       rows), ""]

    spread_rows = [[run.labels.get(k, k), _spread_text([m for m in ms if m.target == k])]
                   for k in keys if k != "direct"]
    if spread_rows:
        out += ["### Spread over the three backends", "",
                "Share of the requests each backend served (nginx stub_status counters read "
                "before and after every run), all runs of the main comparison added up. Round "
                "robin should give 33.3 each.", "",
                _table(["target", "% backend 1 / 2 / 3"], spread_rows, "lr"), ""]

    out += ["## Scaling of GoL7-LB", ""]
    if run.scaling_skipped:
        out += [f"Not run: {run.scaling_skipped}.", ""]
    else:
        w_rows = []
        base = None
        for m in run.scaling_workers:
            workers = int(m.target.rsplit("w", 1)[1])
            if base is None and workers == 1:
                base = m.rps
            w_rows.append([str(workers), _f(m.rps), _f(m.rps / base if base else float("nan"),
                                                       2, "x"),
                           _f(m.p50_ms, 2), _f(m.p99_ms, 2), _f(m.cpu_us_per_req, 1),
                           _f(m.peak_rss_mib, 1), f"{m.non_2xx:,} / {m.errors:,}"])
        out += [f"### Against workers (WEB_CONCURRENCY), 32 connections, one {a.duration:g} s "
                "run each, each worker count started alone", "",
                _table(["workers", "req/s", "x 1 worker", "p50 ms", "p99 ms", "CPU µs/req",
                        "peak RSS MiB", "non-2xx / socket errors"], w_rows), ""]
        c_rows = []
        for conns in a.scaling_connections:
            d = runs_of(run.scaling_connections, "direct", conns)
            g = runs_of(run.scaling_connections, "gol7lb", conns)
            if not g:
                continue
            gm = g[0]
            dm = d[0] if d else None
            nan = float("nan")
            c_rows.append([
                str(conns), _f(gm.rps), _f(dm.rps if dm else nan),
                _f(gm.rps / dm.rps if dm and dm.rps else nan, 3, "x"),
                _f(gm.p50_ms, 2), _f(gm.p50_ms - dm.p50_ms if dm else nan, 2),
                _f(gm.p99_ms, 2), _f(gm.p99_ms - dm.p99_ms if dm else nan, 2),
                _f(gm.cpu_us_per_req, 1), f"{gm.non_2xx:,} / {gm.errors:,}"])
        out += [f"### Against connections, WEB_CONCURRENCY={a.workers}, one {a.duration:g} s "
                "run each (GoL7-LB and direct interleaved)", "",
                _table(["connections", "GoL7-LB req/s", "direct req/s", "x direct",
                        "p50 ms", "p50 added ms", "p99 ms", "p99 added ms", "CPU µs/req",
                        "non-2xx / socket errors"], c_rows),
                "", "`added` is GoL7-LB's latency minus direct's at the same connection count.",
                ""]

    out += ["## Skipped or failed", ""]
    if not run.skipped and not run.failures:
        out += ["Nothing: every target started and answered every run.", ""]
    for k, reason in run.skipped.items():
        out += [f"- **{run.labels.get(k, k)}** skipped: " + _block(reason)]
    for f in run.failures:
        out += ["- " + _block(f)]
    out.append("")

    if run.gol7lb_log:
        out += ["## GoL7-LB's log", ""]
        for name, text in run.gol7lb_log.items():
            out += [f"- {name}: " + _block(text)]
        out.append("")

    out += ["## Processes", ""]
    out += [f"- {s}" for s in run.stops]
    if run.leftovers:
        out += [f"- **LEFT BEHIND**: {s}" for s in run.leftovers]
    else:
        out += ["- every process started (and every descendant seen) is gone, checked with "
                "psutil after the stop"]
    out.append("")
    return "\n".join(out)


def _block(text: str) -> str:
    first, _, rest = text.partition("\n")
    if not rest:
        return first
    return first + "\n\n  ```text\n" + "\n".join("  " + ln for ln in rest.splitlines()) + \
        "\n  ```"


# --------------------------------------------------------------------------- chart


def write_chart(run: Run, path: Path) -> str | None:
    """The PNG; returns None when written, else why not."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (run benchmarks/setup.sh)"
    ms = run.main
    keys = [k for k in ORDER if any(m.target == k for m in ms)]
    if not keys:
        return "no measurement"
    scaling = bool(run.scaling_workers or run.scaling_connections)
    ncols = 3 if scaling else 1
    fig, axes = plt.subplots(1, ncols, figsize=(6 * ncols, 4.6), squeeze=False)
    ax = axes[0][0]
    conns = run.args.connections
    width = 0.8 / len(keys)
    for i, k in enumerate(keys):
        vals = [summary(runs_of(ms, k, c))["rps"] for c in conns]
        xs = [j + (i - (len(keys) - 1) / 2) * width for j in range(len(conns))]
        ax.bar(xs, [0 if math.isnan(v) else v for v in vals], width,
               label=run.labels.get(k, k), color=COLORS.get(k))
    ax.set_xticks(range(len(conns)), [f"{c} conn" for c in conns])
    ax.set_yscale("log")
    ax.set_ylabel("req/s (median, log scale)")
    ax.set_title("Throughput by target")
    ax.legend(fontsize=7)
    ax.grid(axis="y", which="both", alpha=0.3)
    if scaling:
        ax = axes[0][1]
        if run.scaling_workers:
            ws = [int(m.target.rsplit("w", 1)[1]) for m in run.scaling_workers]
            ax.bar(ws, [m.rps for m in run.scaling_workers], color=COLORS["gol7lb"])
            ax.set_xticks(ws)
        ax.set_xlabel("WEB_CONCURRENCY")
        ax.set_ylabel("req/s at 32 connections")
        ax.set_title("GoL7-LB against workers")
        ax.grid(axis="y", alpha=0.3)
        ax = axes[0][2]
        for key, style in (("gol7lb", "o-"), ("direct", "s--")):
            pts = sorted((m.connections, m.rps) for m in run.scaling_connections
                         if m.target == key)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, color=COLORS[key],
                        label=run.labels.get(key, key) + " req/s")
        ax.set_xscale("log", base=2)
        cs = sorted({m.connections for m in run.scaling_connections})
        if cs:
            ax.set_xticks(cs, [str(c) for c in cs])
        ax.set_yscale("log")
        ax.set_xlabel("connections")
        ax.set_ylabel("req/s (log)")
        ax.set_title("GoL7-LB against connections")
        ax2 = ax.twinx()
        pts = sorted((m.connections, m.p99_ms) for m in run.scaling_connections
                     if m.target == "gol7lb")
        if pts:
            ax2.plot([p[0] for p in pts], [p[1] for p in pts], "^:", color="tab:red",
                     label="GoL7-LB p99 ms")
            ax2.set_ylabel("p99 ms", color="tab:red")
        lines = ax.get_legend_handles_labels()
        lines2 = ax2.get_legend_handles_labels()
        ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=7, loc="lower right")
        ax.grid(alpha=0.3)
    fig.suptitle(f"GoL7-LB benchmark {run.started:%Y-%m-%d %H:%M} "
                 f"({run.machine.get('nproc', '?')} cores)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None


# --------------------------------------------------------------------------- json


def as_json(run: Run) -> dict:
    a = run.args
    return {
        "started": run.started.isoformat(timespec="seconds"),
        "elapsed_s": round(run.elapsed_s, 1),
        "settings": {"duration": a.duration, "repetitions": a.repetitions,
                     "connections": a.connections, "workers": a.workers, "quick": a.quick,
                     "scaling": not a.no_scaling, "targets": a.only},
        "machine": run.machine,
        "labels": run.labels,
        "skipped": run.skipped,
        "failures": run.failures,
        "goals": [{"goal": g, "measured": m, "verdict": v} for g, m, v in goals(run)],
        "main": [m.to_dict() for m in run.main],
        "scaling_workers": [m.to_dict() for m in run.scaling_workers],
        "scaling_connections": [m.to_dict() for m in run.scaling_connections],
        "interrupted": run.interrupted,
    }
