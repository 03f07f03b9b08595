"""Settings: defaults < TOML < environment, and a clear one-line refusal of bad values."""

import subprocess
import sys

import pytest

from gol7lb.config import SETTINGS, CertPair, ConfigError, load_settings
from tests.procs import ROOT, free_port


def write(tmp_path, text):
    path = tmp_path / "gol7lb.toml"
    path.write_text(text)
    return str(path)


def test_defaults_match_the_contract_and_use_demo_backends():
    s = load_settings({})
    assert s.algorithm == "round_robin"
    assert (s.health.type, s.health.interval, s.health.timeout, s.health.rise, s.health.fall,
            s.health.path, s.health.expect_status) == ("tcp", 10.0, 2.0, 2, 3, "/healthz",
                                                       "200-399")
    assert (s.proxy.connect_timeout, s.proxy.read_timeout, s.proxy.retries) == (3.0, 60.0, 2)
    assert s.admin.address == ("127.0.0.1", 8404)
    assert s.demo_backends
    assert [b.url for b in s.backends] == [f"http://127.0.0.1:{p}" for p in (8081, 8082, 8083)]


def test_toml_then_environment_override(tmp_path):
    path = write(tmp_path, """
algorithm = "random"
[[backends]]
url = "http://127.0.0.1:9001"
weight = 3
[[backends]]
url = "http://127.0.0.1:9002"
[health]
interval = 5
rise = 4
[admin]
bind = ""
""")
    s = load_settings({"GOL7LB_CONFIG": path, "GOL7LB_HEALTH_INTERVAL": "0.5"})
    assert s.algorithm == "random"
    assert [(b.url, b.weight) for b in s.backends] == [("http://127.0.0.1:9001", 3),
                                                      ("http://127.0.0.1:9002", 1)]
    assert s.health.interval == 0.5 and s.health.rise == 4
    assert s.admin.address is None and not s.demo_backends


def test_backends_env_with_weights_replaces_the_file_list(tmp_path):
    path = write(tmp_path, '[[backends]]\nurl = "http://127.0.0.1:9001"\n')
    s = load_settings({"GOL7LB_CONFIG": path,
                       "GOL7LB_BACKENDS": "http://10.0.0.1:8081 weight=3, http://[::1]:8082"})
    assert [(b.host, b.port, b.weight) for b in s.backends] == [("10.0.0.1", 8081, 3),
                                                               ("::1", 8082, 1)]


def test_trusted_proxies_from_the_file_are_a_list(tmp_path):
    path = write(tmp_path, '[proxy]\ntrusted_proxies = ["10.0.0.0/8", "::1"]\n'
                           'forwarded = "both"\n')
    proxy = load_settings({"GOL7LB_CONFIG": path}).proxy
    assert proxy.trusted_proxies == ("10.0.0.0/8", "::1") and proxy.forwarded == "both"


def test_every_setting_has_its_environment_variable():
    lists = {"proxy.retry_on": ("502, 504", ("502", "504")),
             "proxy.trusted_proxies": ("10.0.0.0/8, ::1", ("10.0.0.0/8", "::1")),
             "proxy.proxy_protocol_from": ("10.0.0.0/8, ::1", ("10.0.0.0/8", "::1")),
             "admin.hosts": ("gol7lb-admin, lb.example.", ("gol7lb-admin", "lb.example.")),
             "discovery.resolvers": ("127.0.0.1:53, [::1]:5353", ("127.0.0.1:53", "[::1]:5353")),
             "log.levels": ("gol7lb.proxy=debug, gol7lb=warning",
                            ("gol7lb.proxy=debug", "gol7lb=warning")),
             "compression.encodings": ("gzip, br", ("gzip", "br")),
             "compression.types": ("text/html, application/*",
                                   ("text/html", "application/*")),
             "acme.domains": ("Example.com, www.example.com.",
                              ("example.com", "www.example.com")),
             "tls.certificates": ("b.crt:b.key, /c.crt:/c.key",
                                  (CertPair("b.crt", "b.key"), CertPair("/c.crt", "/c.key")))}
    # tls.* other than the pair itself need HTTPS on
    with_tls = {"GOL7LB_TLS_CERT": "a.crt", "GOL7LB_TLS_KEY": "a.key"}
    for setting in SETTINGS:
        if setting.kind == "str":
            continue
        expected: object  # of the setting's kind
        if setting.kind == "list":
            value, expected = lists[setting.name]
        elif setting.kind == "bool":
            value, expected = "off", False
        else:
            value = str(setting.default + (1 if setting.kind == "int" else 0.5))
            expected = type(setting.default)(value)
        s = load_settings({**(with_tls if setting.section == "tls" else {}), setting.env: value})
        section = getattr(s, setting.section) if setting.section else s
        assert getattr(section, setting.key) == expected, setting.name


