"""Per-request cost of the route rules (gol7lb/rules.py, ratelimit.py, compress.py,
mirror.py): each rule on its own, on the real compiled code, and a route with all of them on
against a plain route, through a real LB in the same run.

Run: python benchmarks/rules_cost.py [--duration 5] [--repetitions 3] [--connections 16]
     [--micro-only] [--quick]

(a) micro: microseconds per request of each compiled rule (allow/deny with its verdict
    cache, basic_auth with its verdict cache, redirect, rewrite on RE2, request_headers,
    response_headers, split, a local rate_limit, compress on a 4 KiB JSON answer, mirror
    not sampled and sampled) and of the rules.py route with all of them (but redirect);
(b) end to end: one GoL7-LB (WEB_CONCURRENCY=1) in front of one nginx backend answering
    4 KiB of JSON, a second nginx as the shadow pool; wrk (sending Accept-Encoding and
    credentials) on a plain route, on routes with one of rate_limit, compress, mirror, and
    on a route with all of them: allow, deny, basic_auth, rewrite, request_headers,
    response_headers, split, rate_limit (local, never refusing), compress, mirror (5 %).
    Interleaved, the order rotating each repetition; each run measured as the LB's CPU per
    request (user+system of its process tree, psutil) and req/s; medians. Needs wrk and
    nginx (`bash benchmarks/setup.sh`).
"""

from __future__ import annotations

import argparse
import base64
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import bcrypt
from bench_load import parse_wrk
from bench_procs import Proc, free_port, tree_cpu_seconds, wait_http_ok
from bench_targets import (
    REPO,
    _nginx_common,
    _nginx_http_common,
    _start_nginx,
    find_tool,
    start_backend,
)

sys.path.insert(0, str(REPO))  # this checkout's gol7lb, as the LB it starts runs it
import compress_cost  # noqa: E402
import mirror_cost  # noqa: E402

from gol7lb.ratelimit import Limiter, LocalStore, RateLimitSpec, SharedBuckets  # noqa: E402
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
    """Microseconds of CPU (this thread's, so other processes on a busy machine count less)
    per call, best of three batches."""
    best = float("inf")
    for _ in range(3):
        count = 0
        started = time.thread_time()
        while time.thread_time() - started < seconds:
            for _ in range(500):
                fn()
            count += 500
        best = min(best, (time.thread_time() - started) / count * 1e6)
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


def extra_micro() -> list[tuple[str, float]]:
    """rate_limit (a local bucket in shared memory), compress (one 4 KiB JSON answer at the
    default level, zstd: negotiation, head rewrite, encoder) and mirror (its own script)."""
    # as the LB runs it: the lock file's byte locks the bucket's set across workers
    fd, lock_path = tempfile.mkstemp(prefix="gol7lb-bench-lock-")
    buckets = SharedBuckets(lock_path)
    os.close(fd)
    os.unlink(lock_path)  # the buckets keep their own descriptor
    region = buckets.claim([1])[1]
    spec = RateLimitSpec("bench", rate=1e9, burst=10**9)
    limiter = Limiter(spec, "bench", LocalStore(buckets, region))
    environ = {"REMOTE_ADDR": "127.0.0.1"}
    not_sampled, sampled = mirror_cost.costs()
    return [
        ("rate_limit (local, key client_ip)", per_call(lambda: limiter.check(environ, "/x"))),
        ("compress = true, one 4 KiB JSON answer (zstd 1)",
         compress_cost.per_answer("fast", "zstd", compress_cost.sample(4096), count=500)),
        ("mirror, not sampled (percent 5: 95 % of requests)", not_sampled),
        ("mirror, sampled (the copy's head, the queue; sent by the mirror's threads)",
         sampled),
    ]


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
    rows += extra_micro()
    started = time.thread_time()
    bcrypt.checkpw(PASSWORD, HASH.encode())
    rows.append(("one bcrypt check, cost 12 (paid once per Authorization value)",
                 (time.thread_time() - started) * 1e6))
    return rows


CONFIG = """
[reload]
watch = false
[admin]
bind = ""
[compression]
min_bytes = 1024
[rate_limits.wide]
key = "client_ip"
rate = 1000000000
burst = 1000000000
[pools.a]
[[pools.a.backends]]
url = "{url}"
[pools.b]
[[pools.b.backends]]
url = "{url}"
[pools.shadow]
[[pools.shadow.backends]]
url = "{shadow}"

[[routes]]
path_prefix = "/plain/"
pool = "a"

[[routes]]
path_prefix = "/ratelimit/"
pool = "a"
rate_limit = "wide"

[[routes]]
path_prefix = "/compress/"
pool = "a"
compress = true

[[routes]]
path_prefix = "/mirror/"
pool = "a"
mirror = {{ pool = "shadow", percent = 5 }}

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
rate_limit = "wide"
compress = true
mirror = {{ pool = "shadow", percent = 5 }}
"""

ROUTES = ("plain", "ratelimit", "compress", "mirror", "rules")
LABELS = {"plain": "plain", "ratelimit": "rate_limit only", "compress": "compress only",
          "mirror": "mirror (5 %) only", "rules": "all rules on"}


