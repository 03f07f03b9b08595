"""Routes: matching rules (pure), their validation, and routing through a real LB."""

from __future__ import annotations

from pathlib import Path

import pytest
import requests

from gol7lb.config import ConfigError, load_settings
from gol7lb.pools import Route
from gol7lb.routing import Router, host_matches, normalise_host, strip_prefix
from tests.conftest import FAST_HEALTH


def router(*routes: Route, pools=("default", "api", "web")) -> Router:
    return Router(routes, list(pools))


def pool_for(r: Router, path: str = "/", method: str = "GET", host: str | None = "x",
             **headers: str) -> str | None:
    environ = {"HTTP_" + k.upper(): v for k, v in headers.items()}
    match = r.match(environ, path, method, host)
    return match.pool if match else None


@pytest.mark.parametrize("pattern, host, expected", [
    ("api.example.com", "api.example.com", True),
    ("api.example.com", "www.example.com", False),
    ("*.example.com", "a.example.com", True),
    ("*.example.com", "a.b.example.com", True),
    ("*.example.com", "example.com", False),
    ("*.example.com", "badexample.com", False),
    ("*.example.com", "a.example.com.evil", False),
])
def test_host_patterns(pattern, host, expected):
    assert host_matches(pattern, host) is expected


@pytest.mark.parametrize("header, host", [
    ("API.Example.COM:8080", "api.example.com"), ("api.example.com", "api.example.com"),
    ("[::1]:8080", "[::1]"), ("", ""), (None, ""),
    ("api.example.com.", "api.example.com"), ("API.example.com.:443", "api.example.com"),
])
def test_host_header_is_lower_cased_and_its_port_ignored(header, host):
    assert normalise_host(header) == host


def test_path_prefixes_are_segment_aware():
    r = router(Route("api", path_prefix="/api/"), Route("web", path_prefix="/app"))
    assert pool_for(r, "/api/x") == "api"
    assert pool_for(r, "/api/") == "api"
    assert pool_for(r, "/api") == "default"  # "/api/" needs the slash
    assert pool_for(r, "/app") == "web"
    assert pool_for(r, "/app/x") == "web"
    assert pool_for(r, "/apple") == "default"  # not "/app" + more letters


def test_first_match_in_file_order_wins_and_all_conditions_must_hold():
    r = router(Route("api", host="api.example.com", path_prefix="/v2/",
                     methods=frozenset({"POST"})),
               Route("web", host="*.example.com"),
               Route("api", headers=(("x-canary", "1"),)))
    assert pool_for(r, "/v2/a", "POST", "api.example.com") == "api"
    assert pool_for(r, "/v2/a", "GET", "api.example.com") == "web"  # method differs
    assert pool_for(r, "/", "GET", "www.example.com:443") == "web"
    assert pool_for(r, "/", "GET", "other.org", x_canary="1") == "api"
    assert pool_for(r, "/", "GET", "other.org", x_canary="2") == "default"
    assert pool_for(r, "/", "GET", None) == "default"


def test_a_host_with_the_roots_trailing_dot_matches_its_route():
    r = router(Route("api", host="api.example.com"), Route("web", host="*.example.com"))
    assert pool_for(r, host="api.example.com.:8080") == "api"
    assert pool_for(r, host="www.example.com.") == "web"


def test_prefixes_are_normalised_like_the_paths_they_match():
    r = router(Route("api", path_prefix="/%61pi//v1/./", strip_prefix=True))
    match = r.match({}, "/api/v1/x", "GET", None)
    assert match is not None and match.pool == "api" and match.strip == "/api/v1/"


def test_no_match_and_no_default_pool_is_none():
    r = router(Route("api", path_prefix="/api"), pools=("api",))
    assert pool_for(r, "/elsewhere") is None
    assert pool_for(r, "/api/x") == "api"


@pytest.mark.parametrize("target, prefix, expected", [
    ("/api/x?q=1", "/api/", "/x?q=1"), ("/api/x", "/api", "/x"), ("/api", "/api", "/"),
    ("/api?q=1", "/api", "/?q=1"), ("/api/", "/api/", "/"),
])
def test_strip_prefix(target, prefix, expected):
    assert strip_prefix(target, prefix) == expected


def config(tmp_path: Path, text: str) -> dict[str, str]:
    path = tmp_path / "lb.toml"
    path.write_text(text)
    return {"GOL7LB_CONFIG": str(path)}


