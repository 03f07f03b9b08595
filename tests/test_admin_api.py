"""The runtime admin API against a real LB: drain, enable, add, remove; bad input; the token."""

from __future__ import annotations

import threading

import pytest
import requests

from tests.conftest import FAST_HEALTH, backends_env
from tests.procs import backend_entry as entry
from tests.procs import free_port, wait_until
from tests.procs import lb_status as status


def backend_states(lb) -> list[tuple[str, str, int, tuple[str, ...], str]]:  # noqa: ANN001
    """What a mutating call would change: each backend's id, state, weight, pools and source
    (not the health-check timestamps, which move on their own)."""
    return [(e["id"], e["state"], e["weight"], tuple(e["pools"]), e["source"])
            for e in status(lb)["backends"]]


def served_ports(lb, n: int) -> list[int]:
    return [int(requests.get(lb.url + "/", timeout=5).headers["X-Backend-Port"])
            for _ in range(n)]


def test_drain_lets_in_flight_finish_then_reports_drained_and_enable_undoes_it(
        lb_factory, three_backends):
    ports = [b.port for b in three_backends]
    lb = lb_factory({"GOL7LB_BACKENDS": backends_env(ports), **FAST_HEALTH})
    victim = ports[0]
    # A slow request in flight on the victim: round robin over 3, so 3 slow requests, each
    # sent once the previous one is in flight (two picks racing for one ticket could send two
    # to the same backend).
    results: list[int] = []

    def slow() -> None:
        results.append(requests.get(lb.url + "/sleep/3", timeout=15).status_code)

    threads = [threading.Thread(target=slow) for _ in range(3)]
    for started, t in enumerate(threads, start=1):
        t.start()
        wait_until(lambda n=started: sum(e["in_flight"] for e in status(lb)["backends"]) == n)
    assert entry(lb, victim)["in_flight"] == 1
    answer = requests.post(f"{lb.admin_url}/backends/127.0.0.1:{victim}/drain", timeout=5)
    assert answer.status_code == 200
    assert answer.json()["state"] == "draining"
    wait_until(lambda: entry(lb, victim)["state"] == "drained", timeout=10)
    for t in threads:
        t.join()
    assert results == [200, 200, 200]  # the in-flight request on the drained backend finished
    assert victim not in served_ports(lb, 12)
    answer = requests.post(f"{lb.admin_url}/backends/127.0.0.1:{victim}/enable", timeout=5)
    assert answer.status_code == 200 and answer.json()["state"] == "up"
    assert victim in served_ports(lb, 6)


def test_added_backend_is_checked_then_serves_and_removed_one_stops(lb_factory,
                                                                     backend_factory):
    first, extra = backend_factory(), backend_factory()
    lb = lb_factory({"GOL7LB_BACKENDS": backends_env([first.port]), **FAST_HEALTH})
    answer = requests.post(lb.admin_url + "/backends", json={
        "url": f"http://127.0.0.1:{extra.port}", "weight": 2}, timeout=5)
    assert answer.status_code == 201, answer.text
    created = answer.json()
    assert created["id"] == f"127.0.0.1:{extra.port}"
    assert created["source"] == "api" and created["weight"] == 2
    assert created["state"] == "down"  # health-checked before it takes traffic
    wait_until(lambda: entry(lb, extra.port)["state"] == "up", timeout=5)
    assert status(lb)["pools"]["default"]["backends"] == [f"127.0.0.1:{first.port}",
                                                          f"127.0.0.1:{extra.port}"]
    ports = served_ports(lb, 9)
    assert ports.count(extra.port) == 6 and ports.count(first.port) == 3  # weight 2 : 1

    assert requests.post(lb.admin_url + "/backends", json={
        "url": f"http://127.0.0.1:{extra.port}"}, timeout=5).status_code == 409
    answer = requests.delete(f"{lb.admin_url}/backends/127.0.0.1:{extra.port}", timeout=5)
    assert answer.status_code == 200
    assert set(served_ports(lb, 6)) == {first.port}
    assert [b["id"] for b in status(lb)["backends"]] == [f"127.0.0.1:{first.port}"]


