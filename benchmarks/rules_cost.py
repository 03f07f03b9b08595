"""Per-request cost of the route rules (gol7lb/rules.py): each rule on its own, on the real
compiled code, and a route with all of them on against a plain route, through a real LB in
the same run.

Run: python benchmarks/rules_cost.py [--duration 5] [--repetitions 3] [--connections 16]
     [--micro-only]

(a) micro: microseconds per request of each compiled rule (allow/deny with its verdict
    cache, basic_auth with its verdict cache, redirect, rewrite on RE2, request_headers,
    response_headers, split) and of a route with all of them (but the answering ones);
(b) end to end: one GoL7-LB (WEB_CONCURRENCY=1) in front of one nginx backend, wrk on a
    plain route and on a route with allow, deny, basic_auth, rewrite, request_headers,
    response_headers and split, alternating, each run measured as the LB's CPU per request
    (user+system of its process tree, psutil) and req/s. Needs wrk and nginx
    (`bash benchmarks/setup.sh`).
"""

from __future__ import annotations

import argparse
import base64
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import bcrypt
from bench_load import parse_wrk
from bench_procs import Proc, free_port, tree_cpu_seconds, wait_http_ok
from bench_targets import REPO, find_tool, start_backend

sys.path.insert(0, str(REPO))  # this checkout's gol7lb, as the LB it starts runs it
from gol7lb.rules import (  # noqa: E402
    NO_RULES,
    BasicAuth,
    CompiledRules,
    HeaderRules,
    Redirect,
    Rewrite,
    RuleRequest,
    Rules,
)

PASSWORD = b"bench"
HASH = bcrypt.hashpw(PASSWORD, bcrypt.gensalt(12)).decode()  # the cost a deployment uses
AUTHORIZATION = "Basic " + base64.b64encode(b"alice:" + PASSWORD).decode()

ALL_ON = Rules(
    allow=("127.0.0.0/8", "10.0.0.0/8"), deny=("192.168.0.0/16",),
    basic_auth=BasicAuth("bench", (("alice", HASH),)),
    rewrite=Rewrite("^/rules/(.*)$", "/\\1"),
    request_headers=HeaderRules(set=(("X-Env", "bench"),), add=(("X-Via", "lb"),),
                                remove=("X-Debug",)),
    response_headers=HeaderRules(set=(("X-Frame-Options", "DENY"),), remove=("X-Powered-By",)),
    split=(("a", 90), ("b", 10)),
)


def per_call(fn: Callable[[], object], seconds: float = 0.4) -> float:
    """Microseconds per call, best of three timed batches."""
    best = float("inf")
    for _ in range(3):
        count = 0
        started = time.perf_counter()
        while time.perf_counter() - started < seconds:
            for _ in range(500):
                fn()
            count += 500
        best = min(best, (time.perf_counter() - started) / count * 1e6)
    return best


def _request_cost(rules: Rules) -> float:
    """What a request pays for these rules in the proxy: the pipeline, the header edits on
    a typical request and answer, the split pick."""
    compiled = CompiledRules(rules, "bench", "/rules/")
    environ = {"REMOTE_ADDR": "127.0.0.1", "HTTP_AUTHORIZATION": AUTHORIZATION,
               "HTTP_HOST": "bench.test", "RAW_URI": "/rules/x?q=1", "wsgi.url_scheme": "http"}
    upstream = {"Host": "bench.test", "User-Agent": "wrk", "Accept": "*/*", "X-Debug": "1",
                "X-Forwarded-For": "127.0.0.1", "X-Forwarded-Proto": "http",
                "X-Request-ID": "0" * 32}
    answer = [("Content-Type", "text/plain"), ("Content-Length", "3"),
              ("X-Powered-By", "x"), ("X-Request-ID", "0" * 32)]

    def one() -> object:
        request = RuleRequest(environ, "/rules/x", "/rules/x", "/rules/x?q=1", "bench.test",
                              "127.0.0.1", "/rules/")
        found = compiled.run(request)
        if compiled.request_headers is not None:
            compiled.request_headers.request(dict(upstream))
        if compiled.response_headers is not None:
            compiled.response_headers.response(answer)
        if compiled.split is not None:
            compiled.split.pick()
        return found
    one()  # the first basic_auth check runs bcrypt; then it is remembered
    return per_call(one)


def micro() -> list[tuple[str, float]]:
    baseline = _request_cost(NO_RULES)
    rows = [("no rules (baseline of the harness)", baseline)]
    for name, rules in [
        ("allow + deny", Rules(allow=ALL_ON.allow, deny=ALL_ON.deny)),
        ("basic_auth (remembered verdict)", Rules(basic_auth=ALL_ON.basic_auth)),
        ("redirect", Rules(redirect=Redirect("https://example.com{path_rest}?{query}", 308))),
        ("rewrite (RE2)", Rules(rewrite=ALL_ON.rewrite)),
        ("request_headers", Rules(request_headers=ALL_ON.request_headers)),
        ("response_headers", Rules(response_headers=ALL_ON.response_headers)),
        ("split", Rules(split=ALL_ON.split)),
        ("all of them but redirect", ALL_ON),
    ]:
        rows.append((name, _request_cost(rules) - baseline))
    started = time.perf_counter()
    bcrypt.checkpw(PASSWORD, HASH.encode())
    rows.append(("one bcrypt check, cost 12 (paid once per Authorization value)",
                 (time.perf_counter() - started) * 1e6))
    return rows


