"""Route rules (rules.py) end to end: a real LB with real backends, real clients from several
loopback source addresses (127.0.0.x), each rule, their order, the top-level rules, the
metrics, /status and the access log; bad rules refused at start and on reload."""

from __future__ import annotations

import base64
import http.client
import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import bcrypt
import pytest
import requests

from gol7lb.config import ConfigError, load_settings
from tests.conftest import FAST_HEALTH
from tests.helpers import per_label
from tests.procs import LB, free_port, lb_status, start_backend, wait_until

# cost 4: the cheapest bcrypt; the LB checks any cost the same way
ALICE = bcrypt.hashpw(b"wonderland", bcrypt.gensalt(4)).decode()
GOOD = "Basic " + base64.b64encode(b"alice:wonderland").decode()
WRONG = "Basic " + base64.b64encode(b"alice:looking-glass").decode()


def rules_toml(ports: list[int], alice: str = ALICE) -> str:
    a, b, default = ports
    return f"""
deny = ["127.0.0.5"]                        # requests matching no route: not from .5
response_headers = {{ set = {{ "X-Top" = "unmatched" }} }}

[proxy]
trusted_proxies = ["127.0.0.4"]

[reload]
watch = false

[[backends]]
url = "http://127.0.0.1:{default}"

[pools.a]
[[pools.a.backends]]
url = "http://127.0.0.1:{a}"

[pools.b]
[[pools.b.backends]]
url = "http://127.0.0.1:{b}"

[[routes]]
path_prefix = "/deny/"
pool = "default"
strip_prefix = true
deny = ["127.0.0.2/32"]

[[routes]]
path_prefix = "/allow/"
pool = "default"
strip_prefix = true
allow = ["127.0.0.3/32", "10.0.0.0/8"]

[[routes]]
path_prefix = "/auth/"
pool = "default"
strip_prefix = true
basic_auth = {{ realm = "ops", users = {{ alice = "{alice}" }} }}

[[routes]]
path_prefix = "/old/"
redirect = {{ to = "https://example.com/new{{path_rest}}?was={{query}}", status = 308 }}

[[routes]]
path_prefix = "/same/"
redirect = {{ to = "{{scheme}}://{{host}}/moved{{uri}}", status = 301 }}

[[routes]]
path_prefix = "/ping"
respond = {{ status = 200, body = "pong\\n" }}

[[routes]]
path_prefix = "/teapot"
respond = {{ status = 418, body = '{{"short": true}}', content_type = "application/json" }}

[[routes]]
path_prefix = "/v1/"
pool = "default"
rewrite = {{ path_regex = "^/v1/(.*)$", replace = "/echo/v2/\\\\1" }}

[[routes]]
path_prefix = "/api/"
strip_prefix = true
pool = "default"
rewrite = {{ path_regex = "^/(?P<rest>.*)$", replace = "/echo/stripped/\\\\g<rest>" }}

[[routes]]
path_prefix = "/echo/hdr"
pool = "default"
request_headers.set = {{ "X-Env" = "prod" }}
request_headers.add = {{ "X-Tag" = "lb" }}
request_headers.remove = ["X-Debug"]
response_headers.set = {{ "X-Frame-Options" = "DENY" }}
response_headers.add = {{ "X-Extra" = "1" }}
response_headers.remove = ["X-Backend-Port"]

[[routes]]
path_prefix = "/split/"
split = [ {{ pool = "a", weight = 90 }}, {{ pool = "b", weight = 10 }} ]

[[routes]]
path_prefix = "/order/"
deny = ["127.0.0.2"]
basic_auth = {{ realm = "order", users = {{ alice = "{alice}" }} }}
redirect = {{ to = "/after{{path}}" }}
rewrite = {{ path_regex = "^/order/", replace = "/rewritten/" }}

[[routes]]
path_prefix = "/down/"
pool = "b"
strip_prefix = true
response_headers = {{ set = {{ "X-Frame-Options" = "DENY" }} }}
"""


@pytest.fixture(scope="module")
def rules_lb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LB]:
    tmp = tmp_path_factory.mktemp("rules")
    backends = [start_backend(free_port(), tmp) for _ in range(3)]
    config = tmp / "lb.toml"
    config.write_text(rules_toml([b.port for b in backends]))
    # one worker: split's schedule is per worker, so 100 requests split exactly
    lb = LB({"GOL7LB_CONFIG": str(config), "WEB_CONCURRENCY": "1", **FAST_HEALTH},
            log=tmp / "lb.log")
    lb.backend_ports = [b.port for b in backends]  # type: ignore[attr-defined]
    try:
        lb.wait_ready()
        wait_until(lambda: all(b["state"] == "up" for b in lb_status(lb)["backends"]),
                   timeout=20)
        yield lb
    finally:
        lb.stop()
        for backend in backends:
            backend.stop()
        assert not [pid for p in (lb, *backends) for pid in p.leftovers()]