@pytest.mark.parametrize("method, path, body, code, words", [
    ("POST", "/backends", "not json", 400, "not valid JSON"),
    ("POST", "/backends", "[1, 2]", 400, "JSON object"),
    ("POST", "/backends", '{"url": "ftp://127.0.0.1:21"}', 400, "only http://"),
    ("POST", "/backends", '{"url": "http://127.0.0.1:1", "weight": 0}', 400, "weight"),
    ("POST", "/backends", '{"url": "http://127.0.0.1:1", "colour": "red"}', 400, "colour"),
    ("POST", "/backends", '{"url": "http://127.0.0.1:1", "pool": "nope"}', 404, "nope"),
    ("POST", "/backends/127.0.0.1:1/drain", "", 404, "no backend"),
    ("POST", "/backends/127.0.0.1:1/enable", "", 404, "no backend"),
    ("DELETE", "/backends/127.0.0.1:1", "", 404, "no backend"),
    ("GET", "/nowhere", "", 404, "no such admin endpoint"),
    ("PUT", "/status", "", 405, "not allowed"),
    ("GET", "/backends/127.0.0.1:1/drain", "", 405, "not allowed"),
])
def test_bad_admin_calls_get_a_json_error_and_no_traceback(shared_lb, method, path, body,
                                                           code, words):
    """One LB for all of them: none of these calls changes anything."""
    lb = shared_lb
    headers = {"Content-Type": "application/json"} if body else {}
    answer = requests.request(method, lb.admin_url + path, data=body, headers=headers,
                              timeout=5)
    assert answer.status_code == code
    assert answer.headers["Content-Type"] == "application/json"
    assert words in answer.json()["error"]
    if code == 405:
        assert "Allow" in answer.headers
    assert "Traceback" not in lb.output()


def test_a_non_loopback_admin_bind_without_token_refuses_to_start(lb_factory,
                                                                  backend_factory):
    backend = backend_factory()
    lb = lb_factory({"GOL7LB_BACKENDS": backends_env([backend.port]),
                     "GOL7LB_ADMIN_BIND": f"0.0.0.0:{free_port()}"}, ready=False)
    assert lb.wait(timeout=20) == 2
    output = lb.output()
    assert "admin.bind" in output and "admin.token" in output
    assert "Traceback" not in output


def test_drain_survives_a_reload_and_api_changes_end_with_it(lb_factory, backend_factory,
                                                             tmp_path):
    a, b, extra = backend_factory(), backend_factory(), backend_factory()
    config = tmp_path / "lb.toml"
    config.write_text(f'[[backends]]\nurl = "http://127.0.0.1:{a.port}"\n'
                      f'[[backends]]\nurl = "http://127.0.0.1:{b.port}"\n')
    lb = lb_factory({"GOL7LB_CONFIG": str(config), **FAST_HEALTH})
    assert requests.post(f"{lb.admin_url}/backends/127.0.0.1:{a.port}/drain",
                         timeout=5).status_code == 200
    assert requests.post(lb.admin_url + "/backends", json={
        "url": f"http://127.0.0.1:{extra.port}"}, timeout=5).status_code == 201
    generation = status(lb)["config"]["generation"]
    config.write_text(config.read_text() + "[health]\nrise = 1\n")  # any valid edit reloads
    wait_until(lambda: status(lb)["config"]["generation"] > generation, timeout=5)
    doc = status(lb)
    assert [e["id"] for e in doc["backends"]] == [f"127.0.0.1:{a.port}", f"127.0.0.1:{b.port}"]
    assert entry(lb, a.port)["state"] == "drained"  # host state, kept by address
    assert set(served_ports(lb, 6)) == {b.port}


def test_a_removed_file_backend_added_back_joins_only_the_named_pool_at_its_weight(
        lb_factory, backend_factory, tmp_path):
    """DELETE takes an address out of every pool; POST brings it back as the API says (this
    pool, this weight, source "api"), not as the file had it, until the next reload."""
    a, b = backend_factory(), backend_factory()
    config = tmp_path / "lb.toml"
    config.write_text(f'[[backends]]\nurl = "http://127.0.0.1:{a.port}"\n'
                      f'[[backends]]\nurl = "http://127.0.0.1:{b.port}"\n'
                      f'[pools.api]\nbackends = [{{ url = "http://127.0.0.1:{b.port}" }}]\n'
                      '[[routes]]\npath_prefix = "/api"\npool = "api"\n')
    lb = lb_factory({"GOL7LB_CONFIG": str(config), **FAST_HEALTH})
    b_id = f"127.0.0.1:{b.port}"
    assert requests.delete(f"{lb.admin_url}/backends/{b_id}", timeout=5).status_code == 200
    answer = requests.post(lb.admin_url + "/backends", json={
        "url": f"http://127.0.0.1:{b.port}", "weight": 3, "pool": "default"}, timeout=5)
    assert answer.status_code == 201, answer.text
    created = answer.json()
    assert (created["weight"], created["source"], created["pools"]) == (3, "api", ["default"])
    doc = status(lb)
    assert doc["pools"]["api"]["backends"] == []
    assert doc["pools"]["default"]["backends"] == [f"127.0.0.1:{a.port}", b_id]
    wait_until(lambda: entry(lb, b.port)["state"] == "up", timeout=5)
    ports = served_ports(lb, 8)
    assert ports.count(b.port) == 6 and ports.count(a.port) == 2  # weight 3 : 1
    assert requests.get(lb.url + "/api/x", timeout=5).status_code == 503  # its pool is empty


def admin_call(lb, method: str, path: str, token: str = "", **kwargs):
    """A raw admin call: no Content-Type unless given, headers as given."""
    headers = kwargs.pop("headers", {})
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return requests.request(method, lb.admin_url + path, headers=headers, timeout=5, **kwargs)