@pytest.mark.parametrize("text, expected", [
    ("true", True), ("1", True), ("Yes", True), ("on", True),
    ("false", False), ("0", False), ("no", False), ("OFF", False)])
def test_booleans_from_the_environment(text, expected):
    assert load_settings({"GOL7LB_LOG_ACCESS": text}).log.access is expected
    assert load_settings({"GOL7LB_RELOAD_WATCH": text}).reload.watch is expected


@pytest.mark.parametrize("env, words", [
    ({"GOL7LB_HEALTH_INTERVAL": "-1"}, ["health.interval", "'-1'", "> 0"]),
    ({"GOL7LB_HEALTH_INTERVAL": "soon"}, ["health.interval", "'soon'"]),
    ({"GOL7LB_HEALTH_RISE": "1.5"}, ["health.rise", "whole number"]),
    ({"GOL7LB_PROXY_RETRIES": "-1"}, ["proxy.retries"]),
    ({"GOL7LB_ALGORITHM": "fastest"}, ["algorithm", "'fastest'", "round_robin"]),
    ({"GOL7LB_HEALTH_TYPE": "udp"}, ["health.type", "tcp, http"]),
    ({"GOL7LB_HEALTH_EXPECT_STATUS": "200-99"}, ["health.expect_status"]),
    ({"GOL7LB_ADMIN_BIND": "nowhere"}, ["admin.bind", "host:port"]),
    ({"GOL7LB_ADMIN_BIND": "0.0.0.0:8404"}, ["admin.bind", "admin.token", "loopback"]),
    ({"GOL7LB_ADMIN_TOKEN": "two words"}, ["admin.token"]),
    ({"GOL7LB_ADMIN_HOSTS": "lb.example:8404"}, ["admin.hosts", "lb.example:8404", "names"]),
    ({"GOL7LB_LOG_ACCESS": "maybe"}, ["log.access", "'maybe'", "true or false"]),
    ({"GOL7LB_LOG_FORMAT": "xml"}, ["log.format", "text, json"]),
    ({"GOL7LB_LOG_LEVELS": "gol7lb.proxy=loud"}, ["log.levels", "gol7lb.proxy=loud", "debug"]),
    ({"GOL7LB_LOG_LEVELS": "gol7lb.proxy"}, ["log.levels", "logger=level"]),
    ({"GOL7LB_RELOAD_WATCH": "2"}, ["reload.watch", "true or false"]),
    ({"GOL7LB_BACKENDS": ""}, ["GOL7LB_BACKENDS", "set but names no backend"]),
    ({"GOL7LB_BACKENDS": " , "}, ["GOL7LB_BACKENDS", "set but names no backend"]),
    ({"GOL7LB_BACKENDS": "ftp://127.0.0.1:21"}, ["backends", "only http://"]),
    ({"GOL7LB_BACKENDS": "http://127.0.0.1:80/app"}, ["backends", "has a path"]),
    ({"GOL7LB_BACKENDS": "http://127.0.0.1:99999"}, ["backends", "port"]),
    ({"GOL7LB_BACKENDS": "http://127.0.0.1:81 weight=0"}, ["backends", "weight"]),
    ({"GOL7LB_BACKENDS": "http://127.0.0.1:81, http://127.0.0.1:81/"}, ["duplicate backend"]),
    ({"GOL7LB_HELTH_INTERVAL": "1"}, ["unknown environment variable GOL7LB_HELTH_INTERVAL"]),
    ({"GOL7LB_CONFIG": "/nonexistent/gol7lb.toml"}, ["cannot read", "/nonexistent/gol7lb.toml"]),
    ({"GOL7LB_PROXY_CLIENT_HEADER_TIMEOUT": "0"}, ["proxy.client_header_timeout", "> 0"]),
    ({"GOL7LB_PROXY_CLIENT_IDLE_TIMEOUT": "x"}, ["proxy.client_idle_timeout", "'x'"]),
    ({"GOL7LB_PROXY_MAX_HEADER_BYTES": "100"}, ["proxy.max_header_bytes", "1024"]),
    ({"GOL7LB_PROXY_MAX_HEADERS": "0"}, ["proxy.max_headers", "1 to 10000"]),
    ({"GOL7LB_PROXY_FORWARDED": "x-forwarded-for"}, ["proxy.forwarded", "rfc7239"]),
    ({"GOL7LB_PROXY_TRUSTED_PROXIES": "10.0.0.0/8, 10.0.0.0/33"},
     ["proxy.trusted_proxies", "CIDRs"]),
])
def test_bad_environment_values_are_refused_with_one_line(env, words):
    with pytest.raises(ConfigError) as info:
        load_settings(env)
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message