def get(lb: LB, path: str, source: str = "127.0.0.1", method: str = "GET",
        headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """One request from a chosen loopback address (Linux routes all of 127/8 to lo)."""
    conn = http.client.HTTPConnection("127.0.0.1", lb.port, timeout=10,
                                      source_address=(source, 0))
    try:
        conn.request(method, path, headers=headers or {})
        answer = conn.getresponse()
        return answer.status, {k.lower(): v for k, v in answer.getheaders()}, answer.read()
    finally:
        conn.close()


def echoed(body: bytes) -> tuple[str, dict[str, list[str]]]:
    doc = json.loads(body)
    found: dict[str, list[str]] = {}
    for name, value in doc["headers"]:
        found.setdefault(name.lower(), []).append(value)
    return doc["target"], found


def test_deny_and_allow_use_the_client_address_after_trusted_proxies(rules_lb):
    assert get(rules_lb, "/deny/", "127.0.0.2")[0] == 403
    assert get(rules_lb, "/deny/", "127.0.0.3")[0] == 200
    assert get(rules_lb, "/allow/", "127.0.0.1")[0] == 403
    assert get(rules_lb, "/allow/", "127.0.0.3")[0] == 200
    # 127.0.0.4 is a trusted proxy: the client is the right-most untrusted X-Forwarded-For
    assert get(rules_lb, "/allow/", "127.0.0.4", headers={
        "X-Forwarded-For": "127.0.0.3"})[0] == 200
    assert get(rules_lb, "/allow/", "127.0.0.4", headers={
        "X-Forwarded-For": "10.1.2.3, 127.0.0.9"})[0] == 403
    assert get(rules_lb, "/allow/", "127.0.0.4", headers={
        "X-Forwarded-For": "127.0.0.9, 10.1.2.3"})[0] == 200
    # from anyone else, X-Forwarded-For is not believed
    assert get(rules_lb, "/allow/", "127.0.0.1", headers={
        "X-Forwarded-For": "127.0.0.3"})[0] == 403
    status, headers, body = get(rules_lb, "/deny/x", "127.0.0.2")
    assert status == 403 and b"403 Forbidden" in body and "x-backend-port" not in headers
    counts = wait_until(lambda: per_label(rules_lb, "gol7lb_denied_total", "reason"))
    assert counts.get("deny", 0) >= 2 and counts.get("allow", 0) >= 3
    by_route = per_label(rules_lb, "gol7lb_denied_total", "route", reason="deny")
    assert by_route["routes[0] path_prefix=/deny/"] >= 2


def test_basic_auth_asks_checks_bcrypt_and_passes_the_right_password(rules_lb):
    status, headers, _ = get(rules_lb, "/auth/")
    assert status == 401 and headers["www-authenticate"].startswith('Basic realm="ops"')
    assert get(rules_lb, "/auth/", headers={"Authorization": WRONG})[0] == 401
    assert get(rules_lb, "/auth/", headers={"Authorization": "Basic !!!"})[0] == 401
    nobody = "Basic " + base64.b64encode(b"bob:wonderland").decode()
    assert get(rules_lb, "/auth/", headers={"Authorization": nobody})[0] == 401
    for _ in range(3):  # the first check runs bcrypt, the next ones are remembered
        assert get(rules_lb, "/auth/", headers={"Authorization": GOOD})[0] == 200
    wait_until(lambda: per_label(rules_lb, "gol7lb_denied_total", "reason").get(
        "basic_auth", 0) >= 4)


def test_redirect_fills_its_placeholders(rules_lb):
    status, headers, _ = get(rules_lb, "/old/a/b?x=1")
    assert status == 308
    assert headers["location"] == "https://example.com/new/a/b?was=x=1"
    status, headers, _ = get(rules_lb, "/same/p?q=2", headers={"Host": "shop.test:8080"})
    assert status == 301 and headers["location"] == "http://shop.test:8080/moved/same/p?q=2"


def test_respond_answers_without_a_backend(rules_lb):
    status, headers, body = get(rules_lb, "/ping")
    assert (status, body) == (200, b"pong\n") and "x-backend-port" not in headers
    assert headers["content-type"].startswith("text/plain")
    status, headers, body = get(rules_lb, "/ping", method="HEAD")
    assert (status, body, headers["content-length"]) == (200, b"", "5")
    status, headers, body = get(rules_lb, "/teapot")
    assert status == 418 and json.loads(body) == {"short": True}
    assert headers["content-type"] == "application/json"


def test_rewrite_after_strip_prefix_keeps_the_query(rules_lb):
    target, _ = echoed(get(rules_lb, "/v1/abc/d?x=1&y=2")[2])
    assert target == "/echo/v2/abc/d?x=1&y=2"
    target, _ = echoed(get(rules_lb, "/api/k?z=3")[2])
    assert target == "/echo/stripped/k?z=3"


def test_request_and_response_headers_set_add_remove(rules_lb):
    status, headers, body = get(rules_lb, "/echo/hdr", headers={
        "X-Env": "dev", "X-Tag": "client", "X-Debug": "1"})
    _, sent = echoed(body)
    assert status == 200
    assert sent["x-env"] == ["prod"] and sent["x-tag"] == ["client, lb"]
    assert "x-debug" not in sent
    assert headers["x-frame-options"] == "DENY" and headers["x-extra"] == "1"
    assert "x-backend-port" not in headers and "x-request-id" in headers


def test_response_headers_apply_to_the_lbs_own_errors_after_the_pick(rules_lb):
    status, headers, _ = get(rules_lb, "/down/drop")  # pool b's backend closes: 502
    assert status == 502 and headers["x-frame-options"] == "DENY"


def test_split_sends_exact_shares_per_hundred_requests(rules_lb):
    a, b, _ = rules_lb.backend_ports
    ports = [int(requests.get(rules_lb.url + "/split/", timeout=10).headers["X-Backend-Port"])
             for _ in range(100)]
    assert (ports.count(a), ports.count(b)) == (90, 10)
    assert max(len(run) for run in "".join("a" if p == a else "b" for p in ports)
               .split("b")) <= 10  # interleaved, not 90 then 10


def test_rules_run_in_the_contracts_order(rules_lb):
    # access before everything: denied even with good credentials
    assert get(rules_lb, "/order/x", "127.0.0.2", headers={"Authorization": GOOD})[0] == 403
    # then basic_auth, before the redirect
    assert get(rules_lb, "/order/x")[0] == 401
    # then the redirect, from the path as it came (rewrite comes after it)
    status, headers, _ = get(rules_lb, "/order/x", headers={"Authorization": GOOD})
    assert status == 302 and headers["location"] == "/after/order/x"


def test_top_level_rules_apply_to_requests_no_route_matches(rules_lb):
    status, headers, _ = get(rules_lb, "/")
    assert status == 200 and headers["x-top"] == "unmatched"
    assert get(rules_lb, "/", "127.0.0.5")[0] == 403
    status, headers, _ = get(rules_lb, "/ping", "127.0.0.5")  # a route's own rules only
    assert status == 200 and "x-top" not in headers
    wait_until(lambda: per_label(rules_lb, "gol7lb_denied_total", "route").get("unmatched"))


def test_status_shows_each_routes_rules_and_counts(rules_lb):
    get(rules_lb, "/deny/", "127.0.0.2")
    doc = wait_until(lambda: (d := lb_status(rules_lb)) and d["routes"][0]["denied"] and d,
                     timeout=10)
    routes = doc["routes"]
    assert routes[0]["name"] == "routes[0] path_prefix=/deny/"
    assert routes[0]["rules"] == {"deny": ["127.0.0.2/32"]} and routes[0]["denied"] >= 1
    assert routes[0]["rate_limited"] == 0
    auth = routes[2]["rules"]["basic_auth"]
    assert auth == {"realm": "ops", "users": ["alice"]}  # never the hash
    assert routes[3]["pool"] is None and routes[3]["rules"]["redirect"]["status"] == 308
    assert routes[10]["rules"]["split"] == [{"pool": "a", "weight": 90},
                                            {"pool": "b", "weight": 10}]
    assert doc["unmatched"]["rules"]["deny"] == ["127.0.0.5"]
    assert ALICE not in json.dumps(doc)


def test_answers_the_lb_makes_go_through_the_access_log(rules_lb):
    get(rules_lb, "/deny/logged-403", "127.0.0.2")
    get(rules_lb, "/old/logged-308")
    wait_until(lambda: "/deny/logged-403" in rules_lb.output()
               and "/old/logged-308" in rules_lb.output())
    lines = rules_lb.output().splitlines()
    assert any("/deny/logged-403" in line and " 403 " in line for line in lines)
    assert any("/old/logged-308" in line and " 308 " in line for line in lines)


# -- refusals (item 5) ---------------------------------------------------------------------------

BASE = '[[backends]]\nurl = "http://127.0.0.1:1"\n[pools.a]\n[[pools.a.backends]]\n' \
       'url = "http://127.0.0.1:2"\n'


@pytest.mark.parametrize("route, words", [
    ('path_prefix = "/x/"\npool = "a"\nresponse_headers = { set = { "X-A" = "1\\r\\nSet-Cookie: '
     'a=b" } }', ["routes[0].response_headers.set.X-A", "path_prefix=/x/", "CR, LF or NUL"]),
    ('host = "h.test"\nredirect = { to = "https://e.test/\\r\\nX: y" }',
     ["routes[0].redirect.to", "host=h.test", "CR, LF or NUL"]),
    ('pool = "a"\nrequest_headers = { add = { "X-A" = "nul\\u0000" } }',
     ["routes[0].request_headers.add.X-A", "any request", "CR, LF or NUL"]),
    ('pool = "nope"', ["routes[0].pool", "'nope'", "no such pool", "any request"]),
    ('path_prefix = "/s/"\nsplit = [ { pool = "a", weight = 50 }, { pool = "gone", weight = 50 } ]',
     ["routes[0].split", "'gone'", "no such pool", "path_prefix=/s/"]),
    ('split = [ { pool = "a", weight = 90 }, { pool = "default", weight = 20 } ]',
     ["routes[0].split", "add up to 110"]),
    ('pool = "a"\nallow = ["10.0.0.0/33"]', ["routes[0].allow", "10.0.0.0/33", "not a CIDR"]),
    ('pool = "a"\ndeny = ["ten"]', ["routes[0].deny", "'ten'"]),
    ('pool = "a"\nrewrite = { path_regex = "^(a)\\\\1$", replace = "/" }',
     ["routes[0].rewrite.path_regex", "RE2", "linear time"]),
    ('pool = "a"\nrewrite = { path_regex = "(?=x)", replace = "/" }',
     ["routes[0].rewrite.path_regex", "lookaround"]),
    ('pool = "a"\nrewrite = { path_regex = "^/(x)$", replace = "/\\\\2" }',
     ["routes[0].rewrite.replace", "1 groups"]),
    ('pool = "a"\nbasic_auth = { users = { alice = "plaintext" } }',
     ["routes[0].basic_auth.users.alice", "bcrypt hashes only"]),
    ('redirect = { to = "/x", status = 200 }', ["routes[0].redirect.status", "301"]),
    ('redirect = { to = "/{nope}" }', ["routes[0].redirect.to", "placeholders"]),
    ('respond = { status = 204, body = "x" }', ["routes[0].respond.body", "204"]),
    ('pool = "a"\nrespond = { body = "x" }', ["routes[0].pool", "respond"]),
    ('pool = "a"\nresponse_headers = { set = { "Content-Length" = "1" } }',
     ["routes[0].response_headers.set", "framing"]),
    ('pool = "a"\nrequest_headers = { set = { "X-A" = "1" }, remove = ["x-a"] }',
     ["routes[0].request_headers.remove", "one of set, add, remove"]),
])
def test_bad_rules_are_refused_with_one_line_naming_the_route_and_key(tmp_path, route, words):
    path = tmp_path / "lb.toml"
    path.write_text(BASE + "[[routes]]\n" + route + "\n")
    with pytest.raises(ConfigError) as error:
        load_settings({"GOL7LB_CONFIG": str(path)})
    message = str(error.value)
    assert "\n" not in message.strip()
    for word in words:
        assert word in message, (word, message)


def test_bad_top_level_rules_are_refused_too(tmp_path):
    path = tmp_path / "lb.toml"
    path.write_text('split = [ { pool = "a", weight = 100 } ]\n' + BASE)
    with pytest.raises(ConfigError, match="unknown setting split"):
        load_settings({"GOL7LB_CONFIG": str(path)})
    path.write_text('respond = { status = 200, body = "x", colour = 1 }\n' + BASE)
    with pytest.raises(ConfigError, match=r"respond.colour .*requests that match no route"):
        load_settings({"GOL7LB_CONFIG": str(path)})


def test_check_refuses_a_bad_rule_with_one_line_and_status_2(tmp_path):
    path = tmp_path / "lb.toml"
    path.write_text(BASE + '[[routes]]\npath_prefix = "/x/"\npool = "a"\n'
                    'allow = ["300.0.0.0/8"]\n')
    done = subprocess.run([sys.executable, "-m", "gol7lb", "check", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and "routes[0].allow" in lines[0] and "path_prefix=/x/" in lines[0]


def test_a_reload_with_a_bad_rule_is_refused_and_the_old_rules_keep_working(
        lb_factory, backend_factory, tmp_path: Path):
    backend = backend_factory()
    config = tmp_path / "lb.toml"
    good = (f'[[backends]]\nurl = "http://127.0.0.1:{backend.port}"\n[reload]\nwatch = false\n'
            '[[routes]]\npath_prefix = "/ping"\nrespond = { body = "pong" }\n')
    config.write_text(good)
    lb = lb_factory({"GOL7LB_CONFIG": str(config), **FAST_HEALTH})
    assert requests.get(lb.url + "/ping", timeout=10).text == "pong"
    config.write_text(good.replace('respond = { body = "pong" }',
                                   'respond = { body = "new", content_type = "a\\nb" }'))
    lb.signal(signal.SIGHUP)
    error = wait_until(lambda: lb_status(lb)["config"]["last_error"], timeout=20)
    assert "routes[0].respond.content_type" in error and "path_prefix=/ping" in error
    assert lb_status(lb)["config"]["generation"] == 1
    assert requests.get(lb.url + "/ping", timeout=10).text == "pong"


def test_requests_bringing_the_same_new_credentials_at_once_share_one_bcrypt_check(
        monkeypatch):
    import threading

    from gol7lb import rules

    calls = []
    real = bcrypt.checkpw

    def slow_check(password: bytes, hashed: bytes) -> bool:
        calls.append(password)
        gate.wait(10)  # every thread has asked before the check ends
        return real(password, hashed)

    gate = threading.Event()
    monkeypatch.setattr(rules.bcrypt, "checkpw", slow_check)
    check = rules.BasicAuthCheck(rules.BasicAuth("ops", (("alice", ALICE),)))
    results: list[bool] = []
    threads = [threading.Thread(target=lambda: results.append(check.passes(GOOD)))
               for _ in range(8)]
    for thread in threads:
        thread.start()
    wait_until(lambda: len(calls) == 1 and len(check._pending) == 1)
    gate.set()
    for thread in threads:
        thread.join(10)
    assert results == [True] * 8 and len(calls) == 1
    assert check.passes(GOOD) and len(calls) == 1  # remembered
    assert not check.passes(WRONG) and len(calls) == 2


def test_basic_auth_reads_72_bytes_of_a_password_as_bcrypt_does():
    from gol7lb import rules

    long = b"p" * 72
    hashed = bcrypt.hashpw(long, bcrypt.gensalt(4)).decode()
    check = rules.BasicAuthCheck(rules.BasicAuth("ops", (("bob", hashed),)))
    assert check.passes("Basic " + base64.b64encode(b"bob:" + long + b"-and-more").decode())
    assert not check.passes("Basic " + base64.b64encode(b"bob:" + long[:71]).decode())
    assert not check.passes("Basic " + base64.b64encode(b"eve:" + long).decode())


def test_every_example_of_the_route_rules_docs_loads(tmp_path):
    import re

    doc = (Path(__file__).parent.parent / "docs" / "configuration.md").read_text()
    start = doc.index("## Route rules")
    section = doc[start:doc.index("\n## ", start + 1)]
    examples = re.findall(r"```toml\n(.*?)```", section, re.S)
    assert len(examples) >= 7
    pools = "".join(f'[pools.{name}]\n[[pools.{name}.backends]]\nurl = "http://127.0.0.1:{i}"\n'
                    for i, name in enumerate(["ops", "api", "v1", "v2", "web"], start=2))
    for example in examples:
        path = tmp_path / "lb.toml"
        path.write_text(example.replace("$2b$12$3m0n...53 characters", ALICE) + "\n"
                        + pools + '[[backends]]\nurl = "http://127.0.0.1:1"\n')
        settings = load_settings({"GOL7LB_CONFIG": str(path)})
        assert settings.routes and all(route.rules or route.compress or route.mirror
                                       for route in settings.routes), example