@pytest.mark.parametrize("token", ["", "s3cret"], ids=["no-token", "token"])
def test_a_web_page_cannot_drive_the_api_but_the_same_origin_can(lb_factory, backend_factory,
                                                                   token):
    """With a token, every mutating call needs it (401 without). Cross-site requests
    (foreign Origin, DNS-rebinding Host, a form or text/plain body) are refused with 403
    whatever the token, and change nothing; reads stay open. Names in admin.hosts (a
    Service's, a reverse proxy's) pass the Host check, look-alikes do not."""
    backend, extra = backend_factory(), backend_factory()
    lb = lb_factory({"GOL7LB_BACKENDS": backends_env([backend.port]),
                     "GOL7LB_ADMIN_HOSTS": "gol7lb-admin.internal, Admin.Example",
                     **({"GOL7LB_ADMIN_TOKEN": token} if token else {})})
    own = f"127.0.0.1:{lb.admin_port}"
    drain = f"/backends/127.0.0.1:{backend.port}/drain"
    add = f'{{"url": "http://127.0.0.1:{extra.port}", "weight": 256}}'
    json_type = {"Content-Type": "application/json"}
    before = backend_states(lb)
    refused = [
        ("POST", drain, {"Origin": "http://evil.example"}, None),
        ("POST", drain, {"Origin": "http://evil.example", **json_type}, None),
        ("POST", drain, {"Origin": "null"}, None),
        ("POST", drain, {"Origin": f"http://127.0.0.1:{lb.admin_port + 1}"}, None),
        ("POST", drain, {"Host": f"evil.example:{lb.admin_port}"}, None),
        ("POST", drain, {"Host": f"evil.example:{lb.admin_port}",
                         "Origin": f"http://evil.example:{lb.admin_port}"}, None),
        ("POST", drain, {"Content-Type": "text/plain"}, None),
        ("POST", "/backends", {"Origin": "http://evil.example", **json_type}, add),
        ("POST", "/backends", {"Content-Type": "text/plain"}, add),
        ("POST", "/backends", {"Content-Type": "application/x-www-form-urlencoded"}, add),
        ("POST", "/backends", {"Content-Type": "multipart/form-data; boundary=x"}, add),
        ("POST", "/backends", {}, add),  # a body without a type
        ("DELETE", f"/backends/127.0.0.1:{backend.port}", {"Origin": "http://evil.example"},
         None),
        ("DELETE", f"/backends/127.0.0.1:{backend.port}",
         {"Host": f"evil.example:{lb.admin_port}"}, None),
        *[("POST", drain, {"Host": host}, None)
          for host in ("gol7lb-admin.internal.evil.example", "example", "", "a b", "x@localhost")],
    ]
    for method, path, headers, body in refused:
        answer = admin_call(lb, method, path, token, headers=dict(headers), data=body)
        assert answer.status_code == 403, (method, path, headers, answer.text)
        assert answer.headers["Content-Type"] == "application/json"
        assert answer.json()["error"], (method, path, headers)
    assert backend_states(lb) == before  # nothing changed: not drained, nothing added
    # Reads stay open to anyone.
    for headers in ({"Origin": "http://evil.example"}, {"Host": "evil.example"}):
        assert admin_call(lb, "GET", "/status", headers=headers).status_code == 200
        assert admin_call(lb, "GET", "/metrics", headers=headers).status_code == 200
    if token:  # same-origin calls without the right bearer token: 401
        for wrong in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {token}"}):
            for method, path, body in (("POST", drain, None), ("POST", "/backends", add),
                                       ("DELETE", f"/backends/127.0.0.1:{backend.port}", None)):
                answer = admin_call(lb, method, path, headers={**wrong, **json_type}, data=body)
                assert answer.status_code == 401 and "Bearer" in answer.json()["error"]
                assert answer.headers["WWW-Authenticate"].startswith("Bearer")
        assert backend_states(lb) == before
    # The admin listener's own origin, with JSON (or no body), is served.
    same = {"Origin": f"http://{own}", **json_type}
    answer = admin_call(lb, "POST", "/backends", token, headers=same, data=add)
    assert answer.status_code == 201, answer.text
    answer = admin_call(lb, "POST", drain, token,
                        headers={"Host": f"localhost:{lb.admin_port}",
                                 "Origin": f"http://localhost:{lb.admin_port}", **json_type})
    assert answer.status_code == 200 and answer.json()["state"] == "drained", answer.text
    for host in ("gol7lb-admin.internal:8404", "admin.example", "ADMIN.example:80",
                 "127.0.0.2:8404", "[::1]:8404"):  # loopback addresses: never a DNS name
        answer = admin_call(lb, "POST", drain.replace("drain", "enable"), token,
                            headers={"Host": host})
        assert answer.status_code == 200 and answer.json()["state"] == "up", (host, answer.text)
    assert "Traceback" not in lb.output()

