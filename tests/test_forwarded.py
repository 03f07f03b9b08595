"""Forwarding headers through a real LB (every worker class): spoofing from untrusted clients is
removed; proxy.forwarded and proxy.trusted_proxies choose what is sent and kept."""

from __future__ import annotations

import json

import requests

from tests.conftest import FAST_HEALTH, backends_env
from tests.helpers import header, raw_request, split_response


def echo_doc(lb, headers: dict[str, str]) -> dict:
    response = requests.get(lb.url + "/echo", headers=headers, timeout=10)
    assert response.status_code == 200
    return response.json()


def test_a_clients_forwarded_and_x_real_ip_never_reach_the_backend(shared_lb):
    doc = echo_doc(shared_lb, {"Forwarded": "for=6.6.6.6;proto=https", "X-Real-IP": "6.6.6.6",
                               "X-Forwarded-Host": "evil", "X-Forwarded-Port": "1"})
    assert header(doc, "Forwarded") == []
    assert header(doc, "X-Real-IP") == []
    assert header(doc, "X-Forwarded-Host") == [f"127.0.0.1:{shared_lb.port}"]
    assert header(doc, "X-Forwarded-Port") == [str(shared_lb.port)]


def test_rfc7239_and_both_modes(lb_factory, backend_factory):
    backend = backend_factory()
    for mode, x_forwarded in (("rfc7239", False), ("both", True)):
        lb = lb_factory({"GOL7LB_BACKENDS": backends_env([backend.port]), **FAST_HEALTH,
                         "GOL7LB_PROXY_FORWARDED": mode})
        doc = echo_doc(lb, {"Host": "shop.example", "Forwarded": "for=6.6.6.6;proto=https"})
        assert header(doc, "Forwarded") == ["for=127.0.0.1;proto=http;host=shop.example"]
        assert bool(header(doc, "X-Forwarded-For")) == x_forwarded
        lb.stop()


def test_a_trusted_proxys_headers_are_kept_and_ours_appended(lb_factory, backend_factory):
    backend = backend_factory()
    lb = lb_factory({"GOL7LB_BACKENDS": backends_env([backend.port]), **FAST_HEALTH,
                     "GOL7LB_PROXY_FORWARDED": "both",
                     "GOL7LB_PROXY_TRUSTED_PROXIES": "127.0.0.0/8, ::1"})
    doc = echo_doc(lb, {"Host": "shop.example", "Forwarded": "for=203.0.113.9;proto=https",
                        "X-Forwarded-Proto": "https", "X-Real-IP": "203.0.113.9",
                        "X-Forwarded-For": "203.0.113.9"})
    assert header(doc, "Forwarded") == [
        "for=203.0.113.9;proto=https, for=127.0.0.1;proto=http;host=shop.example"]
    assert header(doc, "X-Forwarded-Proto") == ["https"]
    assert header(doc, "X-Real-IP") == ["203.0.113.9"]
    assert header(doc, "X-Forwarded-For") == ["203.0.113.9, 127.0.0.1"]


def test_absolute_form_host_and_x_forwarded_host_agree(lb_factory, backend_factory):
    """RFC 9112 3.2.2: the target's authority replaces Host; X-Forwarded-Host and Forwarded's
    host= name the same one, not the Host header the client sent."""
    backend = backend_factory()
    lb = lb_factory({"GOL7LB_BACKENDS": backends_env([backend.port]), **FAST_HEALTH,
                     "GOL7LB_PROXY_FORWARDED": "both"})
    answer = raw_request(lb.port, b"GET http://a.example:8080/echo?q=1 HTTP/1.1\r\n"
                         b"Host: b.example\r\nConnection: close\r\n\r\n")
    status, _, body = split_response(answer)
    assert status == 200
    doc = json.loads(body)
    assert doc["target"] == "/echo?q=1"
    assert header(doc, "Host") == ["a.example:8080"]
    assert header(doc, "X-Forwarded-Host") == ["a.example:8080"]
    assert header(doc, "Forwarded") == ["for=127.0.0.1;proto=http;host=\"a.example:8080\""]
