"""Settings: defaults < TOML file (GOL7LB_CONFIG) < environment, validated before anything starts.

Every setting is declared once, as a field of the settings dataclasses made with `setting()`
(its type, default, allowed values, meaning and check); `SETTINGS` is derived from those
fields, and the TOML reader, the environment reader, the validation messages and
docs/settings.md (`python -m gol7lb.docs > docs/settings.md`) all come from that one list.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal, TypeVar, get_args

from gol7lb import fallbackcert, upstreamtls
from gol7lb.backends import Backend, BackendError, parse_backend_list, parse_backend_url
from gol7lb.balancer import ALGORITHMS, Algorithm
from gol7lb.errors import ConfigError
from gol7lb.logfmt import LEVELS, LOG_FORMATS, LogFormat, parse_levels
from gol7lb.pools import (
    DEFAULT_POOL,
    PROXY_PROTOCOL_VERSIONS,
    DiscoverySpec,
    MirrorSpec,
    Pool,
    Route,
    backends_from_toml,
    check_cookie_name,
    check_hash_key,
    check_routes,
    is_host_name,
    mirror_from_toml,
    pools_from_toml,
    routes_from_toml,
)
from gol7lb.ratelimit import RateLimitSpec, check_rate_limit_names, rate_limits_from_toml
from gol7lb.rules import NO_RULES, TOP_LEVEL_RULE_KEYS, Rules, rules_from_toml

ENV_PREFIX = "GOL7LB_"
CONFIG_ENV = "GOL7LB_CONFIG"
# Settings that take one of a few words: each tuple of allowed words comes from its Literal.
HealthType = Literal["tcp", "http"]
HEALTH_TYPES: tuple[HealthType, ...] = get_args(HealthType)
RetryCondition = Literal["connect-failure", "timeout", "reset", "502", "503", "504"]
RETRY_CONDITIONS: tuple[RetryCondition, ...] = get_args(RetryCondition)
_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off"})
CpuAffinity = Literal["auto", "off"]
CPU_AFFINITY: tuple[CpuAffinity, ...] = get_args(CpuAffinity)
ForwardedMode = Literal["x-forwarded", "rfc7239", "both"]
FORWARDED_MODES: tuple[ForwardedMode, ...] = get_args(ForwardedMode)
TlsVersion = Literal["1.2", "1.3"]
TLS_VERSIONS: tuple[TlsVersion, ...] = get_args(TlsVersion)
DEMO_PORTS = (8081, 8082, 8083)
ContentEncoding = Literal["zstd", "br", "gzip"]
CONTENT_ENCODINGS: tuple[ContentEncoding, ...] = get_args(ContentEncoding)
CompressionLevel = Literal["fast", "default"]
COMPRESSION_LEVELS: tuple[CompressionLevel, ...] = get_args(CompressionLevel)


@dataclass(frozen=True)
class Setting:
    section: str  # "" for top-level keys
    key: str
    default: Any
    kind: SettingKind  # list: strings (env: comma-separated)
    allowed: str  # what the error message says is allowed
    meaning: str
    check: Callable[[Any], bool] = lambda value: True
    # A list setting whose items are not plain strings: (TOML value or environment text) ->
    # the stored value; raises TypeError or ValueError on anything else.
    convert: Callable[[Any, bool], Any] | None = None

    @property
    def name(self) -> str:
        return f"{self.section}.{self.key}" if self.section else self.key

    @property
    def env(self) -> str:
        parts = [self.section, self.key] if self.section else [self.key]
        return ENV_PREFIX + "_".join(parts).upper()


_T = TypeVar("_T")


def _anything(value: Any) -> bool:
    return True


def _positive(value: float) -> bool:
    return 0 < value <= 86400


def _seconds_or_zero(value: float) -> bool:
    return 0 <= value <= 86400


def _is_host_port(text: str) -> bool:
    try:
        return parse_bind(text) is not None
    except ValueError:
        return False


def _parses(parser: Callable[[str], Any]) -> Callable[[str], bool]:
    """A setting check that accepts what `parser` accepts (it raises ValueError otherwise)."""
    def check(value: str) -> bool:
        try:
            parser(value)
        except ValueError:
            return False
        return True
    return check


def setting(default: _T, allowed: str, meaning: str,
            check: Callable[[Any], bool] = _anything,
            convert: Callable[[Any, bool], Any] | None = None) -> _T:
    """A field of a settings dataclass that is a setting: its default, what a refusal says is
    allowed, its meaning (docs/settings.md) and its check. Its section, key, kind and
    environment variable come from where it is declared, so each is written once."""
    metadata = {"allowed": allowed, "meaning": meaning, "check": check}
    if convert is not None:
        metadata["convert"] = convert
    return field(default=default, metadata=metadata)


def _seconds(default: float, meaning: str, zero: bool = False) -> float:
    """A duration in seconds up to a day: > 0, or >= 0 with `zero`."""
    if zero:
        return setting(float(default), "a number of seconds >= 0", meaning, _seconds_or_zero)
    return setting(float(default), "a number of seconds > 0", meaning, _positive)


def _whole(default: int, lo: int, hi: int, meaning: str) -> int:
    return setting(default, f"a whole number from {lo} to {hi}", meaning,
                   lambda v: lo <= v <= hi)


def _one_of(default: _T, choices: tuple[_T, ...], meaning: str) -> _T:
    return setting(default, "one of " + ", ".join(map(str, choices)), meaning,
                   lambda v: v in choices)


@dataclass(frozen=True)
class HealthSettings:
    type: HealthType = _one_of(
        "tcp", HEALTH_TYPES,
        "tcp: a connect succeeds. http: GET `health.path` answers a status in "
        "`health.expect_status`.")
    interval: float = _seconds(10.0, "Seconds between two checks of one backend.")
    timeout: float = _seconds(2.0, "Seconds one check may take before it counts as failed.")
    rise: int = _whole(2, 1, 1000, "Consecutive successes that bring a down backend back.")
    fall: int = _whole(
        3, 1, 1000,
        "Consecutive failures that take an up backend out. A backend starts up but "
        "unconfirmed: its first failed check takes it out, like HAProxy.")
    path: str = setting("/healthz", "a path starting with /", "Path requested by http checks.",
                        lambda v: v.startswith("/") and v.isprintable() and " " not in v)
    expect_status: str = setting(
        "200-399", "status codes or ranges like 200-399 or 200,204",
        "Statuses that pass an http check.", _parses(lambda v: parse_status_ranges(v)))
    host: str = setting(
        "", "a host name (or host:port), or \"\"",
        "Host header of http checks (`\"\"`: the backend's `host:port`).",
        lambda v: v == "" or (v.isascii() and v.isprintable() and " " not in v))
    expect_body: str = setting(
        "", "a string",
        "http checks pass only if the body (first 64 KiB) contains this text (`\"\"`: not "
        "checked).")
    passive_fails: int = _whole(
        0, 0, 1000,
        "Passive health (Envoy's outlier detection): this many consecutive proxy failures of a "
        "backend (connect failure, timeout, reset, 502/503/504 from it), counted over all "
        "workers, eject it from every worker. 0: off.")
    passive_window: float = _seconds(10.0, "...within this many seconds.")
    passive_cooldown: float = _seconds(
        30.0, "Seconds of the first ejection; each repeat doubles it, up to 10x. An active "
        "check success does not end it early.")
    max_ejected_percent: int = _whole(
        50, 0, 100,
        "Never eject more than this share of a pool, and never its last available backend.")
    slow_start: float = _seconds(
        0.0, "A backend that comes back (up again, ejection over, newly added) ramps its weight "
        "up linearly over this many seconds. 0: off.", zero=True)

    @property
    def status_ranges(self) -> tuple[tuple[int, int], ...]:
        return parse_status_ranges(self.expect_status)


@dataclass(frozen=True)
class ProxySettings:
    connect_timeout: float = _seconds(
        3.0, "Seconds to open a connection to a backend before trying the next one.")
    read_timeout: float = _seconds(
        60.0, "Seconds a backend may stay silent (before or during its answer); then 504.")
    retries: int = _whole(
        2, 0, 100,
        "Further backends tried when connecting fails, or when a backend closes the connection "
        "before answering a request that can be sent again (idempotent method, no body).")
    retry_on: tuple[RetryCondition, ...] = setting(
        ("connect-failure",), "a list of " + ", ".join(RETRY_CONDITIONS),
        "Failed attempts that go to another backend (at most `proxy.retries` more), picked "
        "afresh by the pool's policy.", lambda v: all(c in RETRY_CONDITIONS for c in v))
    retry_buffer: int = setting(
        65536, "a whole number of bytes from 0 to 67108864",
        "Request bodies up to this many bytes are buffered so the request can be retried; a "
        "larger body is streamed and never retried.", lambda v: 0 <= v <= 64 * 1024 * 1024)
    queue_timeout: float = _seconds(
        0.0, "Seconds a request waits for a free slot when every candidate backend is at its "
        "`max_connections`; then `503`.", zero=True)
    max_connections: int = _whole(
        0, 0, 1_000_000,
        "In-flight cap per backend, over all workers, for backends without their own "
        "`max_connections`. 0: none.")
    # The worker that owns the client connection (issue 9).
    client_header_timeout: float = _seconds(
        10.0, "Seconds a client has to send a whole request head (from the connection's start, "
        "or from the end of the previous response on a kept-alive connection); then `408` and "
        "close.")
    client_body_timeout: float = _seconds(
        30.0, "Seconds between two reads of a request body; then `408` and close.")
    client_idle_timeout: float = _seconds(
        60.0, "Seconds an idle keep-alive client connection is kept open; also closes a tunnel "
        "when both sides stay silent this long.")
    max_header_bytes: int = _whole(
        16384, 1024, 1048576,
        "Largest request head (request line and header lines) in bytes; larger gets `431`. A "
        "request line over 8 KiB gets `414`.")
    max_headers: int = _whole(100, 1, 10000, "Most header lines in a request; more get `431`.")
    forwarded: ForwardedMode = _one_of(
        "x-forwarded", FORWARDED_MODES,
        "x-forwarded: X-Forwarded-For/Proto/Host/Port. rfc7239: one RFC 7239 "
        "`Forwarded: for=...;proto=...;host=...` element instead. both: both.")
    trusted_proxies: tuple[str, ...] = setting(
        (), "a list of CIDRs like 10.0.0.0/8",
        "CIDRs (or addresses) of proxies in front of the LB. From them, incoming `Forwarded`, "
        "`X-Real-IP` and `X-Forwarded-Proto/Host/Port` are kept (ours appended to "
        "`Forwarded`); from anyone else they are removed. `X-Forwarded-For` is always appended "
        "to.", _parses(lambda v: parse_networks(v)))
    # Backends over TLS, the PROXY protocol (issue 16; upstreamtls.py, proxyproto.py).
    upstream_ca: str = setting(
        "", "a path to a PEM file, or \"\"",
        "PEM bundle of CA certificates that verifies `https://` backends (`\"\"`: the system's "
        "store).")
    upstream_verify: bool = setting(
        True, "true or false",
        "Verify `https://` backends' certificates and host names. `false` only for lab use "
        "(logged as a warning at start).")
    upstream_cert: str = setting(
        "", "a path to a PEM file, or \"\"",
        "Client certificate (chain) the LB presents to `https://` backends (mTLS).")
    upstream_key: str = setting(
        "", "a path to a PEM file, or \"\"",
        "Private key of `upstream_cert` (`\"\"`: in the same file as the certificate).")
    proxy_protocol: bool = setting(
        False, "true or false",
        "Expect a PROXY protocol v1 or v2 header at the start of every client connection (a "
        "TCP load balancer in front); its address becomes the client address everywhere. A "
        "missing or malformed one closes the connection. Needs `proxy_protocol_from`.")
    proxy_protocol_from: tuple[str, ...] = setting(
        (), "a list of CIDRs like 10.0.0.0/8",
        "With `proxy_protocol`: the only peers allowed to connect (the load balancers in "
        "front); a connection from anywhere else is closed.",
        _parses(lambda v: parse_networks(v)))
    send_proxy_protocol: str = setting(
        "", "\"\", \"v1\" or \"v2\"",
        "Send a PROXY protocol header with the client's address first on each connection to the "
        "default pool's backends (named pools: their own `send_proxy_protocol` key). Such a "
        "connection is reused only for requests with the same client address and port.",
        lambda v: v in PROXY_PROTOCOL_VERSIONS)


@dataclass(frozen=True)
class AdminSettings:
    bind: str = setting(
        "127.0.0.1:8404", "host:port, or \"\" for off",
        "Admin listener (`/healthz`, `/status`, `/metrics`, the API, the dashboard); `\"\"` "
        "turns it off. Beyond loopback the LB refuses to start without `admin.token`. Needs a "
        "restart to change.", _parses(lambda v: parse_bind(v)))
    token: str = setting(
        "", "a string without spaces or control characters",
        "When set, every mutating admin call (`POST`, `DELETE`) needs `Authorization: Bearer "
        "<token>` (else 401); reads stay open.",
        lambda v: v == "" or (v.isprintable() and " " not in v))
    hosts: tuple[str, ...] = setting(
        (), 'a list of host names like "gol7lb-admin.internal"',
        "Host names, besides the bound address and `localhost`, that a mutating admin call's "
        "`Host` may carry, such as a Kubernetes Service or a reverse proxy's name; any other "
        "`Host` gets `403` (DNS rebinding).", lambda v: all(is_host_name(x) for x in v))

    @property
    def address(self) -> tuple[str, int] | None:
        return parse_bind(self.bind)


@dataclass(frozen=True)
class DiscoverySettings:
    resolvers: tuple[str, ...] = setting(
        (), "a list of DNS servers as host:port",
        "DNS servers for backends with `discover`; none: the system's resolver.",
        lambda v: all(_is_host_port(x) for x in v))
    interval: float = _seconds(
        0.0, "Seconds between two resolutions of a name; `0`: the record's TTL, clamped to "
        "1-300 s.", zero=True)


@dataclass(frozen=True)
class LogSettings:
    access: bool = setting(True, "true or false",
                           "One access-log line per proxied request on standard output.")
    format: LogFormat = _one_of(
        "text", LOG_FORMATS, "text, or json: access and error lines become one JSON object each.")
    levels: tuple[str, ...] = setting(
        (), "logger=level items, each level one of " + ", ".join(LEVELS),
        "Error-log levels per component, e.g. `gol7lb.proxy=debug, gol7lb.supervisor=warning` "
        "(the loggers are listed in docs/operations.md); the others log at info.",
        _parses(parse_levels))


@dataclass(frozen=True)
class ReloadSettings:
    watch: bool = setting(
        True, "true or false",
        "Re-read `GOL7LB_CONFIG` within 2 s of a change to the file (SIGHUP to the master "
        "always does).")


def _media_range(text: str) -> bool:
    """type/subtype or type/* (lower-case tokens), as [compression] types lists them."""
    kind, sep, sub = text.partition("/")
    return bool(sep) and kind.isascii() and sub.isascii() and all(
        part and part.replace("-", "").replace(".", "").replace("+", "").isalnum()
        and part == part.lower() for part in (kind, sub if sub != "*" else "x"))


@dataclass(frozen=True)
class CompressionSettings:
    encodings: tuple[str, ...] = setting(
        CONTENT_ENCODINGS, "a list of zstd, br, gzip, each once",
        "The server's order of preference among the encodings the client accepts (among "
        "those with the client's highest q-value). Used by routes with `compress = true`.",
        lambda v: all(x in CONTENT_ENCODINGS for x in v) and len(set(v)) == len(v))
    types: tuple[str, ...] = setting(
        ("text/*", "application/json", "application/javascript", "image/svg+xml"),
        'a list of media types like "application/json" or "text/*"',
        "Content-Types that are compressed (parameters such as charset ignored).",
        lambda v: all(_media_range(x) for x in v))
    min_bytes: int = _whole(
        1024, 0, 1 << 30, "Answers with a smaller Content-Length are sent as they are; "
        "answers without one (streamed) are compressed whatever their size.")
    level: CompressionLevel = _one_of(
        "fast", COMPRESSION_LEVELS,
        "fast: zstd 1, Brotli 4, gzip 1; default: zstd 3, Brotli 5, gzip 6. Never the "
        "slowest levels (Brotli 11 runs at about 0.5 MB/s) on the fly.")


def _acme_name(text: str) -> bool:
    """A DNS name an ACME CA can validate over HTTP-01: no IP address, no wildcard."""
    name = text.lower().removesuffix(".")
    return "." in name and not name.replace(".", "").isdigit() and is_host_name(name) \
        and ":" not in name


@dataclass(frozen=True)
class AcmeSettings:
    """Automatic certificates (acme.py): the `acme` process orders and renews them."""

    domains: tuple[str, ...] = setting(
        (), 'a list of DNS names like "example.com" (no wildcards, no IP addresses)',
        "Names to get and renew a certificate for, each its own, from the ACME CA (HTTP-01, "
        "answered on `tls.redirect_port`, which must be reachable as port 80). Empty: ACME "
        "off. Turning it on needs a restart; names added by a reload are ordered then.",
        lambda v: all(_acme_name(x) for x in v))
    email: str = setting(
        "", "an e-mail address, or \"\"",
        "Contact address of the ACME account (expiry warnings from the CA).",
        lambda v: v == "" or ("@" in v and " " not in v and v.isprintable()))
    directory: str = setting(
        "https://acme-v02.api.letsencrypt.org/directory", "an https:// URL",
        "The ACME server's directory URL (Let's Encrypt's production one by default).",
        lambda v: v.startswith("https://") and " " not in v and v.isprintable())
    ca_bundle: str = setting(
        "", "a path to a PEM file, or \"\"",
        "PEM bundle that verifies the ACME server's HTTPS certificate, for a private or test "
        "CA (`\"\"`: the system store).")
    storage: str = setting(
        "", "a directory path, or \"\"",
        "Directory kept across restarts: the account key, `certificates/NAME/cert.pem` and "
        "`key.pem`, the pending HTTP-01 answers and the lock file. Instances that share it "
        "share the certificates and order one at a time. `\"\"`: `$XDG_STATE_HOME/gol7lb/acme` "
        "(`~/.local/state/gol7lb/acme`); never the run directory, which goes at exit.")
    renew_before_days: int = _whole(
        30, 1, 3650,
        "Renew a certificate this many days before it expires; a failed renewal is retried "
        "with backoff while the old certificate is served.")


@dataclass(frozen=True)
class CertPair:
    """One certificate chain and its key, both PEM files (`tls.certificates` items)."""

    cert: str
    key: str


def _cert_pairs(value: Any, from_env: bool) -> tuple[CertPair, ...]:
    """[{cert = "...", key = "..."}, ...] in the file; "cert.pem:key.pem,..." in the
    environment."""
    if from_env:
        pairs = []
        for item in str(value).split(","):
            if item.strip():
                cert, sep, key = item.strip().rpartition(":")
                if not sep or not cert or not key:
                    raise ValueError(item)
                pairs.append(CertPair(cert, key))
        return tuple(pairs)
    if not isinstance(value, list):
        raise TypeError(value)
    found = []
    for item in value:
        if not isinstance(item, dict) or set(item) != {"cert", "key"} or not all(
                isinstance(v, str) and v for v in item.values()):
            raise TypeError(item)
        found.append(CertPair(item["cert"], item["key"]))
    return tuple(found)


@dataclass(frozen=True)
class TlsSettings:
    cert: str = setting(
        "", "a path to a PEM file, or \"\"",
        "PEM certificate chain (leaf first). `tls.cert` + `tls.key` make `PORT` serve HTTPS; "
        "this pair is the default certificate. The files are watched: a changed pair is "
        "served to new handshakes within 2 s.")
    key: str = setting("", "a path to a PEM file, or \"\"",
                       "PEM private key of `tls.cert` (unencrypted).")
    certificates: tuple[CertPair, ...] = setting(
        (), "a list of { cert = \"...\", key = \"...\" } tables (environment: "
        "cert.pem:key.pem pairs, comma-separated)",
        "More certificates, chosen by the client's SNI name from each certificate's SAN names "
        "(`*.example.com` wildcards too); a name none of them has gets `tls.cert`.",
        convert=_cert_pairs)
    min_version: TlsVersion = _one_of("1.2", TLS_VERSIONS, "Lowest TLS version accepted.")
    ciphers: str = setting(
        "", "an OpenSSL cipher string, or \"\"",
        "Cipher suites for TLS 1.2 (\"\": the ssl module's defaults); TLS 1.3's are fixed.")
    handshake_timeout: float = _seconds(
        10.0, "Seconds a client has to complete its TLS handshake; then the connection closes "
        "(`gol7lb_tls_handshakes_total{result=\"timeout\"}`). A handshake never holds a "
        "thread.")
    client_ca: str = setting(
        "", "a path to a PEM bundle, or \"\"",
        "When set, clients must present a certificate this bundle verifies (mTLS); others fail "
        "the handshake.")
    redirect_port: int = _whole(
        0, 0, 65535,
        "When > 0, also listen on this port for plain HTTP: every request gets `308` to "
        "`https://host{uri}`, except ACME HTTP-01 challenges, which are answered.")
    hsts: int = _whole(
        0, 0, 1_000_000_000,
        "When > 0, HTTPS answers carry `Strict-Transport-Security: max-age=N` (seconds).")

    @property
    def enabled(self) -> bool:
        return bool(self.cert)


@dataclass(frozen=True)
class Http2Settings:
    """HTTP/2 to clients (http2.py), on the worker's loop. Read when a worker starts."""

    enabled: bool = setting(
        True, "true or false",
        "HTTP/2 to clients: `h2` offered by ALPN on HTTPS, and h2c by prior knowledge (the "
        "connection preface as the first bytes) on a plain `PORT`. HTTP/1.1 clients keep "
        "working on the same port.")
    max_concurrent_streams: int = _whole(
        100, 1, 10000,
        "Streams one client connection may have in progress (answers still being sent "
        "count); a stream beyond it is refused alone with `REFUSED_STREAM`.")
    initial_window: int = _whole(
        1048576, 65535, 2147483647,
        "Bytes of request body a client may send on one stream before the LB acknowledges "
        "them (the flow-control window); the connection's window is four of these.")
    max_header_list: int = _whole(
        65536, 1024, 16777216,
        "Largest request header list (names, values and 32 bytes per field, decoded): over "
        "it the stream is answered `431`; over twice it (an HPACK bomb) the connection "
        "closes.")
    max_resets_per_second: int = _whole(
        100, 1, 1_000_000,
        "Streams a client may reset (or have refused) per second; more is Rapid Reset "
        "(CVE-2023-44487): `GOAWAY` with `ENHANCE_YOUR_CALM` and the connection closes.")


@dataclass(frozen=True)
class Settings:
    algorithm: Algorithm = _one_of(
        "round_robin", ALGORITHMS,
        "The default pool's policy (see Balancing); every one honours weights.")
    hash_key: str = setting(
        Pool.hash_key, "client_ip, path, header:NAME or cookie:NAME",
        "What `consistent_hash` hashes, for the default pool; a request without it hashes its "
        "client address.", check_hash_key)
    sticky_cookie: str = setting(
        Pool.sticky_cookie, "a cookie name, or \"\" for off",
        "A cookie name turns sticky sessions on for the default pool (any policy).",
        check_cookie_name)
    sticky_secret: str = setting(
        "", "a string",
        "Key of the sticky cookie's keyed hash, for all pools. Set it the same on every "
        "instance; unset, each pool's key is derived from its configuration (same value after "
        "a restart and on every instance with the same file).")
    cpu_affinity: CpuAffinity = _one_of(
        "auto", CPU_AFFINITY,
        "auto: pin worker i to CPU i mod n of the CPUs the LB may use, so each worker's threads "
        "hand the GIL over on one core. off: let the kernel move workers, for hosts where other "
        "busy processes share the CPUs.")
    rate_limit: str = setting(
        "", "the name of a [rate_limits.NAME], or \"\"",
        "The rate limit of requests that match no route (routes name their own with "
        "`rate_limit`); see [Rate limits](configuration.md#rate-limits).")
    compress: bool = setting(
        False, "true or false",
        "Compress the answers to requests that match no route, as `[compression]` says "
        "(routes say their own with `compress`).")
    backends: tuple[Backend, ...] = ()  # the default pool; empty: there is none
    discover: tuple[DiscoverySpec, ...] = ()  # the default pool's DNS-discovered entries
    named_pools: tuple[Pool, ...] = ()
    routes: tuple[Route, ...] = ()
    rules: Rules = NO_RULES  # the top-level rule keys: for requests that match no route
    mirror: MirrorSpec | None = None  # the top-level `mirror`: requests that match no route
    rate_limits: tuple[RateLimitSpec, ...] = ()  # [rate_limits.NAME] tables
    health: HealthSettings = field(default_factory=HealthSettings)
    proxy: ProxySettings = field(default_factory=ProxySettings)
    admin: AdminSettings = field(default_factory=AdminSettings)
    discovery: DiscoverySettings = field(default_factory=DiscoverySettings)
    log: LogSettings = field(default_factory=LogSettings)
    reload: ReloadSettings = field(default_factory=ReloadSettings)
    compression: CompressionSettings = field(default_factory=CompressionSettings)
    acme: AcmeSettings = field(default_factory=AcmeSettings)
    tls: TlsSettings = field(default_factory=TlsSettings)
    http2: Http2Settings = field(default_factory=Http2Settings)
    demo_backends: bool = False  # True when no backend was configured and the demo ones stand in
    source: str = "defaults"  # where the settings came from, for the start-up log
    path: str = ""  # GOL7LB_CONFIG, "" when none
    file_digest: str = ""  # sha256 of the file's bytes these settings were read from

    @property
    def pools(self) -> dict[str, Pool]:
        """Pools by name; the `[[backends]]` list is the pool named `default`."""
        pools = {}
        if self.backends or self.discover:
            pools[DEFAULT_POOL] = Pool(DEFAULT_POOL, self.algorithm, self.backends,
                                       self.hash_key, self.sticky_cookie, self.discover,
                                       self.proxy.send_proxy_protocol)
        pools.update((pool.name, pool) for pool in self.named_pools)
        return pools


# A setting's kind follows from its default: how the environment's text converts to it.
SettingKind = Literal["str", "float", "int", "bool", "list"]
_KINDS: dict[type, SettingKind] = {str: "str", float: "float", int: "int", bool: "bool",
                                   tuple: "list"}


def _declared(cls: type, section: str) -> tuple[Setting, ...]:
    return tuple(Setting(section, f.name, f.default, _KINDS[type(f.default)], **f.metadata)
                 for f in fields(cls) if "allowed" in f.metadata)


def _sections() -> dict[str, type]:
    """The Settings fields that hold a settings dataclass, by name (the section's name)."""
    found: dict[str, type] = {}
    for f in fields(Settings):
        factory = f.default_factory
        if isinstance(factory, type):
            found[f.name] = factory
    return found


SECTIONS = _sections()
SETTINGS: tuple[Setting, ...] = _declared(Settings, "") + tuple(
    s for name, cls in SECTIONS.items() for s in _declared(cls, name))
SETTINGS_BY_NAME = {s.name: s for s in SETTINGS}
# A named pool without its own policy settings gets the built-in defaults (the top-level
# algorithm, hash_key and sticky_cookie belong to the default pool).
POOL_DEFAULTS = {key: SETTINGS_BY_NAME[key].default
                 for key in ("algorithm", "hash_key", "sticky_cookie")}
BACKENDS_ENV = ENV_PREFIX + "BACKENDS"


def parse_status_ranges(text: str) -> tuple[tuple[int, int], ...]:
    """'200-399,404' -> ((200, 399), (404, 404)); ValueError on anything else."""
    ranges = []
    for part in str(text).split(","):
        lo_text, sep, hi_text = part.strip().partition("-")
        lo = int(lo_text)
        hi = int(hi_text) if sep else lo
        if not 100 <= lo <= hi <= 599:
            raise ValueError(text)
        ranges.append((lo, hi))
    return tuple(ranges)


def parse_networks(items: Any) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """('10.0.0.0/8', '::1') -> networks; ValueError for anything that is not an address/CIDR."""
    if isinstance(items, str) or not isinstance(items, list | tuple):
        raise ValueError(items)
    networks = []
    for item in items:
        if not isinstance(item, str):
            raise ValueError(item)
        networks.append(ipaddress.ip_network(item.strip(), strict=False))
    return tuple(networks)


def parse_bind(text: str) -> tuple[str, int] | None:
    """'127.0.0.1:8404' -> ('127.0.0.1', 8404); '' -> None; ValueError otherwise."""
    if text == "":
        return None
    host, sep, port_text = text.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ValueError(text)
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    port = int(port_text)
    if not 1 <= port <= 65535 or any(c.isspace() for c in host):
        raise ValueError(text)
    return host, port


def _bad(setting_name: str, value: Any, origin: str, allowed: str) -> ConfigError:
    return ConfigError(f"invalid setting {setting_name} = {value!r} ({origin}): must be {allowed}")


def _coerce(setting: Setting, value: Any, origin: str, from_env: bool) -> Any:
    """Type-check a TOML value, or convert an environment string, then range-check it."""
    try:
        if setting.kind == "bool":
            if from_env:
                text = value.strip().lower()
                if text not in _TRUE | _FALSE:
                    raise ValueError
                result: Any = text in _TRUE
            elif not isinstance(value, bool):
                raise TypeError
            else:
                result = value
        elif setting.kind == "list":
            if setting.convert is not None:
                result = setting.convert(value, from_env)
            elif from_env:
                result = tuple(part.strip() for part in value.split(",") if part.strip())
            elif not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise TypeError
            else:
                result = tuple(value)
        elif setting.kind == "str":
            if not isinstance(value, str):
                raise TypeError
            result = value.strip() if from_env else value
        elif setting.kind == "int":
            if from_env:
                result = int(value.strip())
            elif isinstance(value, bool) or not isinstance(value, int):
                raise TypeError
            else:
                result = value
        else:
            if from_env:
                result = float(value.strip())
            elif isinstance(value, bool) or not isinstance(value, int | float):
                raise TypeError
            else:
                result = float(value)
            if result != result:  # NaN
                raise ValueError
    except (TypeError, ValueError):
        raise _bad(setting.name, value, origin, setting.allowed) from None
    if not setting.check(result):
        raise _bad(setting.name, value, origin, setting.allowed)
    return result


def _read_toml(path: str) -> tuple[dict[str, Any], str]:
    """The parsed file and the sha256 of the bytes parsed (what a reload compares)."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ConfigError(f"cannot read {CONFIG_ENV}={path!r}: {e.strerror or e}") from None
    try:
        return tomllib.loads(raw.decode("utf-8")), hashlib.sha256(raw).hexdigest()
    except UnicodeDecodeError as e:
        raise ConfigError(f"cannot parse {CONFIG_ENV}={path!r}: not UTF-8 ({e.reason})") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"cannot parse {CONFIG_ENV}={path!r}: {e}") from None


@dataclass
class FileValues:
    """What a TOML file sets: scalar settings by name, and the structures."""

    values: dict[str, Any]
    backends: list[Backend] | None = None
    discover: list[DiscoverySpec] = field(default_factory=list)
    pools: list[Pool] = field(default_factory=list)
    routes: list[Route] = field(default_factory=list)
    rules: Rules = NO_RULES
    mirror: MirrorSpec | None = None
    rate_limits: list[RateLimitSpec] = field(default_factory=list)


def _values_from_toml(data: Mapping[str, Any], origin: str) -> FileValues:
    found = FileValues({})
    found.rules = rules_from_toml({k: v for k, v in data.items() if k in TOP_LEVEL_RULE_KEYS},
                                  "", f"{origin}; requests that match no route",
                                  TOP_LEVEL_RULE_KEYS)
    sections = {s.section for s in SETTINGS if s.section}
    for key, value in data.items():
        if key == "backends":
            found.backends, found.discover = backends_from_toml(value, "backends", origin)
        elif key == "pools":
            def check(name: str, raw: Any) -> Any:
                return _coerce(SETTINGS_BY_NAME[name], raw, origin, from_env=False)
            found.pools = pools_from_toml(value, origin, POOL_DEFAULTS, check)
        elif key == "routes":
            found.routes = routes_from_toml(value, origin)
        elif key in TOP_LEVEL_RULE_KEYS:
            continue  # read above
        elif key == "mirror":
            found.mirror = mirror_from_toml(value, "mirror", f"{origin}; requests that match "
                                            "no route")
        elif key == "rate_limits":
            found.rate_limits = rate_limits_from_toml(value, origin)
        elif key in sections:
            if not isinstance(value, dict):
                raise _bad(key, value, origin, f"a table [{key}]")
            for sub, sub_value in value.items():
                name = f"{key}.{sub}"
                setting = SETTINGS_BY_NAME.get(name)
                if setting is None:
                    allowed = ", ".join(s.key for s in SETTINGS if s.section == key)
                    raise ConfigError(f"unknown setting {name} ({origin}): allowed are {allowed}")
                found.values[name] = _coerce(setting, sub_value, origin, from_env=False)
        elif key in SETTINGS_BY_NAME:
            found.values[key] = _coerce(SETTINGS_BY_NAME[key], value, origin, from_env=False)
        else:
            top = [st.key for st in SETTINGS if not st.section]
            allowed = ", ".join(["backends", "pools", "routes", "rate_limits", "mirror",
                                 *sorted(sections),
                                 *top, *TOP_LEVEL_RULE_KEYS])
            raise ConfigError(f"unknown setting {key} ({origin}): allowed are {allowed}")
    return found


def _values_from_env(env: Mapping[str, str]) -> tuple[dict[str, Any], Any]:
    by_env = {s.env: s for s in SETTINGS}
    values: dict[str, Any] = {}
    backends = None
    for name, raw in env.items():
        if not name.startswith(ENV_PREFIX) or name == CONFIG_ENV:
            continue
        origin = f"from {name}"
        if name == BACKENDS_ENV:
            try:
                backends = parse_backend_list(raw)
            except BackendError as e:
                raise ConfigError(f"invalid setting backends ({origin}): {e}") from None
            if not backends:
                raise ConfigError(
                    f"invalid setting backends ({origin}): {name} is set but names no backend; "
                    "unset it to use the file's backends (or the demo backends)")
        elif name in by_env:
            values[by_env[name].name] = _coerce(by_env[name], raw, origin, from_env=True)
        else:
            raise ConfigError(
                f"unknown environment variable {name}: allowed are {CONFIG_ENV}, {BACKENDS_ENV}, "
                + ", ".join(by_env)
            )
    return values, backends


def _check_unique(backends: list[Backend], origin: str) -> None:
    seen: set[str] = set()
    for b in backends:
        if b.url in seen:
            raise ConfigError(f"invalid setting backends ({origin}): duplicate backend {b.url}: "
                              "list each address once")
        seen.add(b.url)


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Read and validate every setting; raise ConfigError with one line on the first bad one."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {s.name: s.default for s in SETTINGS}
    backends: list[Backend] | None = None
    sources = ["defaults"]

    path = env.get(CONFIG_ENV, "").strip()
    digest = ""
    found = FileValues({})
    origin = "defaults"
    if path:
        origin = f"in {path}"
        data, digest = _read_toml(path)
        found = _values_from_toml(data, origin)
        values.update(found.values)
        backends = found.backends
        sources.append(path)

    env_values, env_backends = _values_from_env(env)
    values.update(env_values)
    if env_values or env_backends is not None:
        sources.append("environment")
    if env_backends is not None:
        _check_unique(env_backends, f"from {BACKENDS_ENV}")
        backends = env_backends

    demo = not backends and not found.pools and backends is None
    if demo:
        backends = [parse_backend_url(f"http://127.0.0.1:{port}") for port in DEMO_PORTS]

    def section(name: str) -> dict[str, Any]:
        return {s.key: values[s.name] for s in SETTINGS if s.section == name}

    settings = Settings(
        **section(""),
        **{name: cls(**section(name)) for name, cls in SECTIONS.items()},
        backends=tuple(backends or ()),
        discover=tuple(found.discover) if env_backends is None else (),
        named_pools=tuple(found.pools),
        routes=tuple(found.routes),
        rules=found.rules,
        mirror=found.mirror,
        rate_limits=tuple(found.rate_limits),
        demo_backends=demo,
        source=" < ".join(sources),
        path=path,
        file_digest=digest,
    )
    if not settings.pools:
        raise ConfigError(f"invalid setting backends = [] ({origin}): no backend anywhere; "
                          "list [[backends]], [pools.NAME] backends, or leave both out for the "
                          "demo backends")
    check_routes(settings.routes, settings.pools, origin)
    if settings.mirror is not None and settings.mirror.pool not in settings.pools:
        raise ConfigError(f"invalid setting mirror.pool = {settings.mirror.pool!r} ({origin}; "
                          "requests that match no route): no such pool; pools are "
                          + ", ".join(sorted(settings.pools)))
    check_rate_limit_names(settings.routes, settings.rate_limit, settings.rate_limits, origin)
    _check_admin_exposure(settings.admin)
    if settings.acme.domains:
        settings = replace(settings, acme=_acme_paths(settings.acme, env))
        if not settings.tls.cert and not settings.tls.key:
            # ACME names alone turn HTTPS on: a self-signed default pair (for clients without
            # SNI, and until the first ACME certificates arrive); SNI picks ACME's
            cert, key = fallbackcert.ensure(settings.acme.storage)
            settings = replace(settings, tls=replace(settings.tls, cert=cert, key=key))
    _check_tls(settings.tls)
    _check_edge(settings, origin)
    return settings


def default_acme_storage(env: Mapping[str, str]) -> str:
    """Where ACME state lives when `acme.storage` is not set: the XDG state directory, which
    outlives restarts (unlike the run directory, removed at exit)."""
    state = env.get("XDG_STATE_HOME", "").strip()
    if not os.path.isabs(state):  # unset or relative: the XDG default
        home = env.get("HOME", "").strip() or os.path.expanduser("~")
        state = os.path.join(home, ".local", "state")
    return os.path.join(state, "gol7lb", "acme")


def _acme_paths(acme: AcmeSettings, env: Mapping[str, str]) -> AcmeSettings:
    """ACME on: the storage directory resolved to an absolute path (every process, workers
    included, reads challenge answers from it), and the CA bundle readable."""
    storage = os.path.abspath(os.path.expanduser(acme.storage or default_acme_storage(env)))
    if os.path.exists(storage) and not os.path.isdir(storage):
        raise ConfigError(f"invalid setting acme.storage = {acme.storage!r}: {storage} exists "
                          "and is not a directory")
    if acme.ca_bundle:
        try:
            with open(acme.ca_bundle, "rb"):
                pass
        except OSError as e:
            raise ConfigError(f"invalid setting acme.ca_bundle = {acme.ca_bundle!r}: cannot "
                              f"read it ({e.strerror or e})") from None
    return replace(acme, storage=storage, domains=tuple(
        dict.fromkeys(d.lower().removesuffix(".") for d in acme.domains)))


def _check_tls(tls: TlsSettings) -> None:
    """Settings that only make sense together (the files themselves are read by tls.py)."""
    if bool(tls.cert) != bool(tls.key):
        raise ConfigError(f"invalid setting tls.cert = {tls.cert!r}, tls.key = {tls.key!r}: "
                          "set both (HTTPS on PORT) or neither")
    if not tls.cert:
        for name in ("certificates", "client_ca", "redirect_port", "hsts"):
            if getattr(tls, name):
                raise ConfigError(f"invalid setting tls.{name} = {getattr(tls, name)!r}: it "
                                  "needs HTTPS on PORT: tls.cert and tls.key, or acme.domains")


def _check_edge(settings: Settings, origin: str) -> None:
    """PROXY protocol needs its allow list; TLS files to backends must load (one line naming
    the setting and file, at start and on reload)."""
    proxy = settings.proxy
    if proxy.proxy_protocol and not proxy.proxy_protocol_from:
        raise ConfigError(f"invalid setting proxy.proxy_protocol = true ({origin}): set "
                          "proxy.proxy_protocol_from to the CIDRs of the load balancers in front "
                          "(a PROXY header from anyone else would let them pick their address)")
    if proxy.upstream_key and not proxy.upstream_cert:
        raise ConfigError(f"invalid setting proxy.upstream_key = {proxy.upstream_key!r} "
                          f"({origin}): set proxy.upstream_cert too")
    pools = settings.pools.values()
    if proxy.upstream_ca or proxy.upstream_cert or any(
            b.tls for pool in pools for b in pool.backends) or any(
            spec.tls for pool in pools for spec in pool.discover):
        upstreamtls.check(proxy, origin)


def _check_admin_exposure(admin: AdminSettings) -> None:
    """An admin listener reachable from other hosts can drain every backend: demand a token."""
    address = admin.address
    if address is None or admin.token:
        return
    host = address[0]
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback:
        raise ConfigError(
            f"invalid setting admin.bind = {admin.bind!r}: not a loopback address, so the admin "
            "API would be open to the network; set admin.token (GOL7LB_ADMIN_TOKEN) or bind "
            "to 127.0.0.1")


def env_int(env: Mapping[str, str], name: str, default: int, lo: int, hi: int) -> int:
    """An integer environment variable for gunicorn itself (PORT, WEB_CONCURRENCY)."""
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = lo - 1
    if not lo <= value <= hi:
        raise ConfigError(
            f"invalid setting {name} = {raw!r}: must be a whole number from {lo} to {hi}")
    return value
