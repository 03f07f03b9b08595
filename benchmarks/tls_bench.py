"""HTTPS on PORT against GoL7-LB's own plain HTTP and against HAProxy terminating TLS.

Run: python benchmarks/tls_bench.py [--duration 5] [--handshake-seconds 4] [--repetitions 3]
     [--connections 32] [--workers 2] [--clients 4] [--quick]

One run, 127.0.0.1 only, bounded in time (about 3 minutes with the defaults), in front of
the same three nginx backends as `run.py`:

(1) keep-alive throughput: `wrk -t1 -c32` over plain HTTP and over HTTPS to GoL7-LB
    (`WEB_CONCURRENCY` workers, as run.py starts it) and to HAProxy (run.py's target, plus
    `bind ... ssl crt` with the same certificate); GoL7-LB's HTTPS req/s as a ratio to its own
    plain HTTP (goal >= 0.8) and to HAProxy's HTTPS.
(2) new TLS connections per second: client processes (the ssl module, TLS 1.3, no
    certificate check) in parallel, each connecting, handshaking, sending one `GET /`,
    reading the answer and closing, in a loop for a fixed time; full handshakes, then resumed
    ones (each connection offers the session ticket its previous one got). GoL7-LB against
    HAProxy, and each server's CPU per connection. (Not `openssl s_time -www`: it reads to
    the server's close, and GoL7-LB closes without a TLS close_notify, which makes OpenSSL
    drop the session, so `-reuse` never resumed on GoL7-LB; the client closing first avoids
    that and measures the handshakes alone.)

The certificate is an ECDSA P-256 one made in the run (cryptography), for 127.0.0.1 and
localhost; both servers load the same file. Runs are interleaved (every target in turn in each
repetition, the order rotating) and the figures are medians of the per-repetition ratios.
The load average before and after is printed next to the figures: the machine is shared.
"""

from __future__ import annotations

import argparse
import datetime
import http.client
import ipaddress
import multiprocessing
import os
import re
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from bench_load import parse_wrk
from bench_procs import Proc, StartError, free_port, tree_cpu_seconds
from bench_targets import REPO, Backend, find_tool, gol7lb_env, haproxy_config, start_backend


def make_certificate(directory: Path) -> tuple[Path, Path, Path]:
    """A self-signed ECDSA P-256 certificate for 127.0.0.1 and localhost: (cert, key,
    cert+key in one file for HAProxy's `crt`)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .sign(key, hashes.SHA256()))
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    paths = directory / "cert.pem", directory / "key.pem", directory / "haproxy.pem"
    paths[0].write_bytes(cert_pem)
    paths[1].write_bytes(key_pem)
    paths[2].write_bytes(cert_pem + key_pem)
    return paths


def wait_ok(proc: Proc, port: int, https: bool, timeout: float = 40.0) -> None:
    """Block until GET / answers 200 over HTTP or HTTPS (certificate not verified)."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if not proc.alive():
            raise StartError(f"{proc.name} exited with status {proc.popen.returncode}; "
                             f"log tail:\n{proc.log_tail()}")
        if https:
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                "127.0.0.1", port, timeout=1.0, context=ssl._create_unverified_context())
        else:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1.0)
        try:
            conn.request("GET", "/")
            status = conn.getresponse().status
            if status == 200:
                return
            last = f"HTTP {status}"
        except OSError as exc:
            last = f"{type(exc).__name__}: {exc}"
        finally:
            conn.close()
        time.sleep(0.1)
    raise StartError(f"{proc.name} did not answer 200 within {timeout:.0f} s (last: {last}); "
                     f"log tail:\n{proc.log_tail()}")


def _wait_or_stop(proc: Proc, ports: list[tuple[int, bool]]) -> None:
    """wait_ok on each (port, https); a process that does not come up is stopped."""
    try:
        for port, https in ports:
            wait_ok(proc, port, https)
    except StartError:
        proc.stop()
        raise


