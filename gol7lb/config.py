"""Settings: defaults < TOML file (GOL7LB_CONFIG) < environment, validated before anything starts.

Every setting is declared once in `SETTINGS`; the TOML reader, the environment reader, the
validation messages and the README's settings table all come from that one list.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from gol7lb.backends import Backend, BackendError, parse_backend_list, parse_backend_url
from gol7lb.pools import (
    ALGORITHMS,
    DEFAULT_POOL,
    ConfigError,
    DiscoverySpec,
    Pool,
    Route,
    backends_from_toml,
    check_cookie_name,
    check_hash_key,
    check_routes,
    is_host_name,
    pools_from_toml,
    routes_from_toml,
)

ENV_PREFIX = "GOL7LB_"
CONFIG_ENV = "GOL7LB_CONFIG"
HEALTH_TYPES = ("tcp", "http")
LOG_FORMATS = ("text", "json")
RETRY_CONDITIONS = ("connect-failure", "timeout", "reset", "502", "503", "504")
_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off"})
CPU_AFFINITY = ("auto", "off")
FORWARDED_MODES = ("x-forwarded", "rfc7239", "both")
DEMO_PORTS = (8081, 8082, 8083)


@dataclass(frozen=True)
class Setting:
    section: str  # "" for top-level keys
    key: str
    default: Any
    kind: Literal["str", "float", "int", "bool", "list"]  # list: strings (env: comma-separated)
    allowed: str  # what the error message says is allowed
    meaning: str
    check: Callable[[Any], bool] = lambda value: True

    @property
    def name(self) -> str:
        return f"{self.section}.{self.key}" if self.section else self.key

    @property
    def env(self) -> str:
        parts = [self.section, self.key] if self.section else [self.key]
        return ENV_PREFIX + "_".join(parts).upper()


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


SETTINGS: tuple[Setting, ...] = (
    Setting("", "algorithm", "round_robin", "str", "one of " + ", ".join(ALGORITHMS),
            "The default pool's policy (see Balancing); every one honours weights.",
            lambda v: v in ALGORITHMS),
    Setting("", "hash_key", "client_ip", "str",
            "client_ip, path, header:NAME or cookie:NAME",
            "What consistent_hash hashes, for the default pool (and pools without their own).",
            check_hash_key),
    Setting("", "sticky_cookie", "", "str", "a cookie name, or \"\" for off",
            "A cookie name turns sticky sessions on for the default pool.", check_cookie_name),
    Setting("", "sticky_secret", "", "str", "a string",
            "Key of the sticky cookie's keyed hash, for all pools; set it the same on every "
            "instance (unset: derived from each pool's configuration)."),
    Setting("", "cpu_affinity", "auto", "str", "one of " + ", ".join(CPU_AFFINITY),
            "auto: pin worker i to CPU i mod n of the CPUs the LB may use, so a worker's "
            "threads hand the GIL over on one core (README, Worker class). off: no pinning.",
            lambda v: v in CPU_AFFINITY),
    Setting("health", "type", "tcp", "str", "one of " + ", ".join(HEALTH_TYPES),
            "tcp: a connect succeeds. http: GET `health.path` answers a status in "
            "`health.expect_status`.", lambda v: v in HEALTH_TYPES),
    Setting("health", "interval", 10.0, "float", "a number of seconds > 0",
            "Seconds between two checks of one backend.", _positive),
    Setting("health", "timeout", 2.0, "float", "a number of seconds > 0",
            "Seconds one check may take before it counts as failed.", _positive),
    Setting("health", "rise", 2, "int", "a whole number from 1 to 1000",
            "Consecutive successes that bring a down backend back.", lambda v: 1 <= v <= 1000),
    Setting("health", "fall", 3, "int", "a whole number from 1 to 1000",
            "Consecutive failures that take an up backend out.", lambda v: 1 <= v <= 1000),
    Setting("health", "path", "/healthz", "str", "a path starting with /",
            "Path requested by http checks.",
            lambda v: v.startswith("/") and v.isprintable() and " " not in v),
    Setting("health", "expect_status", "200-399", "str",
            "status codes or ranges like 200-399 or 200,204", "Statuses that pass an http check.",
            _parses(lambda v: parse_status_ranges(v))),
    Setting("health", "host", "", "str", "a host name (or host:port), or \"\"",
            "Host header of http checks (\"\": the backend's host:port).",
            lambda v: v == "" or (v.isascii() and v.isprintable() and " " not in v)),
    Setting("health", "expect_body", "", "str", "a string",
            "http checks pass only if the body contains this (\"\": not checked)."),
    Setting("health", "passive_fails", 0, "int", "a whole number from 0 to 1000",
            "> 0: this many consecutive proxy failures (connect failure, timeout, reset, "
            "502/503/504) eject a backend from every worker.", lambda v: 0 <= v <= 1000),
    Setting("health", "passive_window", 10.0, "float", "a number of seconds > 0",
            "...within this many seconds.", _positive),
    Setting("health", "passive_cooldown", 30.0, "float", "a number of seconds > 0",
            "First ejection; then 2x, 4x... of it, capped at 10x.", _positive),
    Setting("health", "max_ejected_percent", 50, "int", "a whole number from 0 to 100",
            "Never eject more than this share of a pool (and never its last backend).",
            lambda v: 0 <= v <= 100),
    Setting("health", "slow_start", 0.0, "float", "a number of seconds >= 0",
            "A backend that comes back ramps to full weight over this many seconds.",
            _seconds_or_zero),
    Setting("proxy", "connect_timeout", 3.0, "float", "a number of seconds > 0",
            "Seconds to open a connection to a backend before trying the next one.", _positive),
    Setting("proxy", "read_timeout", 60.0, "float", "a number of seconds > 0",
            "Seconds a backend may stay silent (before or during its answer); then 504.",
            _positive),
    Setting("proxy", "retries", 2, "int", "a whole number from 0 to 100",
            "Further backends tried when connecting fails, or when a backend drops an "
            "idempotent request without a body before answering.", lambda v: 0 <= v <= 100),
    Setting("proxy", "retry_on", ("connect-failure",), "list",
            "a list of " + ", ".join(RETRY_CONDITIONS),
            "Failed attempts that go to another backend (at most proxy.retries more).",
            lambda v: all(c in RETRY_CONDITIONS for c in v)),
    Setting("proxy", "retry_buffer", 65536, "int", "a whole number of bytes from 0 to 67108864",
            "Request bodies up to this size are buffered so they can be retried.",
            lambda v: 0 <= v <= 64 * 1024 * 1024),
    Setting("proxy", "queue_timeout", 0.0, "float", "a number of seconds >= 0",
            "Seconds a request waits when every backend is at max_connections; then 503.",
            _seconds_or_zero),
    Setting("proxy", "max_connections", 0, "int", "a whole number from 0 to 1000000",
            "Default in-flight cap per backend (over all workers) for backends without their "
            "own; 0: no cap.", lambda v: 0 <= v <= 1_000_000),
    Setting("admin", "bind", "127.0.0.1:8404", "str", "host:port, or \"\" for off",
            "Admin listener (`/healthz`, `/status`, `/metrics`, the API and the dashboard); "
            "empty turns it off. Beyond loopback it needs `admin.token`. Restart to change.",
            _parses(lambda v: parse_bind(v))),
    Setting("admin", "token", "", "str", "a string without spaces or control characters",
            "When set, every mutating admin call needs `Authorization: Bearer <token>`; "
            "reads stay open.", lambda v: v == "" or (v.isprintable() and " " not in v)),
    Setting("admin", "hosts", (), "list", 'a list of host names like "gol7lb-admin.internal"',
            "Names besides the bound address and localhost that a mutating admin call's Host "
            "may carry (a Service or reverse-proxy name); others get 403 (DNS rebinding).",
            lambda v: all(is_host_name(x) for x in v)),
    Setting("discovery", "resolvers", (), "list", "a list of DNS servers as host:port",
            "DNS servers for `discover` backends (none: the system's).",
            lambda v: all(_is_host_port(x) for x in v)),
    Setting("discovery", "interval", 0.0, "float", "a number of seconds >= 0",
            "Seconds between two resolutions of a name; 0: the record's TTL, clamped to "
            "1-300 s.", _seconds_or_zero),
    Setting("log", "access", True, "bool", "true or false",
            "One access-log line per proxied request on standard output."),
    Setting("log", "format", "text", "str", "one of " + ", ".join(LOG_FORMATS),
            "text, or json: access and error lines become one JSON object each.",
            lambda v: v in LOG_FORMATS),
    Setting("reload", "watch", True, "bool", "true or false",
            "Re-read `GOL7LB_CONFIG` within 2 s of a change (SIGHUP to the master always "
            "does)."),
    # The worker that owns the client connection (issue 9).
    Setting("proxy", "client_header_timeout", 10.0, "float", "a number of seconds > 0",
            "Seconds a client has to send a whole request head (from the connection's start, "
            "or from the end of the previous response); then 408 and close.", _positive),
    Setting("proxy", "client_body_timeout", 30.0, "float", "a number of seconds > 0",
            "Seconds between two reads of a request body; then 408 and close.", _positive),
    Setting("proxy", "client_idle_timeout", 60.0, "float", "a number of seconds > 0",
            "Seconds an idle keep-alive client connection (or a silent tunnel) is kept open.",
            _positive),
    Setting("proxy", "max_header_bytes", 16384, "int", "a whole number from 1024 to 1048576",
            "Largest request head (request line and header lines) in bytes; larger: 431.",
            lambda v: 1024 <= v <= 1048576),
    Setting("proxy", "max_headers", 100, "int", "a whole number from 1 to 10000",
            "Most header lines in a request; more: 431.", lambda v: 1 <= v <= 10000),
    Setting("proxy", "forwarded", "x-forwarded", "str", "one of " + ", ".join(FORWARDED_MODES),
            "x-forwarded: set X-Forwarded-For/Proto/Host/Port. rfc7239: append a Forwarded "
            "element instead. both: both.", lambda v: v in FORWARDED_MODES),
    Setting("proxy", "trusted_proxies", (), "list", "a list of CIDRs like 10.0.0.0/8",
            "Addresses whose Forwarded, X-Real-IP and X-Forwarded-Proto/Host/Port are kept; "
            "from anyone else they are removed (comma-separated in the environment).",
            _parses(lambda v: parse_networks(v))),
)
SETTINGS_BY_NAME = {s.name: s for s in SETTINGS}
# A named pool without its own policy settings gets the built-in defaults (the top-level
# algorithm, hash_key and sticky_cookie belong to the default pool).
POOL_DEFAULTS = {"algorithm": "round_robin", "hash_key": "client_ip", "sticky_cookie": ""}
BACKENDS_ENV = ENV_PREFIX + "BACKENDS"


@dataclass(frozen=True)
class HealthSettings:
    type: str = "tcp"
    interval: float = 10.0
    timeout: float = 2.0
    rise: int = 2
    fall: int = 3
    path: str = "/healthz"
    expect_status: str = "200-399"
    host: str = ""
    expect_body: str = ""
    passive_fails: int = 0
    passive_window: float = 10.0
    passive_cooldown: float = 30.0
    max_ejected_percent: int = 50
    slow_start: float = 0.0

    @property
    def status_ranges(self) -> tuple[tuple[int, int], ...]:
        return parse_status_ranges(self.expect_status)


@dataclass(frozen=True)
class ProxySettings:
    connect_timeout: float = 3.0
    read_timeout: float = 60.0
    retries: int = 2
    retry_on: tuple[str, ...] = ("connect-failure",)
    retry_buffer: int = 65536
    queue_timeout: float = 0.0
    max_connections: int = 0
    client_header_timeout: float = 10.0
    client_idle_timeout: float = 60.0
    client_body_timeout: float = 30.0
    max_header_bytes: int = 16384
    max_headers: int = 100
    forwarded: str = "x-forwarded"
    trusted_proxies: tuple[str, ...] = ()


@dataclass(frozen=True)
class AdminSettings:
    bind: str = "127.0.0.1:8404"
    token: str = ""
    hosts: tuple[str, ...] = ()

    @property
    def address(self) -> tuple[str, int] | None:
        return parse_bind(self.bind)


@dataclass(frozen=True)
class DiscoverySettings:
    resolvers: tuple[str, ...] = ()
    interval: float = 0.0


@dataclass(frozen=True)
class LogSettings:
    access: bool = True
    format: str = "text"


@dataclass(frozen=True)
class ReloadSettings:
    watch: bool = True


@dataclass(frozen=True)
class Settings:
    algorithm: str = "round_robin"
    hash_key: str = "client_ip"
    sticky_cookie: str = ""
    sticky_secret: str = ""
    cpu_affinity: str = "auto"
    backends: tuple[Backend, ...] = ()  # the default pool; empty: there is none
    discover: tuple[DiscoverySpec, ...] = ()  # the default pool's DNS-discovered entries
    named_pools: tuple[Pool, ...] = ()
    routes: tuple[Route, ...] = ()
    health: HealthSettings = field(default_factory=HealthSettings)
    proxy: ProxySettings = field(default_factory=ProxySettings)
    admin: AdminSettings = field(default_factory=AdminSettings)
    discovery: DiscoverySettings = field(default_factory=DiscoverySettings)
    log: LogSettings = field(default_factory=LogSettings)
    reload: ReloadSettings = field(default_factory=ReloadSettings)
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
                                       self.hash_key, self.sticky_cookie, self.discover)
        pools.update((pool.name, pool) for pool in self.named_pools)
        return pools


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
            if from_env:
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


def _values_from_toml(data: Mapping[str, Any], origin: str) -> FileValues:
    found = FileValues({})
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
            allowed = ", ".join(["backends", "pools", "routes", *sorted(sections), *top])
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
        algorithm=values["algorithm"],
        hash_key=values["hash_key"],
        sticky_cookie=values["sticky_cookie"],
        sticky_secret=values["sticky_secret"],
        cpu_affinity=values["cpu_affinity"],
        backends=tuple(backends or ()),
        discover=tuple(found.discover) if env_backends is None else (),
        named_pools=tuple(found.pools),
        routes=tuple(found.routes),
        health=HealthSettings(**section("health")),
        proxy=ProxySettings(**section("proxy")),
        admin=AdminSettings(**section("admin")),
        discovery=DiscoverySettings(**section("discovery")),
        log=LogSettings(**section("log")),
        reload=ReloadSettings(**section("reload")),
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
    _check_admin_exposure(settings.admin)
    return settings


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
