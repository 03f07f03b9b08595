"""Header rewriting on its own."""

import pytest

from gol7lb.headers import (
    ForwardedPolicy,
    client_response_headers,
    connection_tokens,
    forwarded_element,
    request_id,
    upstream_request_headers,
)


def environ(**extra):
    base = {"REQUEST_METHOD": "GET", "REMOTE_ADDR": "127.0.0.9", "wsgi.url_scheme": "http",
            "HTTP_HOST": "shop.example:8080"}
    base.update(extra)
    return base


def test_hop_by_hop_and_connection_named_headers_are_removed_upstream():
    env = environ(HTTP_CONNECTION="keep-alive, X-Secret", HTTP_X_SECRET="1", HTTP_KEEP_ALIVE="5",
                  HTTP_TE="trailers", HTTP_UPGRADE="websocket", HTTP_PROXY_AUTHORIZATION="x",
                  HTTP_PROXY_CONNECTION="close", HTTP_TRAILER="X", HTTP_X_KEPT="yes")
    headers = upstream_request_headers(env, "shop.example:8080", "8080", "rid")
    lower = {k.lower() for k in headers}
    for gone in ("connection", "x-secret", "keep-alive", "te", "upgrade", "proxy-authorization",
                 "proxy-connection", "trailer"):
        assert gone not in lower
    assert headers["X-Kept"] == "yes"
    assert headers["Host"] == "shop.example:8080"


def test_forwarded_headers_appended_and_set():
    env = environ(HTTP_X_FORWARDED_FOR="10.1.1.1", HTTP_X_FORWARDED_PROTO="https",
                  HTTP_X_FORWARDED_HOST="evil", HTTP_X_FORWARDED_PORT="1")
    headers = upstream_request_headers(env, "shop.example:8080", "8080", "rid")
    assert headers["X-Forwarded-For"] == "10.1.1.1, 127.0.0.9"
    assert headers["X-Forwarded-Proto"] == "http"
    assert headers["X-Forwarded-Host"] == "shop.example:8080"
    assert headers["X-Forwarded-Port"] == "8080"
    assert headers["X-Request-ID"] == "rid"


def test_forwarded_hosts_name_the_host_sent_not_the_header_an_absolute_target_replaced():
    headers = upstream_request_headers(environ(), "a.example", "8080", "rid",
                                       ForwardedPolicy("both"))
    assert headers["Host"] == headers["X-Forwarded-Host"] == "a.example"
    assert headers["Forwarded"] == "for=127.0.0.9;proto=http;host=a.example"


def test_request_id_kept_when_sane_else_generated():
    assert request_id({"HTTP_X_REQUEST_ID": "abc-123"}) == "abc-123"
    generated = request_id({})
    assert len(generated) == 32 and generated != request_id({})
    assert request_id({"HTTP_X_REQUEST_ID": "x" * 500}) != "x" * 500


def test_response_hop_by_hop_removed_repeated_kept_and_request_id_added():
    upstream = [("Set-Cookie", "a=1"), ("Connection", "X-Hop"), ("X-Hop", "1"),
                ("Keep-Alive", "timeout=5"), ("Set-Cookie", "b=2"), ("Date", "x"),
                ("Server", "y"), ("Transfer-Encoding", "chunked"), ("X-Request-ID", "other")]
    headers = client_response_headers(upstream, "rid")
    assert headers == [("Set-Cookie", "a=1"), ("Set-Cookie", "b=2"), ("X-Request-ID", "rid")]


@pytest.mark.parametrize("bad", [("Bad Name", "v"), ("X-Ok", "line\r\nbreak")])
def test_invalid_response_headers_are_refused(bad):
    with pytest.raises(ValueError):
        client_response_headers([bad], "rid")


def test_connection_tokens():
    assert connection_tokens("Keep-Alive, X-A ,, x-b") == {"keep-alive", "x-a", "x-b"}
    assert connection_tokens(None) == frozenset()


