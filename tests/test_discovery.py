"""Backends from DNS through real gunicorn workers, against a real DNS server process on
127.0.0.1 whose records the tests change: A records, SRV weights, a server that stops
answering, a name that does not exist."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.dnsserver import TestDNS
from tests.load import Load
from tests.procs import free_port, lb_status, start_backend, wait_until

FAST = {"GOL7LB_HEALTH_INTERVAL": "0.2", "GOL7LB_HEALTH_TIMEOUT": "0.5",
        "GOL7LB_HEALTH_RISE": "1", "GOL7LB_HEALTH_FALL": "1"}


@pytest.fixture
def dns(tmp_path: Path) -> Iterator[TestDNS]:
    server = TestDNS(tmp_path)
    yield server
    server.stop()


@pytest.fixture
def started(tmp_path: Path) -> Iterator[list]:
    procs: list = []
    yield procs
    for proc in procs:
        proc.stop()
    assert not [pid for proc in procs for pid in proc.leftovers()]


def config(tmp_path: Path, dns: TestDNS, entry: str, interval: float = 0.0) -> dict[str, str]:
    """A file with one [[backends]] entry (its key lines) resolved through the test server."""
    path = tmp_path / "lb.toml"
    path.write_text(f'[[backends]]\n{entry}\n[discovery]\nresolvers = ["{dns.address}"]\n'
                    f"interval = {interval}\n")
    return {"GOL7LB_CONFIG": str(path), **FAST}


def backends_by_id(lb) -> dict[str, dict]:
    return {b["id"]: b for b in lb_status(lb)["backends"]}


def served_by(lb, n: int) -> Counter:
    return Counter(f"{r.json()['port']}" for r in (
        requests.get(lb.url + "/echo", timeout=5, headers={"Connection": "close"})
        for _ in range(n)))


def test_a_records_follow_changes_and_a_removed_address_costs_no_request(
        lb_factory, dns, started, tmp_path):
    port = free_port()
    for host in ("127.0.0.1", "127.0.0.2", "127.0.0.3"):
        started.append(start_backend(port, tmp_path, host=host))
    dns.set_a("api.test", ["127.0.0.1", "127.0.0.2"])
    lb = lb_factory(config(tmp_path, dns, f'url = "http://api.test:{port}"\ndiscover = "dns"',
                           interval=0.3))
    first, second, third = (f"127.0.0.{i}:{port}" for i in (1, 2, 3))
    wait_until(lambda: all(backends_by_id(lb).get(i, {}).get("state") == "up"
                           for i in (first, second)), timeout=15)
    entry = backends_by_id(lb)[first]
    assert entry["source"] == "dns" and entry["discovered_from"] == "api.test"
    # An address appears: it is checked, then takes traffic.
    dns.set_a("api.test", ["127.0.0.1", "127.0.0.2", "127.0.0.3"])
    wait_until(lambda: backends_by_id(lb).get(third, {}).get("state") == "up", timeout=15)
    assert set(lb_status(lb)["pools"]["default"]["backends"]) == {first, second, third}
    # An address disappears under continuous load: no request fails.
    with Load(lb.url + "/", threads=4, fresh=True) as load:
        load.wait_for(30)
        dns.set_a("api.test", ["127.0.0.2", "127.0.0.3"])
        wait_until(lambda: first not in backends_by_id(lb), timeout=15)
        load.wait_for(30)
    assert load.failures == [], load.failures[:5]
    assert set(lb_status(lb)["pools"]["default"]["backends"]) == {second, third}


def test_srv_targets_ports_and_weights_shape_the_traffic(lb_factory, dns, started, tmp_path):
    heavy, light = free_port(), free_port()
    started += [start_backend(heavy, tmp_path), start_backend(light, tmp_path)]
    dns.set_a("node1.test", ["127.0.0.1"])
    dns.set_srv("_http._tcp.api.test", [(10, 3, heavy, "node1.test"),
                                             (10, 1, light, "node1.test"),
                                             (20, 5, free_port(), "node1.test")])  # backup tier
    lb = lb_factory(config(tmp_path, dns, 'discover = "srv"\nname = "_http._tcp.api.test"'))
    heavy_id, light_id = f"127.0.0.1:{heavy}", f"127.0.0.1:{light}"
    wait_until(lambda: all(backends_by_id(lb).get(i, {}).get("state") == "up"
                           for i in (heavy_id, light_id)), timeout=15)
    entries = backends_by_id(lb)
    assert set(entries) == {heavy_id, light_id}  # only the lowest priority
    assert (entries[heavy_id]["weight"], entries[light_id]["weight"]) == (3, 1)
    assert entries[heavy_id]["discovered_from"] == "_http._tcp.api.test"
    served = served_by(lb, 40)
    assert served == {str(heavy): 30, str(light): 10}


def test_a_name_that_stops_resolving_keeps_its_last_addresses(lb_factory, dns, started,
                                                              tmp_path):
    port = free_port()
    started.append(start_backend(port, tmp_path))
    dns.set_a("api.test", ["127.0.0.1"])
    lb = lb_factory(config(tmp_path, dns, f'url = "http://api.test:{port}"\ndiscover = "dns"',
                           interval=0.3))
    backend_id = f"127.0.0.1:{port}"
    wait_until(lambda: backends_by_id(lb).get(backend_id, {}).get("state") == "up", timeout=15)
    dns.stop()  # the resolver dies
    wait_until(lambda: lb_status(lb)["discovery"][0]["error"], timeout=20)
    doc = lb_status(lb)
    assert doc["discovery"][0]["name"] == "api.test"
    assert doc["discovery"][0]["addresses"] == [backend_id]
    assert [b["id"] for b in doc["backends"]] == [backend_id]  # kept, not emptied
    assert all(requests.get(lb.url + "/", timeout=5).status_code == 200 for _ in range(5))
    assert "did not resolve" in lb.output() and "keeping its last known addresses" in lb.output()


def test_a_name_missing_at_start_gives_a_clear_503_and_status(lb_factory, dns, tmp_path):
    lb = lb_factory(config(tmp_path, dns, 'url = "http://missing.test:8080"\ndiscover = "dns"'))
    state = wait_until(lambda: (d := lb_status(lb)["discovery"]) and d[0]["error"] and d[0],
                       timeout=20)
    assert "NXDOMAIN" in state["error"] and state["addresses"] == []
    answer = requests.get(lb.url + "/", timeout=5)
    assert answer.status_code == 503 and "no healthy backend" in answer.text
    assert "Retry-After" in answer.headers


@pytest.mark.parametrize("text, words", [
    ('[[backends]]\nurl = "http://api.test:80"\ndiscover = "mdns"\n', ["discover", '"dns", "srv"']),
    ('[[backends]]\ndiscover = "srv"\nname = "api.test"\n', ["name", "SRV name"]),
    ('[[backends]]\ndiscover = "srv"\nname = "_http._tcp.a.test"\nweight = 2\n', ["srv"]),
    ('[[backends]]\nurl = "http://127.0.0.1:80"\nname = "x"\n', ["name", '"srv" only']),
    ('[[backends]]\nurl = "http://a.test:80"\ndiscover = "dns"\n[discovery]\n'
     'resolvers = ["nowhere"]\n', ["discovery.resolvers"]),
])
def test_bad_discovery_settings_are_refused_with_one_line(tmp_path, text, words):
    from gol7lb.config import ConfigError, load_settings
    path = tmp_path / "lb.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as error:
        load_settings({"GOL7LB_CONFIG": str(path)})
    for word in words:
        assert word in str(error.value), error.value
