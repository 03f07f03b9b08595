"""The backends and the load balancers under test: config files in a temp dir, one process each.

Every target is started in the foreground (nginx `daemon off`, haproxy `-db`, gunicorn and
proxy.py as they are), so the benchmark owns it by PID and can stop it.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

from bench_procs import Proc, StartError, free_port, http_get, wait_http_ok

REPO = Path(__file__).resolve().parent.parent

# Keep-alive connections are never closed by request count, so no target pays a reconnect
# every N requests (nginx's default is 1000, HAProxy has no such limit).
NGINX_KEEPALIVE_REQUESTS = 10_000_000


def find_tool(name: str) -> str | None:
    """A tool on PATH or in /usr/sbin (not always on a user's PATH)."""
    found = shutil.which(name)
    if found:
        return found
    candidate = Path("/usr/sbin") / name
    return str(candidate) if candidate.exists() else None


@dataclass
class Target:
    """A thing wrk loads: its name, port and process (None for 'direct', which is a backend)."""

    key: str
    label: str
    port: int
    proc: Proc
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- backends


@dataclass
class Backend:
    port: int
    status_port: int
    proc: Proc

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def requests_served(self) -> int | None:
        """nginx's stub_status request counter of this backend (None if unreadable)."""
        try:
            status, body = http_get(self.status_port, "/status", timeout=2.0)
        except OSError:
            return None
        if status != 200:
            return None
        # "Active connections: 1 \nserver accepts handled requests\n 5 5 7 \n..."
        m = re.search(rb"\n\s*(\d+)\s+(\d+)\s+(\d+)\s*\n", body)
        return int(m.group(3)) if m else None


def _nginx_common(prefix: Path, workers: int) -> str:
    return textwrap.dedent(f"""\
        daemon off;
        master_process on;
        worker_processes {workers};
        pid {prefix}/nginx.pid;
        error_log {prefix}/error.log warn;
        events {{
            worker_connections 4096;
        }}
    """)


def _nginx_http_common(prefix: Path) -> str:
    return textwrap.dedent(f"""\
        access_log off;
        keepalive_requests {NGINX_KEEPALIVE_REQUESTS};
        keepalive_timeout 75s;
        client_body_temp_path {prefix}/client_body;
        proxy_temp_path {prefix}/proxy;
        fastcgi_temp_path {prefix}/fastcgi;
        uwsgi_temp_path {prefix}/uwsgi;
        scgi_temp_path {prefix}/scgi;
    """)


def _start_nginx(name: str, prefix: Path, conf_text: str, ports: list[int]) -> Proc:
    nginx = find_tool("nginx")
    if not nginx:
        raise StartError("nginx is not installed (run benchmarks/setup.sh)")
    prefix.mkdir(parents=True, exist_ok=True)
    conf = prefix / "nginx.conf"
    conf.write_text(conf_text)
    proc = Proc(name, [nginx, "-p", str(prefix), "-e", str(prefix / "error.log"),
                       "-c", str(conf)], log=prefix / "stdout.log")
    try:
        for port in ports:
            wait_http_ok(proc, port, timeout=15)
    except StartError:
        proc.stop()  # a started nginx that does not answer 200 is not left running
        raise
    return proc


def start_backend(tmp: Path, index: int, workers: int = 2) -> Backend:
    """One fast nginx backend answering `ok` on every path, with stub_status on a second port."""
    port, status_port = free_port(), free_port()
    prefix = tmp / f"backend{index}"
    conf = _nginx_common(prefix, workers) + "http {\n" + textwrap.indent(
        _nginx_http_common(prefix) + textwrap.dedent(f"""\
            default_type text/plain;
            server {{
                listen 127.0.0.1:{port} backlog=4096;
                location / {{
                    return 200 "ok\\n";
                }}
            }}
            server {{
                listen 127.0.0.1:{status_port};
                location /status {{
                    stub_status;
                }}
            }}
        """), "    ") + "}\n"
    proc = _start_nginx(f"backend{index}", prefix, conf, [port])
    return Backend(port=port, status_port=status_port, proc=proc)


# --------------------------------------------------------------------------- load balancers


def haproxy_config(backends: list[Backend], binds: list[str], threads: int = 2) -> str:
    """run.py's HAProxy: roundrobin, mode http, `http-reuse always`; one `bind` per entry
    (tls_bench.py adds one with `ssl crt`)."""
    servers = "".join(f"    server s{i} 127.0.0.1:{b.port}\n" for i, b in enumerate(backends, 1))
    bind_lines = "".join(f"    bind {bind}\n" for bind in binds)
    return textwrap.dedent(f"""\
        global
            nbthread {threads}
            maxconn 4096
        defaults
            mode http
            option http-keep-alive
            http-reuse always
            timeout connect 5s
            timeout client 30s
            timeout server 30s
        frontend fe
        """) + bind_lines + "    default_backend be\nbackend be\n    balance roundrobin\n" \
        + servers


def start_haproxy(tmp: Path, backends: list[Backend]) -> Target:
    haproxy = find_tool("haproxy")
    if not haproxy:
        raise StartError("haproxy is not installed (run benchmarks/setup.sh)")
    port = free_port()
    prefix = tmp / "haproxy"
    prefix.mkdir()
    conf = prefix / "haproxy.cfg"
    conf.write_text(haproxy_config(backends, [f"127.0.0.1:{port}"]))
    proc = Proc("haproxy", [haproxy, "-db", "-f", str(conf)], log=prefix / "stdout.log")
    wait_http_ok(proc, port, timeout=15)
    return Target("haproxy", "HAProxy", port, proc,
                  ["roundrobin, mode http, `http-reuse always`, nbthread 2"])


def start_nginx_lb(tmp: Path, backends: list[Backend]) -> Target:
    port = free_port()
    prefix = tmp / "nginx-lb"
    servers = "\n".join(f"    server 127.0.0.1:{b.port};" for b in backends)
    conf = _nginx_common(prefix, 2) + "http {\n" + textwrap.indent(
        _nginx_http_common(prefix)
        + "upstream be {\n" + servers + "\n    keepalive 32;\n"
        + f"    keepalive_requests {NGINX_KEEPALIVE_REQUESTS};\n}}\n"
        + textwrap.dedent(f"""\
            server {{
                listen 127.0.0.1:{port} backlog=4096;
                location / {{
                    proxy_pass http://be;
                    proxy_http_version 1.1;
                    proxy_set_header Connection "";
                }}
            }}
        """), "    ") + "}\n"
    proc = _start_nginx("nginx-lb", prefix, conf, [port])
    return Target("nginx", "nginx (LB)", port, proc,
                  ["round robin upstream, `keepalive 32`, HTTP/1.1 upstream, "
                   "worker_processes 2"])


def gol7lb_env(port: int, backends: list[Backend], workers: int) -> dict[str, str]:
    return {
        "PORT": str(port),
        "GOL7LB_BACKENDS": ", ".join(b.url for b in backends),
        "GOL7LB_ADMIN_BIND": "",
        "WEB_CONCURRENCY": str(workers),
    }


def start_gol7lb(tmp: Path, backends: list[Backend], workers: int,
                 timeout: float = 40.0) -> Target:
    """GoL7-LB as documented: `gunicorn -c gunicorn.conf.py gol7lb.wsgi` from the repo root."""
    if not (REPO / "gunicorn.conf.py").exists():
        raise StartError("gunicorn.conf.py is missing from the repository root")
    if not (REPO / "gol7lb" / "wsgi.py").exists():
        raise StartError("gol7lb/wsgi.py is missing")
    port = free_port()
    prefix = tmp / f"gol7lb-w{workers}"
    prefix.mkdir(exist_ok=True)
    argv = [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "gol7lb.wsgi",
            "--no-control-socket"]
    proc = Proc(f"GoL7-LB (WEB_CONCURRENCY={workers})", argv, log=prefix / "stdout.log",
                cwd=REPO, env=gol7lb_env(port, backends, workers))
    try:
        wait_http_ok(proc, port, timeout=timeout)
    except StartError:
        proc.stop()
        raise
    return Target("gol7lb", "GoL7-LB", port, proc, [f"WEB_CONCURRENCY={workers}"])


def gunicorn_settings_of_gol7lb(tmp: Path, backends: list[Backend]) -> dict[str, str]:
    """worker_class, threads, keepalive, reuse_port as GoL7-LB's gunicorn.conf.py resolves them.

    Used to run the WSGIProxy2 peer under the same gunicorn settings. Empty if unreadable.
    """
    if not (REPO / "gunicorn.conf.py").exists():
        return {}
    env = dict(__import__("os").environ)
    env.update(gol7lb_env(free_port(), backends, 2))
    try:
        out = subprocess.run(
            [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "gol7lb.wsgi",
             "--no-control-socket", "--print-config"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=30,
        )
    except (subprocess.TimeoutExpired, OSError):
        return {}
    found = {}
    for line in out.stdout.splitlines():
        m = re.match(r"\s*(worker_class|threads|keepalive|reuse_port)\s*=\s*(\S+)", line)
        if m:
            found[m.group(1)] = m.group(2)
    return found


WSGIPROXY2_APP = '''\
"""WSGIProxy2 over three backends (generated by benchmarks/run.py).

WSGIProxy2's HostProxy forwards to one URL only, so this wrapper round-robins over one
HostProxy per backend. Each uses WSGIProxy2's urllib3 client with a keep-alive pool.
"""
import itertools

import urllib3
from wsgiproxy import HostProxy

BACKENDS = {backends!r}
POOL = urllib3.PoolManager(num_pools=10, maxsize={maxsize})
_next = itertools.cycle([HostProxy(url, client="urllib3", pool=POOL) for url in BACKENDS]).__next__


def application(environ, start_response):
    return _next()(environ, start_response)
'''


def start_wsgiproxy2(tmp: Path, backends: list[Backend], workers: int,
                     settings: dict[str, str]) -> Target:
    try:
        import wsgiproxy  # noqa: F401
    except ImportError as exc:
        raise StartError("WSGIProxy2 is not installed (run benchmarks/setup.sh)") from exc
    worker_class = settings.get("worker_class", "gthread")
    if worker_class not in ("gthread", "sync"):
        # GoL7-LB's own class (gol7lb.worker.ProxyWorker) is gthread with stop behaviours
        # changed; a peer gets stock gthread.
        worker_class = "gthread"
    threads = int(settings.get("threads", "16"))
    keepalive = settings.get("keepalive", "5")
    port = free_port()
    prefix = tmp / "wsgiproxy2"
    prefix.mkdir()
    (prefix / "wsgiproxy2_app.py").write_text(WSGIPROXY2_APP.format(
        backends=[b.url for b in backends], maxsize=max(threads, 10)))
    argv = [sys.executable, "-m", "gunicorn", "wsgiproxy2_app:application",
            "--bind", f"127.0.0.1:{port}", "--workers", str(workers),
            "--worker-class", worker_class, "--threads", str(threads),
            "--keep-alive", keepalive, "--no-control-socket", "--chdir", str(prefix),
            "--log-level", "warning"]
    if settings.get("reuse_port", "True") == "True":
        argv.append("--reuse-port")
    proc = Proc("WSGIProxy2", argv, log=prefix / "stdout.log", cwd=prefix)
    try:
        wait_http_ok(proc, port, timeout=30)
    except StartError:
        proc.stop()
        raise
    return Target("wsgiproxy2", "WSGIProxy2 (gunicorn)", port, proc, [
        f"gunicorn {workers} workers, worker class {worker_class}, {threads} threads, "
        f"keep-alive {keepalive} s"
        + (", reuse_port" if "--reuse-port" in argv else ""),
        "WSGIProxy2's HostProxy takes one target URL: a 5-line wrapper round-robins "
        "over one HostProxy per backend; urllib3 client with a keep-alive pool",
    ])


PROXYPY_PLUGIN = '''\
"""proxy.py reverse-proxy plugin: every path, round robin over three backends
(generated by benchmarks/run.py)."""
import itertools

from proxy.http import Url
from proxy.http.server import ReverseProxyBasePlugin

BACKENDS = {backends!r}
_next = itertools.cycle(BACKENDS).__next__


class RoundRobinReverseProxy(ReverseProxyBasePlugin):
    def routes(self):
        return [r"/.*"]

    def handle_route(self, request, pattern):
        # The core forwards Url.remainder as the path, so keep the request's own path.
        return Url.from_bytes(_next() + (request.path or b"/"))
'''


def start_proxypy(tmp: Path, backends: list[Backend], workers: int) -> Target:
    try:
        import proxy  # noqa: F401
    except ImportError as exc:
        raise StartError("proxy.py is not installed (run benchmarks/setup.sh)") from exc
    port = free_port()
    prefix = tmp / "proxypy"
    prefix.mkdir()
    (prefix / "bench_proxypy_plugin.py").write_text(PROXYPY_PLUGIN.format(
        backends=[b.url.encode() for b in backends]))
    argv = [sys.executable, "-m", "proxy", "--hostname", "127.0.0.1", "--port", str(port),
            "--enable-reverse-proxy", "--plugins", "bench_proxypy_plugin.RoundRobinReverseProxy",
            "--num-workers", str(workers), "--num-acceptors", str(workers),
            # threadless (the default) hangs on the 2nd request of a keep-alive connection
            # and logs FileNotFoundError from selector.modify (proxy.py issue 1483).
            "--threaded",
            "--log-level", "WARNING", "--backlog", "4096", "--open-file-limit", "8192"]
    proc = Proc("proxy.py", argv, log=prefix / "stdout.log", cwd=prefix,
                env={"PYTHONPATH": str(prefix)}, stop_signal=signal.SIGINT)
    try:
        wait_http_ok(proc, port, timeout=30)
    except StartError:
        proc.stop()
        raise
    return Target("proxypy", "proxy.py (reverse proxy)", port, proc, [
        f"`proxy --enable-reverse-proxy --plugins <plugin> --threaded`, {workers} acceptors; "
        "the plugin maps every path to the three backends in turn",
        "`--threaded` because the default threadless mode hangs on the second request of a "
        "keep-alive connection (FileNotFoundError in selector.modify, proxy.py issue 1483)",
    ])


NOOP_APP = '''\
"""A WSGI app that does nothing (generated by benchmarks/run.py): what gunicorn serves at best."""


def application(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "3")])
    return [b"ok\\n"]
'''


def _gunicorn_app(key: str, label: str, tmp: Path, module: str, text: str, workers: int,
                  threads: int, notes: list[str]) -> Target:
    """A generated WSGI module under stock gunicorn gthread, 127.0.0.1, reuse_port."""
    port = free_port()
    prefix = tmp / key
    prefix.mkdir()
    (prefix / f"{module}.py").write_text(text)
    argv = [sys.executable, "-m", "gunicorn", f"{module}:application",
            "--bind", f"127.0.0.1:{port}", "--workers", str(workers),
            "--worker-class", "gthread", "--threads", str(threads), "--keep-alive", "5",
            "--reuse-port", "--no-control-socket", "--chdir", str(prefix),
            "--log-level", "warning"]
    proc = Proc(label, argv, log=prefix / "stdout.log", cwd=prefix)
    try:
        wait_http_ok(proc, port, timeout=30)
    except StartError:
        proc.stop()
        raise
    return Target(key, label, port, proc, notes)


def start_noop(tmp: Path, workers: int, threads: int) -> Target:
    """gunicorn gthread with a do-nothing app: the bar GoL7-LB's own worker is measured by."""
    return _gunicorn_app(
        f"noop{threads}", f"do-nothing app (gunicorn gthread, {threads} threads)", tmp,
        "noop_app", NOOP_APP, workers, threads,
        [f"stock gunicorn gthread, {workers} workers, {threads} threads, keep-alive 5 s, "
         "reuse_port; the app answers `ok` without any I/O"])


URLLIB3_PROXY_APP = '''\
"""A dozen-line reverse proxy: gunicorn gthread + a urllib3 pool (generated by run.py)."""
import itertools

import urllib3

POOL = urllib3.PoolManager(maxsize=64)
_next = itertools.cycle({backends!r}).__next__
HOP = {{"connection", "keep-alive", "transfer-encoding", "te", "upgrade", "trailer"}}


def application(environ, start_response):
    headers = {{k[5:].replace("_", "-"): v for k, v in environ.items()
               if k.startswith("HTTP_") and k[5:].lower().replace("_", "-") not in HOP}}
    body = environ["wsgi.input"].read() if environ.get("CONTENT_LENGTH") else None
    r = POOL.request(environ["REQUEST_METHOD"], _next() + environ.get("RAW_URI", "/"),
                     body=body, headers=headers, redirect=False, retries=False)
    start_response(f"{{r.status}} {{r.reason}}",
                   [(k, v) for k, v in r.headers.items() if k.lower() not in HOP])
    return [r.data]
'''


def start_urllib3_proxy(tmp: Path, backends: list[Backend], workers: int) -> Target:
    return _gunicorn_app(
        "urllib3proxy", "gunicorn + urllib3 proxy (12 lines)", tmp, "urllib3_proxy",
        URLLIB3_PROXY_APP.format(backends=[b.url for b in backends]), workers, 8,
        [f"stock gunicorn gthread, {workers} workers, 8 threads; a 12-line WSGI app that "
         "forwards with a urllib3 PoolManager (keep-alive), round robin over the backends"])


def start_pyhaproxy(tmp: Path, backends: list[Backend]) -> Target:
    """pyhaproxy-lb (PyPI): Starlette on uvicorn with an httpx client, one process."""
    exe = shutil.which("pyhaproxy")
    if not exe:
        raise StartError("pyhaproxy-lb is not installed (run benchmarks/setup.sh)")
    port = free_port()
    prefix = tmp / "pyhaproxy"
    prefix.mkdir()
    servers = "".join(f"      - url: {b.url}\n" for b in backends)
    conf = prefix / "pyhaproxy.yaml"
    conf.write_text(f"frontends:\n  - name: fe\n    bind: 127.0.0.1:{port}\n"
                    f"    default_backend: be\nbackends:\n  be:\n    balance: roundrobin\n"
                    f"    servers:\n{servers}")
    proc = Proc("pyhaproxy-lb", [exe, "--config", str(conf), "--log-level", "warning"],
                log=prefix / "stdout.log", cwd=prefix)
    try:
        wait_http_ok(proc, port, timeout=30)
    except StartError:
        proc.stop()
        raise
    return Target("pyhaproxy", "pyhaproxy-lb", port, proc, [
        "`pyhaproxy --config <yaml>`: roundrobin backend; one process (its CLI runs one "
        "uvicorn server per frontend in one event loop; it has no worker setting)"])