def start_gol7lb(tmp: Path, name: str, backends: list[Backend], workers: int,
                 tls: tuple[Path, Path] | None) -> tuple[Proc, int]:
    """GoL7-LB as run.py starts it (access log and metrics on), with or without TLS."""
    port = free_port()
    env = gol7lb_env(port, backends, workers)
    if tls is not None:
        env.update(GOL7LB_TLS_CERT=str(tls[0]), GOL7LB_TLS_KEY=str(tls[1]))
    proc = Proc(name, [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py",
                       "gol7lb.wsgi", "--no-control-socket"],
                log=tmp / f"{name}.log", cwd=REPO, env=env)
    _wait_or_stop(proc, [(port, tls is not None)])
    return proc, port


def start_haproxy(tmp: Path, backends: list[Backend], pem: Path,
                  threads: int) -> tuple[Proc, int, int]:
    """run.py's HAProxy (roundrobin, mode http, http-reuse always) with a second frontend
    terminating TLS with the same certificate: (proc, plain port, TLS port)."""
    haproxy = find_tool("haproxy")
    if not haproxy:
        raise SystemExit("haproxy is not installed (run benchmarks/setup.sh)")
    port, tls_port = free_port(), free_port()
    conf = tmp / "haproxy.cfg"
    conf.write_text(haproxy_config(backends, [f"127.0.0.1:{port}", f"127.0.0.1:{tls_port} ssl "
                                              f"crt {pem} alpn http/1.1"], threads))
    proc = Proc("haproxy", [haproxy, "-db", "-f", str(conf)], log=tmp / "haproxy.log")
    _wait_or_stop(proc, [(port, False), (tls_port, True)])
    return proc, port, tls_port


@dataclass
class Run:
    rate: float  # req/s or connections/s
    cpu_us: float  # the server tree's CPU per request or per connection
    note: str = ""


def wrk_run(wrk: str, url: str, proc: Proc, connections: int, duration: float) -> Run:
    before = tree_cpu_seconds(proc.tree())
    out = subprocess.run([wrk, "-t1", f"-c{connections}", f"-d{duration:g}s", "--latency",
                          "--timeout", "2s", url],
                         capture_output=True, text=True, timeout=duration + 20)
    cpu = tree_cpu_seconds(proc.tree()) - before
    result = parse_wrk(out.stdout + out.stderr)
    # reported, not fatal: on a busy shared machine a request may pass wrk's 2 s timeout
    errors = ", ".join(f"{n} {kind}" for kind, n in result.socket_errors.items() if n)
    return Run(result.rps, cpu / result.requests * 1e6 if result.requests else float("nan"),
               f"{result.non_2xx} non-2xx" + (f", socket errors: {errors}" if errors else ""))


