"""gol7lb/proxyproto.py: PROXY protocol v1/v2 parsing and building (pure functions)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gol7lb.proxyproto import (
    SIGNATURE,
    ProxyHeader,
    ProxyHeaderError,
    build,
    build_local,
    parse,
)


def v2(command: int, family: int, block: bytes) -> bytes:
    return SIGNATURE + bytes((0x20 | command, family)) + struct.pack("!H", len(block)) + block


# v1 -------------------------------------------------------------------------------------------

def test_v1_tcp4() -> None:
    data = b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\nGET / HTTP/1.1\r\n"
    header = parse(data)
    assert header == ProxyHeader(1, 45, ("192.0.2.1", 56324), ("198.51.100.2", 443))
    assert data[header.length:].startswith(b"GET ")


def test_v1_tcp6() -> None:
    data = b"PROXY TCP6 2001:db8::1 2001:db8::2 1 65535\r\n"
    assert parse(data) == ProxyHeader(1, len(data), ("2001:db8::1", 1), ("2001:db8::2", 65535))


def test_v1_unknown_ignores_the_rest() -> None:
    assert parse(b"PROXY UNKNOWN\r\n") == ProxyHeader(1, 15)
    line = b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n"
    assert parse(line) == ProxyHeader(1, len(line))


@pytest.mark.parametrize("line", [
    b"PROXY TCP4 192.0.2.1 198.51.100.2 56324\r\n",  # a field missing
    b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443 x\r\n",
    b"PROXY TCP4  192.0.2.1 198.51.100.2 56324 443\r\n",  # two spaces
    b"PROXY TCP5 192.0.2.1 198.51.100.2 56324 443\r\n",
    b"PROXY TCP4 2001:db8::1 198.51.100.2 1 2\r\n",  # wrong family
    b"PROXY TCP6 192.0.2.1 2001:db8::2 1 2\r\n",
    b"PROXY TCP4 192.0.2.300 198.51.100.2 1 2\r\n",
    b"PROXY TCP4 example.com 198.51.100.2 1 2\r\n",
    b"PROXY TCP4 192.0.2.1 198.51.100.2 65536 2\r\n",
    b"PROXY TCP4 192.0.2.1 198.51.100.2 0443 2\r\n",  # leading zero
    b"PROXY TCP4 192.0.2.1 198.51.100.2 -1 2\r\n",
    b"PROXY TCP4 192.0.2.1 198.51.100.2 +1 2\r\n",
    b"PROXY TCP4 192.0.2.1 198.51.100.2 \xd9\xa1 2\r\n",  # non-ASCII digit
    b"PROXY TCP4 192.0.2.1 198.51.100.2 1 2\n",  # LF only
    b"proxy TCP4 192.0.2.1 198.51.100.2 1 2\r\n",
    b"GET / HTTP/1.1\r\n",
    b"\x16\x03\x01\x02\x00",  # a TLS ClientHello
    b"PROXY " + b"1" * 120,  # no CRLF within 107 bytes
])
def test_v1_malformed(line: bytes) -> None:
    with pytest.raises(ProxyHeaderError):
        parse(line)


def test_v1_truncated_needs_more() -> None:
    full = b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\n"
    for cut in range(len(full)):
        assert parse(full[:cut]) is None, cut
    assert parse(full) is not None


def test_v1_longest_line_fits() -> None:
    longest = (b"PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff "
               b"ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n")
    assert len(longest) == 104
    header = parse(longest)
    assert header is not None and header.source == ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
                                                    65535)


# v2 -------------------------------------------------------------------------------------------

def test_v2_tcp4_with_tlvs_skipped() -> None:
    block = bytes([192, 0, 2, 1, 198, 51, 100, 2]) + struct.pack("!HH", 56324, 443)
    tlvs = b"\x02\x00\x0bexample.com" + b"\x04\x00\x00"  # AUTHORITY, NOOP
    data = v2(1, 0x11, block + tlvs) + b"rest"
    header = parse(data)
    assert header == ProxyHeader(2, len(data) - 4, ("192.0.2.1", 56324), ("198.51.100.2", 443))


def test_v2_tcp6() -> None:
    src = bytes.fromhex("20010db8000000000000000000000001")
    dst = bytes.fromhex("20010db8000000000000000000000002")
    data = v2(1, 0x21, src + dst + struct.pack("!HH", 1, 2))
    assert parse(data) == ProxyHeader(2, 52, ("2001:db8::1", 1), ("2001:db8::2", 2))


def test_v2_local_keeps_the_connection_address() -> None:
    data = v2(0, 0x11, bytes(12))  # LOCAL: the address block is ignored
    assert parse(data) == ProxyHeader(2, 28)
    assert parse(v2(0, 0x00, b"")) == ProxyHeader(2, 16)


def test_v2_unspec_and_unix_carry_no_address() -> None:
    assert parse(v2(1, 0x00, b"")) == ProxyHeader(2, 16)
    assert parse(v2(1, 0x31, bytes(216))) == ProxyHeader(2, 232)


@pytest.mark.parametrize("data", [
    SIGNATURE[:11] + b"X" + bytes((0x21, 0x11, 0, 12)) + bytes(12),  # bad signature
    SIGNATURE + bytes((0x11, 0x11, 0, 12)) + bytes(12),  # version 1 in v2 framing
    SIGNATURE + bytes((0x22, 0x11, 0, 12)) + bytes(12),  # command 2
    SIGNATURE + bytes((0x21, 0x11, 0, 8)) + bytes(8),  # TCP4 block too short
    SIGNATURE + bytes((0x21, 0x21, 0, 12)) + bytes(12),  # TCP6 block too short
    SIGNATURE + bytes((0x21, 0x12, 0, 12)) + bytes(12),  # UDP4
    SIGNATURE + bytes((0x21, 0x41, 0, 12)) + bytes(12),  # unknown family
])
def test_v2_malformed(data: bytes) -> None:
    with pytest.raises(ProxyHeaderError):
        parse(data)


def test_v2_truncated_needs_more() -> None:
    full = v2(1, 0x11, bytes(12) + b"\x04\x00\x01x")
    for cut in range(len(full)):
        assert parse(full[:cut]) is None, cut
    assert parse(full) == ProxyHeader(2, len(full), ("0.0.0.0", 0), ("0.0.0.0", 0))


# building -------------------------------------------------------------------------------------

@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("source,destination", [
    (("192.0.2.1", 56324), ("198.51.100.2", 443)),
    (("2001:db8::1", 1), ("2001:db8::2", 65535)),
])
def test_build_round_trips(version: str, source: tuple[str, int],
                           destination: tuple[str, int]) -> None:
    data = build(version, source, destination)
    assert parse(data + b"GET") == ProxyHeader(int(version[1]), len(data), source, destination)


def test_build_v1_text() -> None:
    assert build("v1", ("10.1.2.3", 5000), ("10.0.0.1", 80)) == \
        b"PROXY TCP4 10.1.2.3 10.0.0.1 5000 80\r\n"


def test_build_mixed_families_as_ipv6() -> None:
    header = parse(build("v2", ("192.0.2.1", 7), ("2001:db8::2", 8)))
    assert header is not None
    assert header.source == ("::ffff:c000:201", 7)
    assert header.destination == ("2001:db8::2", 8)


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_build_without_addresses_is_local(version: str) -> None:
    assert build(version, ("", 0), ("127.0.0.1", 80)) == build_local(version)
    assert build(version, None, None) == build_local(version)
    header = parse(build_local(version))
    assert header is not None and header.source is None


def test_build_drops_a_scope_id() -> None:
    assert build("v1", ("fe80::1%eth0", 1), ("fe80::2", 2)) == \
        b"PROXY TCP6 fe80::1 fe80::2 1 2\r\n"


# properties -----------------------------------------------------------------------------------

@given(st.binary(max_size=300))
def test_parser_never_crashes(data: bytes) -> None:
    """Any bytes: a header, a need for more, or ProxyHeaderError; nothing else escapes."""
    try:
        header = parse(data)
    except ProxyHeaderError:
        return
    if header is not None:
        assert 0 < header.length <= len(data)


@given(st.binary(max_size=200))
def test_parser_after_v2_signature(rest: bytes) -> None:
    try:
        header = parse(SIGNATURE + rest)
    except ProxyHeaderError:
        return
    if header is not None:
        assert header.version == 2 and header.length <= len(SIGNATURE) + len(rest)


_addresses = st.one_of(
    st.tuples(st.ip_addresses(v=4).map(str), st.ip_addresses(v=4).map(str)),
    st.tuples(st.ip_addresses(v=6).map(str), st.ip_addresses(v=6).map(str)))


@given(_addresses, st.integers(0, 65535), st.integers(0, 65535), st.sampled_from(["v1", "v2"]),
       st.binary(max_size=20))
def test_build_parse_round_trip(addresses: tuple[str, str], sport: int, dport: int,
                                version: str, after: bytes) -> None:
    data = build(version, (addresses[0], sport), (addresses[1], dport))
    header = parse(data + after)
    assert header is not None and header.length == len(data)
    assert header.source == (addresses[0], sport)
    assert header.destination == (addresses[1], dport)


@given(_addresses, st.integers(0, 65535), st.integers(0, 65535), st.sampled_from(["v1", "v2"]))
def test_every_prefix_of_a_header_needs_more(addresses: tuple[str, str], sport: int, dport: int,
                                             version: str) -> None:
    data = build(version, (addresses[0], sport), (addresses[1], dport))
    for cut in range(len(data)):
        assert parse(data[:cut]) is None