@pytest.mark.parametrize("text, words", [
    ("[health]\nintervall = 3\n", ["unknown setting health.intervall", "interval"]),
    ("colour = 1\n", ["unknown setting colour"]),
    ("[health]\ninterval = \"10\"\n", ["health.interval", "'10'"]),
    ("[health]\nrise = true\n", ["health.rise"]),
    ("[[backends]]\nurl = \"http://a:1\"\nwieght = 2\n", ["backends[0].wieght"]),
    ("[[backends]]\nweight = 2\n", ["backends[0].url"]),
    ("[[backends]]\nurl = \"http://a:1\"\n[[backends]]\nurl = \"http://a:1\"\n",
     ["duplicate backend http://a:1"]),
    ("this is not toml", ["cannot parse"]),
    ("[proxy]\ntrusted_proxies = \"10.0.0.0/8\"\n", ["proxy.trusted_proxies", "list"]),
    ("[proxy]\ntrusted_proxies = [\"nope\"]\n", ["proxy.trusted_proxies"]),
    ("[proxy]\nmax_headers = 1.5\n", ["proxy.max_headers"]),
])
def test_bad_file_values_are_refused_with_one_line(tmp_path, text, words):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_settings({"GOL7LB_CONFIG": path})
    assert "\n" not in str(info.value)
    for word in words:
        assert word in str(info.value)