def _one_connection(port: int, context: ssl.SSLContext,
                    session: ssl.SSLSession | None) -> tuple[ssl.SSLSession | None, bool]:
    """Connect, handshake (resuming `session` if given), GET /, read the answer, close first
    (so how the server closes does not matter). Returns the session to resume next, and
    whether this one resumed."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            context.wrap_socket(raw, server_hostname="localhost", session=session) as tls:
        tls.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = tls.recv(65536)
            if not chunk:
                raise OSError("connection closed before the answer's head")
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            raise OSError(f"answer {head[:40]!r}")
        m = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head)
        length = int(m.group(1)) if m else 0
        while len(body) < length:
            chunk = tls.recv(65536)
            if not chunk:
                raise OSError("connection closed inside the body")
            body += chunk
        # TLS 1.3 tickets arrive after the handshake: read, they are in tls.session now
        return tls.session, tls.session_reused


def _client_context() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # verifying is the client's cost, not the server's
    return context


def _connections_loop(port: int, reuse: bool, seconds: float) -> tuple[int, int]:
    """One client process: connections one after another for `seconds`; (count, resumed).
    With `reuse`, each offers the session its previous connection got (session tickets)."""
    context = _client_context()
    session = _one_connection(port, context, None)[0] if reuse else None
    count = resumed = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        got, was_resumed = _one_connection(port, context, session)
        if reuse:
            session = got
        count += 1
        resumed += was_resumed
    return count, resumed


def handshake_run(pool: ProcessPoolExecutor, port: int, proc: Proc, reuse: bool,
                  seconds: float, clients: int) -> Run:
    """`clients` client processes opening connections for `seconds` (see
    _connections_loop): connections per second in all, the server tree's CPU per connection,
    and how many resumed."""
    before = tree_cpu_seconds(proc.tree())
    began = time.monotonic()
    futures = [pool.submit(_connections_loop, port, reuse, seconds) for _ in range(clients)]
    counts = [f.result(timeout=seconds + 60) for f in futures]
    elapsed = time.monotonic() - began
    cpu = tree_cpu_seconds(proc.tree()) - before
    total = sum(c for c, _ in counts)
    resumed = sum(r for _, r in counts)
    return Run(total / elapsed, cpu / total * 1e6 if total else float("nan"),
               f"{resumed} of {total} resumed")


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def median_ratio(runs: dict[str, list[Run]], a: str, b: str, cpu: bool = False) -> float:
    """Median over repetitions of a's rate / b's; with `cpu`, of b's CPU per request or
    connection / a's (what a's capacity is as a share of b's when the CPU is the limit)."""
    return statistics.median((y.cpu_us / x.cpu_us) if cpu else (x.rate / y.rate)
                             for x, y in zip(runs[a], runs[b], strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per wrk run")
    parser.add_argument("--handshake-seconds", type=float, default=4.0,
                        help="seconds per new-connections run")
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2, help="GoL7-LB's WEB_CONCURRENCY")
    parser.add_argument("--haproxy-threads", type=int, default=2,
                        help="nbthread (run.py's HAProxy target uses 2)")
    parser.add_argument("--clients", type=int, default=4,
                        help="client processes opening connections")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 1 repetition, 1 s per point")
    args = parser.parse_args()
    if args.quick:
        args.duration = args.handshake_seconds = 1.0
        args.repetitions = 1
    wrk = find_tool("wrk")
    if wrk is None or find_tool("nginx") is None or find_tool("openssl") is None:
        raise SystemExit("wrk, nginx, haproxy and openssl are needed: bash benchmarks/setup.sh")
    started = time.monotonic()
    load_before = load_average()
    tmp = Path(tempfile.mkdtemp(prefix="gol7lb-tls-bench-"))
    cert, key, pem = make_certificate(tmp)
    procs: list[Proc] = []
    clients = ProcessPoolExecutor(args.clients, mp_context=multiprocessing.get_context("fork"))
    try:
        backends = [start_backend(tmp, i) for i in range(1, 4)]
        procs += [b.proc for b in backends]
        plain, plain_port = start_gol7lb(tmp, "gol7lb-http", backends, args.workers, None)
        procs.append(plain)
        tls, tls_port = start_gol7lb(tmp, "gol7lb-https", backends, args.workers, (cert, key))
        procs.append(tls)
        haproxy, hp_port, hp_tls_port = start_haproxy(tmp, backends, pem, args.haproxy_threads)
        procs.append(haproxy)

        keepalive: dict[str, tuple[str, Proc]] = {
            "GoL7-LB http": (f"http://127.0.0.1:{plain_port}/", plain),
            "GoL7-LB https": (f"https://127.0.0.1:{tls_port}/", tls),
            "HAProxy http": (f"http://127.0.0.1:{hp_port}/", haproxy),
            "HAProxy https": (f"https://127.0.0.1:{hp_tls_port}/", haproxy),
        }
        handshakes: dict[str, Callable[[], Run]] = {}
        for label, port, proc in (("GoL7-LB", tls_port, tls),
                                  ("HAProxy", hp_tls_port, haproxy)):
            for mode, reuse in (("full", False), ("resumed", True)):
                handshakes[f"{label} {mode}"] = (
                    lambda port=port, proc=proc, reuse=reuse: handshake_run(
                        clients, port, proc, reuse, args.handshake_seconds, args.clients))
        runs: dict[str, list[Run]] = {k: [] for k in [*keepalive, *handshakes]}
        for rep in range(args.repetitions):
            order = list(keepalive)
            order = order[rep % len(order):] + order[:rep % len(order)]
            for name in order:
                url, proc = keepalive[name]
                runs[name].append(wrk_run(wrk, url, proc, args.connections, args.duration))
                print(f"rep {rep + 1} {name}: {runs[name][-1].rate:,.0f} req/s", flush=True)
            order = list(handshakes)
            order = order[rep % len(order):] + order[:rep % len(order)]
            for name in order:
                runs[name].append(handshakes[name]())
                print(f"rep {rep + 1} {name}: {runs[name][-1].rate:,.0f} conn/s "
                      f"{runs[name][-1].note}", flush=True)
    finally:
        clients.shutdown(cancel_futures=True)
        for proc in reversed(procs):
            proc.stop()
    load_after = load_average()

    print(f"\n{args.repetitions} interleaved repetitions, {time.monotonic() - started:.0f} s "
          f"in all; load average (1, 5, 15 min) before: {load_before}, after: {load_after}; "
          f"{os.cpu_count()} CPUs\n")
    print(f"Keep-alive, wrk -t1 -c{args.connections} -d{args.duration:g}s, GoL7-LB "
          f"WEB_CONCURRENCY={args.workers}, HAProxy nbthread {args.haproxy_threads} "
          "(medians):\n")
    print("| target | req/s | server CPU per request | req/s per repetition | errors |")
    print("| --- | ---: | ---: | --- | --- |")
    for name in keepalive:
        rs = runs[name]
        print(f"| {name} | {statistics.median(r.rate for r in rs):,.0f} | "
              f"{statistics.median(r.cpu_us for r in rs):.0f} us | "
              f"{' / '.join(f'{r.rate:,.0f}' for r in rs)} | "
              f"{'; '.join(r.note for r in rs)} |")
    https_vs_http = median_ratio(runs, "GoL7-LB https", "GoL7-LB http")
    print(f"\nGoL7-LB HTTPS / its own HTTP: **{https_vs_http:.3f}x** (goal >= 0.8: "
          f"{'PASS' if https_vs_http >= 0.8 else 'FAIL'}); GoL7-LB HTTPS / HAProxy HTTPS: "
          f"**{median_ratio(runs, 'GoL7-LB https', 'HAProxy https'):.2f}x** (by CPU per "
          f"request: {median_ratio(runs, 'GoL7-LB https', 'HAProxy https', cpu=True):.2f}x); "
          f"GoL7-LB's CPU per request over HTTPS / over HTTP: "
          f"{1 / median_ratio(runs, 'GoL7-LB https', 'GoL7-LB http', cpu=True):.2f}x; "
          f"HAProxy's own "
          f"HTTPS / HTTP: {median_ratio(runs, 'HAProxy https', 'HAProxy http'):.2f}x\n")
    print(f"New TLS connections, {args.clients} client processes (TLS 1.3, one GET each) x "
          f"{args.handshake_seconds:g} s (medians):\n")
    print("| target | handshake | connections/s | server CPU per connection | "
          "per repetition | note |")
    print("| --- | --- | ---: | ---: | --- | --- |")
    for name in handshakes:
        rs = runs[name]
        label, mode = name.split()
        print(f"| {label} | {mode} | {statistics.median(r.rate for r in rs):,.0f} | "
              f"{statistics.median(r.cpu_us for r in rs):.0f} us | "
              f"{' / '.join(f'{r.rate:,.0f}' for r in rs)} | {rs[-1].note} |")
    print(f"\nGoL7-LB / HAProxy, connections per second: full handshakes "
          f"**{median_ratio(runs, 'GoL7-LB full', 'HAProxy full'):.2f}x**, resumed "
          f"**{median_ratio(runs, 'GoL7-LB resumed', 'HAProxy resumed'):.2f}x**; by server "
          f"CPU per connection (HAProxy's / GoL7-LB's, the ratio when the server's CPU is the "
          f"limit, not the clients'): full "
          f"**{median_ratio(runs, 'GoL7-LB full', 'HAProxy full', cpu=True):.2f}x**, resumed "
          f"**{median_ratio(runs, 'GoL7-LB resumed', 'HAProxy resumed', cpu=True):.2f}x**")


if __name__ == "__main__":
    main()