CONFIG = """
[reload]
watch = false
[admin]
bind = ""
[pools.a]
[[pools.a.backends]]
url = "{url}"
[pools.b]
[[pools.b.backends]]
url = "{url}"

[[routes]]
path_prefix = "/plain/"
pool = "a"

[[routes]]
path_prefix = "/rules/"
allow = ["127.0.0.0/8", "10.0.0.0/8"]
deny = ["192.168.0.0/16"]
basic_auth = {{ realm = "bench", users = {{ alice = "{hash}" }} }}
rewrite = {{ path_regex = "^/rules/(.*)$", replace = "/\\\\1" }}
request_headers.set = {{ "X-Env" = "bench" }}
request_headers.add = {{ "X-Via" = "lb" }}
request_headers.remove = ["X-Debug"]
response_headers.set = {{ "X-Frame-Options" = "DENY" }}
response_headers.remove = ["X-Powered-By"]
split = [ {{ pool = "a", weight = 90 }}, {{ pool = "b", weight = 10 }} ]
"""


def end_to_end(duration: float, repetitions: int, connections: int) -> dict[str, list[tuple]]:
    wrk = find_tool("wrk")
    if wrk is None or find_tool("nginx") is None:
        raise SystemExit("wrk and nginx are needed: bash benchmarks/setup.sh")
    tmp = Path(tempfile.mkdtemp(prefix="gol7lb-rules-bench-"))
    backend = start_backend(tmp, 0)
    lb: Proc | None = None
    results: dict[str, list[tuple]] = {"plain": [], "rules": []}
    try:
        config = tmp / "lb.toml"
        config.write_text(CONFIG.format(url=backend.url, hash=HASH))
        port = free_port()
        lb = Proc("GoL7-LB", [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py",
                              "gol7lb.wsgi", "--no-control-socket"], log=tmp / "lb.log",
                  cwd=REPO, env={"PORT": str(port), "GOL7LB_CONFIG": str(config),
                                 "WEB_CONCURRENCY": "1", "GOL7LB_LOG_ACCESS": "false"})
        wait_http_ok(lb, port, timeout=40, path="/plain/")
        # the first request with the credentials pays the one bcrypt check: not measured
        warm = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-H",
                               f"Authorization: {AUTHORIZATION}",
                               f"http://127.0.0.1:{port}/rules/x"],
                              capture_output=True, text=True, timeout=60)
        if warm.stdout != "200":
            raise SystemExit(f"/rules/x answered {warm.stdout!r}; see {tmp / 'lb.log'}")
        for _ in range(repetitions):
            for name in ("plain", "rules"):
                argv = [wrk, "-t1", f"-c{connections}", f"-d{duration:g}s", "--latency",
                        "-H", f"Authorization: {AUTHORIZATION}",
                        f"http://127.0.0.1:{port}/{name}/x"]
                before = tree_cpu_seconds(lb.tree())
                out = subprocess.run(argv, capture_output=True, text=True,
                                     timeout=duration + 20)
                cpu = tree_cpu_seconds(lb.tree()) - before
                result = parse_wrk(out.stdout + out.stderr)
                if result.non_2xx or result.errors:
                    raise SystemExit(f"{name}: {result.non_2xx} non-2xx, {result.errors} "
                                     f"socket errors; see {tmp / 'lb.log'}")
                results[name].append((result.rps, cpu / result.requests * 1e6))
    finally:
        if lb is not None:
            lb.stop()
        backend.proc.stop()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--micro-only", action="store_true")
    args = parser.parse_args()
    print("| rule | CPU per request |\n| --- | --- |")
    for name, cost in micro():
        print(f"| {name} | {cost:.2f} us |")
    if args.micro_only:
        return
    results = end_to_end(args.duration, args.repetitions, args.connections)
    print(f"\nEnd to end, 1 worker, wrk -c{args.connections}, {args.repetitions} x "
          f"{args.duration:g} s each, alternating (median):\n")
    print("| route | req/s | LB CPU per request |\n| --- | --- | --- |")
    medians = {}
    for name, runs in results.items():
        rps = statistics.median(r for r, _ in runs)
        cpu = statistics.median(c for _, c in runs)
        medians[name] = cpu
        print(f"| {name} | {rps:,.0f} | {cpu:.1f} us |")
    print(f"\nAll rules on cost {medians['rules'] - medians['plain']:.1f} us of CPU per request "
          f"({(medians['rules'] / medians['plain'] - 1) * 100:+.1f} %).")


if __name__ == "__main__":
    main()