def run_gunicorn(env_extra, tmp_path):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PORT": str(free_port()),
           "GOL7LB_ADMIN_BIND": "", **env_extra}
    return subprocess.run(
        [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "gol7lb.wsgi",
         "--no-control-socket"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)


def assert_one_line_exit_2(result, words):
    """A refused start: status 2, exactly one line (on stderr), no traceback."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stdout + result.stderr
    assert not result.stdout.strip(), result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("gol7lb: ")
    for word in words:
        assert word in lines[0], lines[0]


@pytest.mark.parametrize("env, words", [
    ({"GOL7LB_HEALTH_INTERVAL": "-1"}, ["health.interval", "-1"]),
    ({"GOL7LB_BACKENDS": "http://127.0.0.1:81, http://127.0.0.1:81"}, ["duplicate backend"]),
    ({"PORT": "eighty"}, ["PORT", "eighty"]),
    ({"WEB_CONCURRENCY": "0"}, ["WEB_CONCURRENCY"]),
    ({"GOL7LB_BACKENDS": ""}, ["GOL7LB_BACKENDS", "set but names no backend"]),
    ({"GOL7LB_ADMIN_BIND": "0.0.0.0:18404"}, ["admin.bind", "admin.token"]),
    ({"GOL7LB_BACKENDS": "127.0.0.1:8081"},
     ["backend URL '127.0.0.1:8081' has no scheme: write http://127.0.0.1:8081"]),
    ({"GOL7LB_BACKENDS": "localhost:8081"}, ["'localhost:8081'", "write http://localhost:8081"]),
    ({"GOL7LB_BACKENDS": "http://a:1;http://b:2"}, ["'http://a:1;http://b:2'", "commas"]),
    ({"GOL7LB_BACKENDS": "http://a:1 http://b:2"}, ["'http://b:2'", "commas"]),
    ({"GOL7LB_BACKENDS": "http://a:1 weight=999"}, ["GOL7LB_BACKENDS", "999", "1 to 256"]),
    ({"GOL7LB_BACKENDS": "http://a:1 weight=x"}, ["GOL7LB_BACKENDS", "'x'", "1 to 256"]),
    ({"GOL7LB_BACKENDS": "http://[zz]:1"}, ["'http://[zz]:1'", "IPv6"]),
    ({"GOL7LB_BACKENDS": "http://u:p@a:1"}, ["'http://u:p@a:1'", "http://host:port"]),
    ({"GOL7LB_ADMIN_HOSTS": "a b"}, ["admin.hosts", "'a b'", "host names"]),
    ({"GOL7LB_CONFIG": "pool-weight"}, ["pools.api.backends[0].weight = 999", "1 to 256"]),
    ({"GOL7LB_CONFIG": "no-scheme"}, ["backends[0].url", "'a:1'", "write http://a:1"]),
])
def test_a_bad_setting_stops_the_real_start_without_traceback(tmp_path, env, words):
    files = {"pool-weight": '[pools.api]\nbackends = [{ url = "http://127.0.0.1:10", '
                            'weight = 999 }]\n',
             "no-scheme": '[[backends]]\nurl = "a:1"\n'}
    if env.get("GOL7LB_CONFIG") in files:
        env = {"GOL7LB_CONFIG": write(tmp_path, files[env["GOL7LB_CONFIG"]])}
    assert_one_line_exit_2(run_gunicorn(env, tmp_path), words)


def test_a_busy_admin_port_stops_the_start_with_one_line_naming_the_variable(tmp_path):
    """As a second instance whose admin port the first one holds: exit 2, one line that
    names admin.bind / GOL7LB_ADMIN_BIND and says what to do."""
    import socket
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_gunicorn({"GOL7LB_ADMIN_BIND": f"127.0.0.1:{port}",
                               "GOL7LB_BACKENDS": f"http://127.0.0.1:{free_port()}"}, tmp_path)
    assert_one_line_exit_2(result, [f"admin.bind '127.0.0.1:{port}'", "GOL7LB_ADMIN_BIND",
                                    "already in use", "another address"])


def test_each_setting_is_typed_as_its_default_converts():
    """A setting's kind (how the environment's text converts) follows from its default; the
    field's annotation, which the rest of the code type-checks against, must say the same."""
    import typing

    from gol7lb.config import SECTIONS, Settings
    types = {"str": str, "float": float, "int": int, "bool": bool, "list": tuple[str, ...]}
    for setting in SETTINGS:
        cls = SECTIONS[setting.section] if setting.section else Settings
        hint = typing.get_type_hints(cls)[setting.key]
        if setting.convert is not None:  # a list of structured items (tls.certificates)
            assert typing.get_origin(hint) is tuple, setting.name
            continue
        if typing.get_origin(hint) is typing.Literal:
            hint = type(typing.get_args(hint)[0])
        elif typing.get_origin(hint) is tuple and \
                typing.get_origin(typing.get_args(hint)[0]) is typing.Literal:  # of some words
            hint = tuple[type(typing.get_args(typing.get_args(hint)[0])[0]), ...]  # type: ignore[misc]
        assert hint == types[setting.kind], setting.name


def test_the_settings_reference_is_generated_from_the_declarations():
    """docs/settings.md is what `python -m gol7lb.docs` writes from config.py, nothing else."""
    from gol7lb.docs import COMMAND
    generated = subprocess.run([sys.executable, "-m", "gol7lb.docs"], cwd=ROOT, check=True,
                               capture_output=True, text=True).stdout
    committed = (ROOT / "docs" / "settings.md").read_text()
    assert committed == generated, f"docs/settings.md is stale; regenerate it: {COMMAND}"
    for setting in SETTINGS:
        assert f"| `{setting.name}` | `{setting.env}` |" in committed, setting.name
    assert "| `backends` | `GOL7LB_BACKENDS` |" in committed