@pytest.mark.parametrize("text, words", [
    ('[[routes]]\npool = "nope"\n[[backends]]\nurl = "http://127.0.0.1:1"\n',
     ["routes[0].pool", "'nope'", "no such pool", "default"]),
    ('[pools.api]\nalgorithm = "round_robin"\n', ["pools.api", "at least one backend"]),
    ('[pools.default]\n[[pools.default.backends]]\nurl = "http://127.0.0.1:1"\n',
     ["pools", "'default'"]),
    ('[[routes]]\npool = "api"\nhost = "a b"\n', ["routes[0].host"]),
    ('[[routes]]\npool = "api"\npath_prefix = "api"\n', ["routes[0].path_prefix"]),
    ('[[routes]]\npool = "api"\npath_prefix = "/a%2Fb/"\n',
     ["routes[0].path_prefix", "'/a%2Fb/'", "unambiguous", "encoded"]),
    ('[[routes]]\npool = "api"\npath_prefix = "/x/%2e%2e/"\n',
     ["routes[0].path_prefix", "dot segment"]),
    ('[[routes]]\npool = "api"\nmethods = "GET"\n', ["routes[0].methods"]),
    ('[[routes]]\npool = "api"\nstrip_prefix = true\n', ["routes[0].strip_prefix"]),
    ('[[routes]]\npool = "api"\ncolour = "red"\n', ["routes[0].colour"]),
    ('[pools.api]\nalgorithm = "fastest"\n[[pools.api.backends]]\nurl = "http://127.0.0.1:1"\n',
     ["algorithm", "'fastest'"]),
    ('[pools.api]\nhash_key = "header:"\n[[pools.api.backends]]\nurl = "http://127.0.0.1:1"\n',
     ["hash_key"]),
    ('[[backends]]\nurl = "http://127.0.0.1:1"\nmax_connections = -1\n',
     ["backends[0].max_connections"]),
    ('backends = []\n', ["no backend anywhere"]),
])
def test_bad_pools_and_routes_are_refused_with_one_line(tmp_path, text, words):
    with pytest.raises(ConfigError) as error:
        load_settings(config(tmp_path, text))
    message = str(error.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message


def test_pools_and_routes_load_in_file_order(tmp_path):
    settings = load_settings(config(tmp_path, '''
[pools.api]
algorithm = "least_connections"
[[pools.api.backends]]
url = "http://127.0.0.1:9001"
max_connections = 5
[pools.web]
[[pools.web.backends]]
url = "http://127.0.0.1:9002"
[[routes]]
host = "*.Example.com"
pool = "web"
[[routes]]
path_prefix = "/api/"
methods = ["get", "POST"]
headers = { "X-Canary" = "1" }
pool = "api"
strip_prefix = true
'''))
    assert list(settings.pools) == ["api", "web"]  # no [[backends]]: no default pool
    assert settings.pools["api"].algorithm == "least_connections"
    assert settings.pools["api"].backends[0].max_connections == 5
    assert settings.routes[0].host == "*.example.com"
    assert settings.routes[1].methods == {"GET", "POST"}
    assert settings.routes[1].headers == (("x-canary", "1"),)
    assert not settings.demo_backends


def test_routes_send_requests_to_their_pools_through_a_real_lb(lb_factory, backend_factory,
                                                               tmp_path):
    default, api, web = backend_factory(), backend_factory(), backend_factory()
    env = config(tmp_path, f'''
[[backends]]
url = "http://127.0.0.1:{default.port}"
[pools.api]
[[pools.api.backends]]
url = "http://127.0.0.1:{api.port}"
[pools.web]
[[pools.web.backends]]
url = "http://127.0.0.1:{web.port}"
[[routes]]
path_prefix = "/api/"
pool = "api"
strip_prefix = true
[[routes]]
host = "*.example.com"
pool = "web"
''')
    lb = lb_factory({**env, **FAST_HEALTH})

    def served(path: str, **headers: str) -> tuple[int, str]:
        r = requests.get(lb.url + path, headers=headers, timeout=5)
        return int(r.headers["X-Backend-Port"]), r.json()["target"] if path.startswith(
            "/api/echo") else ""

    assert served("/")[0] == default.port
    assert served("/", Host="www.example.com")[0] == web.port
    assert served("/", Host="example.com")[0] == default.port
    port, path = served("/api/echo?q=1")
    assert port == api.port and path == "/echo?q=1"  # the prefix is stripped
    doc = requests.get(lb.admin_url + "/status", timeout=5).json()
    assert [r["pool"] for r in doc["routes"]] == ["api", "web"]
    assert set(doc["pools"]) == {"default", "api", "web"}


def test_no_route_and_no_default_pool_is_a_plain_404(lb_factory, backend_factory, tmp_path):
    api = backend_factory()
    env = config(tmp_path, f'''
[pools.api]
[[pools.api.backends]]
url = "http://127.0.0.1:{api.port}"
[[routes]]
path_prefix = "/api"
pool = "api"
''')
    lb = lb_factory({**env, **FAST_HEALTH})
    answer = requests.get(lb.url + "/nowhere", timeout=5)
    assert answer.status_code == 404
    assert answer.headers["Content-Type"].startswith("text/plain")
    assert "no route" in answer.text and "Traceback" not in answer.text
    assert int(requests.get(lb.url + "/api", timeout=5).headers["X-Backend-Port"]) == api.port