def start_json_backend(tmp: Path) -> tuple[Proc, str, int]:
    """nginx answering 4 KiB of JSON (compressible, as an API answers) on every path, with
    Content-Length: (proc, url, size)."""
    prefix = tmp / "json-backend"
    (prefix / "www").mkdir(parents=True)
    body = compress_cost.sample(4096)
    (prefix / "www" / "answer.json").write_bytes(body)
    for directory in (tmp, prefix, prefix / "www"):  # nginx's workers may run as nobody
        directory.chmod(0o755)
    port = free_port()
    conf = _nginx_common(prefix, 1) + "http {\n" + textwrap.indent(
        _nginx_http_common(prefix) + textwrap.dedent(f"""\
            default_type application/json;
            server {{
                listen 127.0.0.1:{port} backlog=4096;
                location / {{
                    root {prefix / "www"};
                    try_files /answer.json =404;
                }}
            }}
        """), "    ") + "}\n"
    return _start_nginx("json-backend", prefix, conf, [port]), f"http://127.0.0.1:{port}", \
        len(body)


def end_to_end(duration: float, repetitions: int,
               connections: int) -> tuple[dict[str, list[tuple[float, float]]], int]:
    """{route: [(req/s, LB CPU us per request) per repetition]}, and the answer's size."""
    wrk = find_tool("wrk")
    if wrk is None or find_tool("nginx") is None:
        raise SystemExit("wrk and nginx are needed: bash benchmarks/setup.sh")
    tmp = Path(tempfile.mkdtemp(prefix="gol7lb-rules-bench-"))
    procs: list[Proc] = []
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in ROUTES}
    try:
        backend, url, size = start_json_backend(tmp)
        procs.append(backend)
        shadow = start_backend(tmp, 0, workers=1)
        procs.append(shadow.proc)
        config = tmp / "lb.toml"
        config.write_text(CONFIG.format(url=url, shadow=shadow.url, hash=HASH))
        port = free_port()
        lb = Proc("GoL7-LB", [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py",
                              "gol7lb.wsgi", "--no-control-socket"], log=tmp / "lb.log",
                  cwd=REPO, env={"PORT": str(port), "GOL7LB_CONFIG": str(config),
                                 "WEB_CONCURRENCY": "1", "GOL7LB_LOG_ACCESS": "false"})
        procs.append(lb)
        wait_http_ok(lb, port, timeout=40, path="/plain/")
        # the first request with the credentials pays the one bcrypt check: not measured;
        # the answer must come compressed
        warm = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w",
                               "%{http_code} %{size_download}",
                               "-H", f"Authorization: {AUTHORIZATION}", "-H",
                               "Accept-Encoding: gzip, br, zstd",
                               f"http://127.0.0.1:{port}/rules/x"],
                              capture_output=True, text=True, timeout=60)
        status, _, got = warm.stdout.partition(" ")
        if status != "200" or not got.isdigit() or int(got) >= size:
            raise SystemExit(f"/rules/x answered {warm.stdout!r} (wanted 200 and fewer than "
                             f"{size} bytes); see {tmp / 'lb.log'}")
        for rep in range(repetitions):
            order = ROUTES[rep % len(ROUTES):] + ROUTES[:rep % len(ROUTES)]
            for name in order:
                argv = [wrk, "-t1", f"-c{connections}", f"-d{duration:g}s", "--latency",
                        "-H", f"Authorization: {AUTHORIZATION}",
                        "-H", "Accept-Encoding: gzip, deflate, br, zstd",
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
        for proc in reversed(procs):
            proc.stop()
    return results, size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--micro-only", action="store_true")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 1 repetition of 1 s per route")
    args = parser.parse_args()
    if args.quick:
        args.duration, args.repetitions = 1.0, 1
    load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print("| rule | CPU per request |\n| --- | --- |")
    for name, cost in micro():
        print(f"| {name} | {cost:.2f} us |")
    if args.micro_only:
        return
    results, size = end_to_end(args.duration, args.repetitions, args.connections)
    print(f"\nEnd to end, 1 worker, one nginx answering {size} bytes of JSON, "
          f"wrk -c{args.connections} with Accept-Encoding, {args.repetitions} x "
          f"{args.duration:g} s each, interleaved (medians); load average (1, 5, 15 min) "
          f"before: {load_before}, after: "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}:\n")
    print("| route | req/s | LB CPU per request | added to plain | x plain req/s |")
    print("| --- | ---: | ---: | ---: | ---: |")
    plain = results["plain"]
    for name, runs in results.items():
        rps = statistics.median(r for r, _ in runs)
        cpu = statistics.median(c for _, c in runs)
        added = statistics.median(c - p for (_, c), (_, p) in zip(runs, plain, strict=True))
        ratio = statistics.median(r / p for (r, _), (p, _) in zip(runs, plain, strict=True))
        print(f"| {LABELS[name]} | {rps:,.0f} | {cpu:.1f} us | {added:+.1f} us | "
              f"{ratio:.2f}x |")


if __name__ == "__main__":
    main()
