"""One wrk run against one target, with the target's CPU and memory measured around it."""

from __future__ import annotations

import re
import subprocess
from dataclasses import asdict, dataclass, field

from bench_procs import Proc, RssSampler, tree_cpu_seconds

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def _ms(value: str, unit: str) -> float:
    return float(value) * _UNITS[unit]


@dataclass
class WrkResult:
    rps: float
    requests: int
    p50_ms: float
    p99_ms: float
    non_2xx: int = 0
    socket_errors: dict[str, int] = field(default_factory=dict)

    @property
    def errors(self) -> int:
        return sum(self.socket_errors.values())


def parse_wrk(text: str) -> WrkResult:
    """req/s, request count, p50, p99, non-2xx/3xx count and socket errors from wrk's output."""
    m = re.search(r"Requests/sec:\s+([\d.]+)", text)
    if not m:
        raise ValueError(f"no Requests/sec in wrk output:\n{text}")
    rps = float(m.group(1))
    m = re.search(r"(\d+) requests in", text)
    requests = int(m.group(1)) if m else 0
    pct = {}
    for p, value, unit in re.findall(r"^\s*(50|99)(?:\.0+)?%\s+([\d.]+)(us|ms|s|m|h)\s*$",
                                     text, re.M):
        pct[p] = _ms(value, unit)
    m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    non_2xx = int(m.group(1)) if m else 0
    errors = {}
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if m:
        errors = dict(zip(("connect", "read", "write", "timeout"),
                          (int(g) for g in m.groups()), strict=True))
    return WrkResult(rps=rps, requests=requests, p50_ms=pct.get("50", float("nan")),
                     p99_ms=pct.get("99", float("nan")), non_2xx=non_2xx, socket_errors=errors)


@dataclass
class Measurement:
    """One wrk run: wrk's figures plus the CPU and peak RSS of the target's process tree."""

    target: str
    connections: int
    repetition: int
    rps: float
    requests: int
    p50_ms: float
    p99_ms: float
    non_2xx: int
    errors: int
    socket_errors: dict[str, int]
    cpu_s: float
    cpu_us_per_req: float
    peak_rss_mib: float
    spread: list[int] | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def run_wrk(wrk: str, port: int, connections: int, duration: float,
            path: str = "/") -> tuple[WrkResult, str]:
    """`wrk -t1 -cC -dDs --latency`, bounded: killed if it overruns by 20 s."""
    argv = [wrk, "-t1", f"-c{connections}", f"-d{duration:g}s", "--latency", "--timeout", "2s",
            f"http://127.0.0.1:{port}{path}"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 20)
    text = out.stdout + out.stderr
    if out.returncode != 0:
        raise RuntimeError(f"wrk exited with {out.returncode}: {text.strip()[-500:]}")
    return parse_wrk(text), text


def measure(wrk: str, target_key: str, port: int, proc: Proc, connections: int,
            duration: float, repetition: int) -> tuple[Measurement, str]:
    """Load one target once; CPU is user+system of its whole tree before/after the run."""
    cpu_before = tree_cpu_seconds(proc.tree())
    with RssSampler(proc) as sampler:
        result, text = run_wrk(wrk, port, connections, duration)
    cpu = tree_cpu_seconds(proc.tree()) - cpu_before
    per_req = cpu / result.requests * 1e6 if result.requests else float("nan")
    return Measurement(
        target=target_key, connections=connections, repetition=repetition,
        rps=result.rps, requests=result.requests, p50_ms=result.p50_ms, p99_ms=result.p99_ms,
        non_2xx=result.non_2xx, errors=result.errors, socket_errors=result.socket_errors,
        cpu_s=cpu, cpu_us_per_req=per_req, peak_rss_mib=sampler.peak / 2**20,
    ), text