def test_untrusted_clients_cannot_spoof_forwarding_headers():
    env = environ(HTTP_FORWARDED="for=6.6.6.6;proto=https", HTTP_X_REAL_IP="6.6.6.6",
                  HTTP_X_FORWARDED_PROTO="https", HTTP_X_FORWARDED_HOST="evil",
                  HTTP_X_FORWARDED_PORT="1")
    for mode in ("x-forwarded", "rfc7239", "both"):
        headers = upstream_request_headers(env, "shop.example:8080", "8080", "rid",
                                           ForwardedPolicy(mode))
        lower = {k.lower(): v for k, v in headers.items()}
        assert "x-real-ip" not in lower
        assert "6.6.6.6" not in lower.get("forwarded", "")
        assert lower.get("x-forwarded-proto", "http") == "http"
        assert lower.get("x-forwarded-host", "shop.example:8080") == "shop.example:8080"


def test_rfc7239_mode_sends_forwarded_only():
    env = environ(HTTP_X_FORWARDED_FOR="10.1.1.1")
    headers = upstream_request_headers(env, "shop.example:8080", "8080", "rid",
                                       ForwardedPolicy("rfc7239"))
    assert headers["Forwarded"] == 'for=127.0.0.9;proto=http;host="shop.example:8080"'
    assert not [k for k in headers if k.lower().startswith("x-forwarded")]


def test_both_mode_and_a_trusted_proxy_keeps_and_appends():
    env = environ(REMOTE_ADDR="10.0.0.5", HTTP_FORWARDED="for=203.0.113.9;proto=https",
                  HTTP_X_FORWARDED_FOR="203.0.113.9", HTTP_X_FORWARDED_PROTO="https",
                  HTTP_X_REAL_IP="203.0.113.9")
    policy = ForwardedPolicy("both", ["10.0.0.0/8"])
    headers = upstream_request_headers(env, "shop.example:8080", "8080", "rid", policy)
    assert headers["Forwarded"] == ('for=203.0.113.9;proto=https, '
                                    'for=10.0.0.5;proto=http;host="shop.example:8080"')
    assert headers["X-Forwarded-For"] == "203.0.113.9, 10.0.0.5"
    assert headers["X-Forwarded-Proto"] == "https"
    assert headers["X-Real-Ip"] == "203.0.113.9"


@pytest.mark.parametrize("client, node", [("2001:db8::1", '"[2001:db8::1]"'),
                                          ("192.0.2.1", "192.0.2.1")])
def test_forwarded_element_quotes_ipv6_and_hosts_with_ports(client, node):
    assert forwarded_element(client, "http", "a.example:80") == \
        f'for={node};proto=http;host="a.example:80"'
    assert forwarded_element(client, "https", "a.example") == \
        f"for={node};proto=https;host=a.example"


def test_trusted_proxies_accept_cidrs_and_single_addresses():
    policy = ForwardedPolicy("x-forwarded", ["10.0.0.0/8", "::1", "192.0.2.7"])
    assert policy.trusts("10.200.0.1") and policy.trusts("::1") and policy.trusts("192.0.2.7")
    assert not policy.trusts("192.0.2.8") and not policy.trusts("") and not policy.trusts("x")


def test_an_invalid_value_among_valid_ones_is_named():
    upstream = [("X-A", "fine"), ("X-Bad", "a\x01b"), ("X-C", "fine too")]
    with pytest.raises(ValueError, match="X-Bad"):
        client_response_headers(upstream, "rid")
    assert client_response_headers(upstream[::2], "rid")[:2] == [upstream[0], upstream[2]]


@pytest.mark.parametrize("connection", ["keep-alive", "Close", "keep-alive, X-Hop"])
def test_connection_values_drop_only_what_they_name(connection):
    upstream = [("Connection", connection), ("X-Hop", "1"), ("Keep-Alive", "timeout=5"),
                ("X-Kept", "2")]
    names = [name for name, _ in client_response_headers(upstream, "rid")]
    assert names == (["X-Kept", "X-Request-ID"] if "X-Hop" in connection
                     else ["X-Hop", "X-Kept", "X-Request-ID"])
