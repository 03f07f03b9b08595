"""Request target and authority checks. Routes match the normalised path (dot segments,
unreserved escapes, repeated slashes), the target is forwarded byte for byte, and ambiguous
targets or a Host that is not a valid authority are refused with 400: the checks on their own,
then through a real LB (every worker class) with an /admin/ route, a stripping /api/ route and
a default pool whose backends record the bytes they get."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gol7lb.http1 import Http1Parser, RequestError
from gol7lb.target import AmbiguousTarget, normalise_path, valid_authority
from tests.conftest import FAST_HEALTH, _stop_and_check
from tests.helpers import raw_request, split_response
from tests.procs import LB
from tests.recorder import Recorder

# RFC 3986 section 5.4 (base "http://a/b/c/d;p?q"): each reference merged with the base path,
# then remove_dot_segments (section 5.2.4) gives the path of the example's result.
RFC_3986_EXAMPLES = [
    ("/b/c/g", "/b/c/g"), ("/b/c/./g", "/b/c/g"), ("/b/c/g/", "/b/c/g/"), ("/g", "/g"),
    ("/b/c/.", "/b/c/"), ("/b/c/./", "/b/c/"), ("/b/c/..", "/b/"), ("/b/c/../", "/b/"),
    ("/b/c/../g", "/b/g"), ("/b/c/../..", "/"), ("/b/c/../../", "/"), ("/b/c/../../g", "/g"),
    # abnormal examples (5.4.2)
    ("/b/c/../../../g", "/g"), ("/b/c/../../../../g", "/g"), ("/./g", "/g"), ("/../g", "/g"),
    ("/b/c/g.", "/b/c/g."), ("/b/c/.g", "/b/c/.g"), ("/b/c/g..", "/b/c/g.."),
    ("/b/c/..g", "/b/c/..g"), ("/b/c/./../g", "/b/g"), ("/b/c/./g/.", "/b/c/g/"),
    ("/b/c/g/./h", "/b/c/g/h"), ("/b/c/g/../h", "/b/c/h"), ("/b/c/g;x=1/./y", "/b/c/g;x=1/y"),
    ("/b/c/g;x=1/../y", "/b/c/y"),
    # section 5.2.4's own walk-through
    ("/a/b/c/./../../g", "/a/g"),
]


@pytest.mark.parametrize("path, expected", RFC_3986_EXAMPLES)
def test_dot_segments_are_removed_as_rfc_3986_does(path, expected):
    assert normalise_path(path) == expected


@pytest.mark.parametrize("path, expected", [
    ("/%61dmin/x", "/admin/x"), ("/ADM%49N", "/ADMIN"), ("/%7euser/%2D%5f%2e", "/~user/-_."),
    ("/a%3ab%3A", "/a%3Ab%3A"),  # reserved: kept encoded, hex digits upper-cased
    ("/caf%c3%a9", "/caf%C3%A9"), ("/file%2etxt", "/file.txt"),
    ("//admin/x", "/admin/x"), ("/admin//x//", "/admin/x/"), ("//", "/"), ("/a/b//", "/a/b/"),
    ("/public/../admin/x", "/admin/x"), ("/./admin/x", "/admin/x"), ("/.well-known/x",
                                                                     "/.well-known/x"),
    ("/a/..//admin", "/admin"),  # `..` before the empty segment: no ambiguity
])
def test_unreserved_escapes_are_decoded_and_slashes_merged(path, expected):
    assert normalise_path(path) == expected


@pytest.mark.parametrize("path", ["/", "/admin/x", "/a.b/c-d_e~f;g=h", "*", "/a/b/"])
def test_a_plain_path_comes_back_as_it_is(path):
    assert normalise_path(path) is path  # the fast path: no copy, nothing parsed


@pytest.mark.parametrize("path", [
    "/admin%2Fx", "/admin%2fx",  # an encoded slash: a segment boundary or not?
    "/%2e%2e/admin/x", "/public/.%2E/admin/x", "/public/%2e./admin", "/%2e/admin/x",
    "/%2E",  # encoded dot segments: resolved by some backends, not by others
    "/public\\..\\admin/x", "/admin%5cx", "/admin%5C",  # backslashes: "/" on some backends
    "/a%00b",  # NUL
    "/public/..;/admin/x", "/public/.;x/admin",  # Tomcat reads "..;" as ".."
    "/a//../admin/x",  # merged first "/admin/x", resolved first "/a/admin/x"
    "/a%zz", "/a%4", "/a%",  # not a percent-escape
])
def test_ambiguous_paths_are_refused(path):
    with pytest.raises(AmbiguousTarget):
        normalise_path(path)


GOOD_HOSTS = ["api.example.com", "API.Example.COM:8080", "api.example.com.", "h:", "",
              "127.0.0.1:80", "[::1]", "[::1]:8443", "[2001:db8::7]:65535", "xn--bcher-kva.example",
              "a-b_c~d%41:1", " h.example \t"]
BAD_HOSTS = ["a b@c/d", "x/y", "a@b", "u:p@h", ":80", "h:99999", "h:65536", "h:8x", "h:80:80",
             "[::1", "[zz::1]", "[::1]x", "::1", "a\\b", "h?x", "h#x", "caf\u00e9.example",
             "h:123456", "h%zz"]


@pytest.mark.parametrize("host", GOOD_HOSTS)
def test_valid_authorities(host):
    assert valid_authority(host)


@pytest.mark.parametrize("host", BAD_HOSTS)
def test_invalid_authorities(host):
    assert not valid_authority(host)


@pytest.mark.parametrize("host", ["a b@c/d", "x/y", "a@b", ":80", "h:99999"])
def test_our_workers_parser_refuses_a_bad_host_before_any_thread(host):
    parser = Http1Parser()
    with pytest.raises(RequestError) as error:
        parser.feed(f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    assert error.value.status == 400
    assert not parser.ready


def test_our_workers_parser_takes_a_good_host_and_an_empty_one():
    parser = Http1Parser()
    parser.feed(b"GET / HTTP/1.1\r\nHost: api.example.com.:80\r\n\r\n"
                b"GET / HTTP/1.1\r\nHost:\r\n\r\n")
    assert len(parser.ready) == 2


# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pools() -> Iterator[dict[str, Recorder]]:
    recorders = {name: Recorder() for name in ("admin", "api", "default")}
    yield recorders
    for recorder in recorders.values():
        recorder.close()


@pytest.fixture(scope="module")
def routed_lb(pools: dict[str, Recorder],
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[LB]:
    tmp: Path = tmp_path_factory.mktemp("normalised")
    config = tmp / "lb.toml"
    config.write_text(f'''
[[backends]]
url = "http://127.0.0.1:{pools["default"].port}"
[pools.admin]
[[pools.admin.backends]]
url = "http://127.0.0.1:{pools["admin"].port}"
[pools.api]
[[pools.api.backends]]
url = "http://127.0.0.1:{pools["api"].port}"
[[routes]]
path_prefix = "/admin/"
pool = "admin"
[[routes]]
path_prefix = "/api/"
pool = "api"
strip_prefix = true
''')
    lb = LB({"GOL7LB_CONFIG": str(config), **FAST_HEALTH}, log=tmp / "lb.log")
    try:
        yield lb.wait_ready()
    finally:
        _stop_and_check([lb])


def send(lb: LB, pools: dict[str, Recorder], target: str,
         host: str = "h.example") -> tuple[int, dict[str, bytes]]:
    """One request with this exact target: (status, what each pool's backend received)."""
    for recorder in pools.values():
        recorder.clear()
    answer = raw_request(lb.port, f"GET {target} HTTP/1.1\r\nHost: {host}\r\n"
                         "Connection: close\r\n\r\n".encode("latin-1"))
    return split_response(answer)[0], {name: r.data() for name, r in pools.items()}


@pytest.mark.parametrize("target", [
    "/admin/x", "/public/../admin/x", "/%61dmin/x", "/adm%69n/x?q=%2F..", "//admin/x",
    "/./admin/x", "/../admin/x", "/admin/./x", "/api/../admin/x", "http://h.example//admin/x",
])
def test_path_tricks_reach_the_admin_pool_with_the_target_unchanged(routed_lb, pools, target):
    status, received = send(routed_lb, pools, target)
    assert status == 200
    assert received["default"] == b"" and received["api"] == b""
    origin = target.removeprefix("http://h.example")
    assert received["admin"].startswith(f"GET {origin} HTTP/1.1\r\n".encode())


@pytest.mark.parametrize("target", ["/admin/../x", "/public/x", "/admin", "/admin%2e/x"])
def test_paths_outside_admin_reach_the_default_pool(routed_lb, pools, target):
    status, received = send(routed_lb, pools, target)
    assert status == 200
    assert received["admin"] == b""
    assert received["default"].startswith(f"GET {target} HTTP/1.1\r\n".encode())


@pytest.mark.parametrize("target, forwarded", [
    ("/api/x?q=1", "/x?q=1"), ("/public/../api/x?q=/../", "/x?q=/../"),
    ("/%61pi/./x", "/x"), ("//api//x", "/x"), ("/api/%7Eme", "/~me"), ("/api/", "/"),
])
def test_strip_prefix_strips_from_the_normalised_path(routed_lb, pools, target, forwarded):
    status, received = send(routed_lb, pools, target)
    assert status == 200
    assert received["admin"] == b"" and received["default"] == b""
    assert received["api"].startswith(f"GET {forwarded} HTTP/1.1\r\n".encode())


@pytest.mark.parametrize("target", [
    "/admin%2Fx", "/public%2F..%2Fadmin/x", "/%2e%2e/admin/x", "/public/%2E%2E/admin/x",
    "/public/.%2e/admin/x", "/%2e/admin/x", "/public\\..\\admin/x", "/admin%5cx", "/a%00b",
    "/public/..;/admin/x", "/a//../admin/x", "/a%zz", "http://h.example/public/%2e%2e/admin/",
])
def test_ambiguous_targets_are_400_and_reach_no_backend(routed_lb, pools, target):
    status, _ = send(routed_lb, pools, target)
    time.sleep(0.05)  # a forwarded request would have arrived by now
    assert status == 400
    assert all(r.data() == b"" for r in pools.values())


@pytest.mark.parametrize("target, host", [
    *(("/x", host) for host in BAD_HOSTS if host != "caf\u00e9.example"),
    ("/x", "caf\u00e9.example"),  # sent as latin-1 bytes
    ("http://h.example/x", "a@b"),  # a bad Host is refused even when the target's authority wins
    ("http://u@h.example/admin/x", "h.example"),  # userinfo in the target (RFC 9110 4.2.4)
    ("http://u:p@h.example/x", "h.example"), ("http:///x", "h.example"),
    ("http://a b/x", "h.example"), ("http://h.example:99999/x", "h.example"),
])
def test_a_host_that_is_not_an_authority_is_400_and_reaches_no_backend(routed_lb, pools,
                                                                      target, host):
    status, _ = send(routed_lb, pools, target, host)
    time.sleep(0.05)  # a forwarded request would have arrived by now
    assert status == 400
    assert all(r.data() == b"" for r in pools.values())


@pytest.mark.parametrize("host", ["H.Example.:8080", "h.example:", "[::1]:8080", ""])
def test_good_hosts_are_forwarded_as_they_came(routed_lb, pools, host):
    status, received = send(routed_lb, pools, "/admin/x", host)
    assert status == 200
    assert f"\r\nHost: {host}\r\n".encode() in received["admin"]
